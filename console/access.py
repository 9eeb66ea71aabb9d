"""Who is asking, and may they: sessions, CSRF, cross-site refusal and roles — the console's one access module.

Flow of every request (``access_middleware``, the app's one middleware that refuses):

    1. an unsafe method (POST) from another origin is refused, 403: ``Origin`` must name this host, and
       ``Sec-Fetch-Site`` (sent by browsers) must be ``same-origin`` or ``none``;
    2. the visitor is identified: a session cookie (signed with CONSOLE_SECRET, HttpOnly, SameSite=Strict,
       Secure with CONSOLE_SECURE_COOKIE), or — for scripts on the JSON API — ``Authorization: Bearer <key>``;
       without keys configured, everyone is an operator (the console then listens on loopback only);
    3. a POST made with the cookie must carry the session's CSRF token (form field ``csrf`` or header
       ``X-CSRF-Token``); a key in a header needs none (a browser never adds one on its own);
    4. the route's role (``@public``, ``@viewer``, ``@operator``; none said = viewer) is checked: not logged in
       → the login page (the API: 401), a viewer on an operator's route → 403.

Refusals are drawn by the application the route belongs to (``REFUSE`` in its ``config_dict``): HTML pages by
the console, JSON by the API sub-application — so no middleware looks at the path.

Sessions are stateless signed cookies; logging out revokes the session id in this process (kept until it would
have expired), so a copy of the old cookie no longer works here.
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from aiohttp import web
from aiohttp.helpers import ChainMapProxy
from itsdangerous import BadSignature, URLSafeTimedSerializer

from console.keys import OPEN_ACTOR, ConsoleKeys, Role

COOKIE: Final = "crm_console"
SESSION_SECONDS: Final = 12 * 3600
CSRF_FIELD: Final = "csrf"
CSRF_HEADER: Final = "X-CSRF-Token"
_RANK: Final[dict[str, int]] = {"public": 0, "viewer": 1, "operator": 2}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Need = Literal["public", "viewer", "operator"]


@dataclass
class Session:
    sid: str
    csrf: str
    name: str | None = None  # None: not logged in (a login form's CSRF token still lives here)
    role: Role | None = None
    issued: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Visitor:
    name: str | None
    role: Role | None
    session: Session | None  # None: authenticated by a key in a header (a script)

    @property
    def operator(self) -> bool:
        return self.role == "operator"


class Refuse(Protocol):
    def __call__(self, request: web.Request, status: int, message: str) -> web.StreamResponse: ...


VISITOR: Final = web.RequestKey("visitor", Visitor)
REFUSE: Final = web.AppKey("refuse", Refuse)


def needs(level: Need) -> Callable[[Handler], Handler]:
    def mark(handler: Handler) -> Handler:
        handler.console_needs = level  # type: ignore[attr-defined]
        return handler
    return mark


public, viewer, operator = needs("public"), needs("viewer"), needs("operator")


class Sessions:
    """Signed session cookies, and the ids of sessions ended here."""

    def __init__(self, secret: str, *, secure: bool, keys: ConsoleKeys) -> None:
        self.serializer = URLSafeTimedSerializer(secret, salt="crm-console-session")
        self.secure = secure
        self.keys = keys
        self.revoked: dict[str, float] = {}

    @property
    def open(self) -> bool:
        """No keys configured: everyone is an operator (loopback only, checked at start)."""
        return not len(self.keys)

    def new(self, name: str | None = None, role: Role | None = None) -> Session:
        return Session(sid=secrets.token_urlsafe(16), csrf=secrets.token_urlsafe(24), name=name, role=role)

    def read(self, request: web.Request) -> Session | None:
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        try:
            data = self.serializer.loads(cookie, max_age=SESSION_SECONDS)
        except BadSignature:
            return None
        if not isinstance(data, dict) or data.get("sid") in self.revoked:
            return None
        session = Session(sid=str(data["sid"]), csrf=str(data["csrf"]), issued=float(data["issued"]))
        name = data.get("name")
        # The role is the one configured now: a key removed or demoted stops or changes its sessions at once.
        role = self.keys.role_of(name) if isinstance(name, str) else None
        if role is not None:
            session.name, session.role = name, role
        return session

    def write(self, response: web.StreamResponse, session: Session) -> None:
        value = self.serializer.dumps({"sid": session.sid, "csrf": session.csrf, "name": session.name,
                                       "issued": session.issued})
        response.set_cookie(COOKIE, value, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="Strict",
                            secure=self.secure or None)

    def end(self, response: web.StreamResponse, session: Session) -> None:
        now = time.time()
        self.revoked = {sid: until for sid, until in self.revoked.items() if until > now}
        self.revoked[session.sid] = session.issued + SESSION_SECONDS
        response.del_cookie(COOKIE, path="/")


SESSIONS: Final = web.AppKey("sessions", Sessions)


def refusal_for(request: web.Request) -> Refuse:
    """How the application the route belongs to refuses (in an outer app's middleware, ``request.config_dict`` is
    the outer app's own, so the route's chain of applications is read instead)."""
    refuse: Refuse = ChainMapProxy(list(reversed(request.match_info.apps)))[REFUSE]
    return refuse


def cross_site(request: web.Request) -> str | None:
    """Why an unsafe request comes from another site (None: it does not)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
    origin = request.headers.get("Origin")
    # The scheme is not compared: TLS may end at a proxy in front of the console.
    if origin is not None and (origin == "null" or
                               urllib.parse.urlsplit(origin).netloc.lower() != (request.host or "").lower()):
        return "cross-site request refused (Origin is another site)"
    return None


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def _csrf_token(request: web.Request) -> str | None:
    token = request.headers.get(CSRF_HEADER)
    if token is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        value = (await request.post()).get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    return token


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    sessions = request.config_dict[SESSIONS]
    refuse = refusal_for(request)
    unsafe = request.method not in ("GET", "HEAD", "OPTIONS")
    if unsafe and (why := cross_site(request)) is not None:
        return refuse(request, 403, why)

    session = sessions.read(request)
    fresh = session is None
    key = _bearer(request)
    if key is not None:
        found = sessions.keys.find(key)
        if found is None:
            return refuse(request, 401, "unknown key")
        visitor = Visitor(found[0], found[1], None)
    else:
        if session is None:
            session = sessions.new()
        if sessions.open:
            visitor = Visitor(OPEN_ACTOR, "operator", session)
        else:
            visitor = Visitor(session.name, session.role, session)
        if unsafe:
            token = await _csrf_token(request)
            if fresh or token is None or not secrets.compare_digest(token, session.csrf):
                return refuse(request, 403, "missing or wrong CSRF token: reload the page and try again")
    request[VISITOR] = visitor

    level: str = getattr(request.match_info.handler, "console_needs", "viewer")
    if visitor.role is None and _RANK[level] > 0:
        response = refuse(request, 401, "log in first")
    elif _RANK[level] > _RANK[visitor.role or "public"] and visitor.role is not None:
        response = refuse(request, 403, f"this needs the operator role; {visitor.name} is a {visitor.role}")
    else:
        response = await handler(request)
    if fresh and visitor.session is not None and not response.prepared:
        sessions.write(response, visitor.session)  # the CSRF token of the forms on this first page
    return response


def log_in(request: web.Request, response: web.StreamResponse, name: str, role: Role) -> None:
    """A new session (new id and token: nothing chosen before the login carries over) for ``name``."""
    sessions = request.config_dict[SESSIONS]
    old = request[VISITOR].session
    if old is not None:
        sessions.end(response, old)
    sessions.write(response, sessions.new(name, role))


def log_out(request: web.Request, response: web.StreamResponse) -> None:
    session = request[VISITOR].session
    if session is not None:
        request.config_dict[SESSIONS].end(response, session)


def csrf_of(request: web.Request) -> str:
    session = request[VISITOR].session
    return session.csrf if session is not None else ""


def template_context(request: web.Request) -> dict[str, Any]:
    """What every page shows: who is logged in, the CSRF token for its forms, the open-console banner."""
    visitor = request.get(VISITOR)  # None when refused before the visitor was known
    return {"visitor": visitor, "csrf": csrf_of(request) if visitor else "",
            "open_console": request.config_dict[SESSIONS].open}
