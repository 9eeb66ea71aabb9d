"""The console's HTML pages, grouped by what they show: login, dead letters (list, one letter, its actions),
replay-all-matching (dry run, confirmation), audit (with the outcomes of a replay, polled by htmx).

Every page shows masked values (``shared.masking``, the replay tool's ``summary``); an operator may reveal one
dead letter, which is audited. Every action ends on its audit row's page (``/audit/{id}``), where a replay's
requests show their status as the workers apply them.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Mapping
from importlib import resources
from typing import Any, Final

import aiohttp_jinja2
from aiohttp import web

from console.access import (
    SESSIONS,
    VISITOR,
    Visitor,
    log_in,
    log_out,
    operator,
    public,
    template_context,
    viewer,
)
from console.desk import DESK, PAGE_SIZE, BadQuery, Changed, Desk, DryRun, parse_filter, parse_page
from shared.masking import mask_payload, mask_text
from worker.dead_letters import DeadLetter, RequestPlan, RequestStatus

STATIC_FILES: Final = {"htmx.min.js": "text/javascript", "console.css": "text/css"}
FORCE_SENTENCE: Final = (
    "Force gives each replayed request a fresh stamp, as if it had been sent now: its fields then overwrite "
    "whatever newer requests have written since. Without it (the default) a replay sets only the fields that "
    "no newer write holds.")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", letters_page)
    app.router.add_get("/letters/{id:\\d+}", letter_page)
    app.router.add_post("/letters/{id:\\d+}/reveal", reveal_letter)
    app.router.add_post("/letters/{id:\\d+}/replay", replay_letter)
    app.router.add_post("/letters/{id:\\d+}/drop", drop_letter)
    app.router.add_get("/replay", dry_run_page)
    app.router.add_post("/replay", replay_matching)
    app.router.add_get("/audit", audit_page)
    app.router.add_get("/audit/{id:\\d+}", audit_row_page)
    app.router.add_get("/audit/{id:\\d+}/statuses", statuses_fragment)
    app.router.add_get("/static/{name}", static_file)


def render(template: str, request: web.Request, context: dict[str, Any], *, status: int = 200) -> web.Response:
    """A page: ``context`` plus what every page shows (who is logged in, the CSRF token, the open-console
    banner)."""
    return aiohttp_jinja2.render_template(template, request, {**template_context(request), **context},
                                          status=status)


def see_other(location: str) -> web.Response:
    """303: after a form, the browser GETs ``location``."""
    return web.Response(status=303, headers={"Location": location})


def refuse(request: web.Request, status: int, message: str) -> web.StreamResponse:
    """How a page is refused: not logged in → the login page; otherwise a page saying why."""
    if status == 401 and request.method == "GET":
        return see_other("/login?" + urllib.parse.urlencode({"next": request.path_qs}))
    return render("refused.html", request, {"status": status, "message": message},
                                          status=status)


def _desk(request: web.Request) -> Desk:
    return request.app[DESK]


def _actor(request: web.Request) -> str:
    visitor: Visitor = request[VISITOR]
    return visitor.name or "-"


# ---- login -------------------------------------------------------------------------------------------------


def _next_page(value: object) -> str:
    """Where to go after logging in: a path of this console only (never another site)."""
    text = value if isinstance(value, str) else "/"
    return text if text.startswith("/") and not text.startswith("//") and "\\" not in text else "/"


@public
async def login_page(request: web.Request) -> web.StreamResponse:
    if request[VISITOR].role is not None:
        return see_other(_next_page(request.query.get("next")))
    return render("login.html", request,
                                          {"next": _next_page(request.query.get("next")), "error": None})


@public
async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    key, next_page = form.get("key"), _next_page(form.get("next"))
    found = request.config_dict[SESSIONS].keys.find(key) if isinstance(key, str) and key else None
    if found is None:
        return render(
            "login.html", request, {"next": next_page, "error": "That key is not a console key."}, status=401)
    response = see_other(next_page)
    log_in(request, response, *found)
    return response


@public
async def logout(request: web.Request) -> web.StreamResponse:
    response = see_other("/login")
    log_out(request, response)
    return response


# ---- dead letters ------------------------------------------------------------------------------------------


def _when(value: dt.datetime | str | None) -> str:
    if isinstance(value, str):
        text = value
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            return text
    if not isinstance(value, dt.datetime):
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _row(letter: DeadLetter, q: str | None = None) -> dict[str, Any]:
    item = letter.summary(show_pii=False)
    return {**item, "when": _when(letter.dead_at or item["deadAt"]), "matched": _matched(letter, q)}


def _matched(letter: DeadLetter, q: str | None) -> list[str]:
    """``field=value`` (masked) for each field whose whole value is ``q``: why the letter matched."""
    if q is None:
        return []
    found = []
    for envelope in letter.envelopes:
        payload = envelope.get("payload")
        for name, value in (payload.items() if isinstance(payload, dict) else ()):
            if q in (value if isinstance(value, list) else [value]) or str(value) == q:
                found.append(f"{name}={mask_payload({name: value})[name]}")
    return found


def _filter_query(query: Mapping[str, str], **changes: Any) -> str:
    """The query string of the current filter (with ``changes``): for the pager and the replay link."""
    kept = {name: query[name] for name in ("userId", "requestId", "reason", "since", "until", "q")
            if query.get(name)}
    kept.update({name: str(value) for name, value in changes.items() if value is not None})
    return urllib.parse.urlencode(kept)


@viewer
async def letters_page(request: web.Request) -> web.StreamResponse:
    query = request.query
    context: dict[str, Any] = {"query": query, "error": None, "page": None, "rows": [],
                               "query_string": _filter_query(query), "page_size": PAGE_SIZE}
    try:
        letter_filter, page = parse_filter(query), parse_page(query.get("page"))
    except BadQuery as exc:
        context["error"] = str(exc)
        return render("letters.html", request, context, status=400)
    found = await _desk(request).browse(letter_filter, page)
    context.update(
        page=found, rows=[_row(letter, letter_filter.q) for letter in found.letters],
        filtered=bool(letter_filter.given()), searched=letter_filter.q is not None,
        previous_page=_filter_query(query, page=page - 1) if page > 1 else None,
        next_page=_filter_query(query, page=page + 1) if page < found.pages else None)
    return render("letters.html", request, context)


async def _letter_or_404(request: web.Request) -> DeadLetter:
    letter = await _desk(request).letter(int(request.match_info["id"]))
    if letter is None:
        raise web.HTTPNotFound(text="No such dead letter (replayed or dropped since?)")
    return letter


async def _letter_context(request: web.Request, letter: DeadLetter, *, revealed: bool) -> dict[str, Any]:
    summary = letter.summary(show_pii=revealed)
    statuses = await _desk(request).statuses(letter.request_ids) if letter.request_ids else {}
    payloads = []
    for envelope in letter.envelopes:
        raw = envelope.get("payload")
        payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
        payloads.append({"request_id": envelope.get("request_id"), "user_id": envelope.get("user_id"),
                         "fields": payload if revealed else mask_payload(payload)})
    raw_deaths = letter.headers.get("x-death")
    deaths: list[Any] = raw_deaths if isinstance(raw_deaths, list) else []
    return {
        "letter": letter, "summary": summary, "when": _when(letter.dead_at), "payloads": payloads,
        "deaths": [{**death, "when": _when(death.get("time"))} for death in deaths if isinstance(death, dict)],
        "first_failure": _when(summary["firstFailureAt"]), "last_failure": _when(summary["lastFailureAt"]),
        "revealed": revealed, "statuses": statuses, "error": None,
        "earlier": [_row(other) for other in await _desk(request).same_request(letter)],
        "force_sentence": FORCE_SENTENCE,
    }


@viewer
async def letter_page(request: web.Request) -> web.StreamResponse:
    letter = await _letter_or_404(request)
    return render("letter.html", request,
                                          await _letter_context(request, letter, revealed=False))


@operator
async def reveal_letter(request: web.Request) -> web.StreamResponse:
    letter = await _letter_or_404(request)
    await _desk(request).reveal(letter, actor=_actor(request))
    return render("letter.html", request,
                                          await _letter_context(request, letter, revealed=True))


@operator
async def replay_letter(request: web.Request) -> web.StreamResponse:
    letter = await _letter_or_404(request)
    form = await request.post()
    report = await _desk(request).replay(None, ids=[letter.row_id], actor=_actor(request),
                                         force=form.get("force") == "on")
    return see_other(f"/audit/{report.audit_id}")


@operator
async def drop_letter(request: web.Request) -> web.StreamResponse:
    letter = await _letter_or_404(request)
    form = await request.post()
    why = form.get("reason")
    try:
        report = await _desk(request).drop(None, ids=[letter.row_id], actor=_actor(request),
                                           why=why if isinstance(why, str) else "")
    except BadQuery as exc:
        context = await _letter_context(request, letter, revealed=False)
        context["error"] = str(exc)
        return render("letter.html", request, context, status=400)
    return see_other(f"/audit/{report.audit_id}")


# ---- replay all matching: dry run, then a confirmation naming the count -------------------------------------


def _plan_rows(dry_run: DryRun) -> list[dict[str, Any]]:
    rows = []
    for letter in dry_run.first:
        plans: list[RequestPlan] = [dry_run.plans[rid] for rid in letter.request_ids if rid in dry_run.plans]
        rows.append({**_row(letter), "plans": [
            {"plan": plan, "sets": mask_payload(plan.sets)} for plan in plans]})
    return rows


async def _dry_run_page(request: web.Request, query: Mapping[str, str], *,
                        status: int = 200, error: str | None = None) -> web.StreamResponse:
    letter_filter = parse_filter(query)
    force = query.get("force") == "on"
    dry_run = await _desk(request).dry_run(letter_filter, force=force)
    return render("dry_run.html", request, {
        "dry_run": dry_run, "rows": _plan_rows(dry_run), "filter": letter_filter.given(), "force": force,
        "query": query, "query_string": _filter_query(query), "error": error, "force_sentence": FORCE_SENTENCE,
        "hidden": {name: query[name] for name in ("userId", "requestId", "reason", "since", "until", "q")
                   if query.get(name)},
    }, status=status)


@operator
async def dry_run_page(request: web.Request) -> web.StreamResponse:
    try:
        return await _dry_run_page(request, request.query)
    except BadQuery as exc:
        return refuse(request, 400, str(exc))


@operator
async def replay_matching(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    query = {name: value for name, value in form.items() if isinstance(value, str)}
    try:
        letter_filter = parse_filter(query)
        confirmed = int(query.get("confirmed", ""))
    except (BadQuery, ValueError) as exc:
        return refuse(request, 400, str(exc) if isinstance(exc, BadQuery) else "confirmed must be a count")
    try:
        report = await _desk(request).replay(letter_filter, actor=_actor(request), force=query.get("force") == "on",
                                             confirmed=confirmed)
    except Changed as exc:
        return await _dry_run_page(request, query, status=409, error=str(exc))
    if report.audit_id is None:
        return refuse(request, 409, "nothing matched: nothing was replayed")
    return see_other(f"/audit/{report.audit_id}")


# ---- audit, and the outcomes of a replay --------------------------------------------------------------------


def _audit_view(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "when": _when(row["at"]), "outcome": mask_text(row["outcome"]),
            "filters_text": ", ".join(f"{key}={value}" for key, value in row["filters"].items())}


@viewer
async def audit_page(request: web.Request) -> web.StreamResponse:
    try:
        page = parse_page(request.query.get("page"))
    except BadQuery as exc:
        return refuse(request, 400, str(exc))
    total, rows = await _desk(request).audit(page)
    pages = max(1, -(-total // PAGE_SIZE))
    return render("audit.html", request, {
        "rows": [_audit_view(row) for row in rows], "total": total, "page": page, "pages": pages})


async def _statuses_context(request: web.Request) -> dict[str, Any]:
    audit_id = int(request.match_info["id"])
    row = await _desk(request).audit_row(audit_id)
    if row is None:
        raise web.HTTPNotFound(text="No such audit row")
    statuses: dict[str, RequestStatus] = {}
    if row["action"] == "replay":
        statuses = await _desk(request).statuses(row["request_ids"])
    settled = all(status.status != "pending" for status in statuses.values())
    return {"row": _audit_view(row), "statuses": [statuses[rid] for rid in row["request_ids"] if rid in statuses],
            "settled": settled, "audit_id": audit_id}


@viewer
async def audit_row_page(request: web.Request) -> web.StreamResponse:
    return render("audit_row.html", request, await _statuses_context(request))


@viewer
async def statuses_fragment(request: web.Request) -> web.StreamResponse:
    """The status rows of a replay; re-requested by htmx every second while any is pending."""
    return render("_statuses.html", request, await _statuses_context(request))


# ---- static files (htmx, the style sheet): shipped in the package -----------------------------------------


@public
async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    body = resources.files("console").joinpath("static", name).read_bytes()
    response = web.Response(body=body, content_type=STATIC_FILES[name])
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response

