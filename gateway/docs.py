"""``GET /openapi.json`` and ``GET /docs``: the API document and its page, with no network access needed.

At start-up ``load_docs(settings)`` builds the OpenAPI document once (``gateway.openapi``) and reads the page
and the Swagger UI files shipped in the package (``gateway/static``) into memory; the handlers only write
those bytes. ``/docs`` loads its assets from ``/docs/assets/...`` on this server, and its
Content-Security-Policy lets the browser load nothing from any other origin. ``/docs/`` redirects to
``/docs`` (301, relative ``Location``: the page's asset paths are relative to ``/docs``, and a proxy's path
prefix survives).

Plain in-memory responses rather than ``FileResponse``/``add_static``: the gateway's in-flight middleware
writes every response itself, which a ``FileResponse`` does not survive; and 2 MB held once is cheap.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
from aiohttp import web

from gateway.openapi import build_openapi
from shared.settings import Settings

DOCS_ASSETS: Final = Path(__file__).parent / "static"
DOCS_ASSETS_ROUTE: Final = "/docs/assets/{name:.+}"
# What the page loads, relative to DOCS_ASSETS; anything else under /docs/assets is a 404.
SERVED_ASSETS: Final = ("docs.js", "swagger-ui/swagger-ui-bundle.js", "swagger-ui/swagger-ui.css")

# Swagger UI styles elements inline (React style attributes) and shows inline SVG/data: images.
DOCS_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True)
class Docs:
    openapi: Asset
    page: Asset
    assets: dict[str, Asset]


DOCS = web.AppKey("docs", Docs)


def _asset(body: bytes, content_type: str) -> Asset:
    return Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def _file(name: str) -> Asset:
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return _asset((DOCS_ASSETS / name).read_bytes(), content_type)


def load_docs(settings: Settings) -> Docs:
    """The document and the page's files, once, at start-up (a missing asset fails start-up, not a page)."""
    return Docs(
        openapi=_asset(orjson.dumps(build_openapi(settings)), "application/json"),
        page=_file("docs.html"),
        assets={name: _file(name) for name in SERVED_ASSETS},
    )


def _respond(request: web.Request, asset: Asset, headers: dict[str, str] | None = None) -> web.Response:
    # no-cache = revalidate each time: an upgraded gateway never leaves a stale UI, and a match costs a 304.
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", **(headers or {})}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    text = asset.content_type.startswith("text/") or asset.content_type.endswith("javascript")
    return web.Response(
        body=asset.body, headers=headers, content_type=asset.content_type, charset="utf-8" if text else None
    )


async def openapi_json(request: web.Request) -> web.Response:
    return _respond(request, request.app[DOCS].openapi)


async def docs_page(request: web.Request) -> web.Response:
    return _respond(request, request.app[DOCS].page, {"Content-Security-Policy": DOCS_CSP})


async def docs_with_slash(request: web.Request) -> web.Response:
    return web.Response(status=301, headers={"Location": "../docs", "Cache-Control": "no-cache"})


async def docs_asset(request: web.Request) -> web.Response:
    asset = request.app[DOCS].assets.get(request.match_info["name"])
    if asset is None:
        raise web.HTTPNotFound()
    return _respond(request, asset)
