"""The URL prefix of the public API, said once: routes, the OpenAPI document and the middlewares that apply
to the public API only (API keys, rate limits, the in-flight cap) all read it from here."""

from __future__ import annotations

from typing import Final

EXTERNAL_API: Final = "/api/external"
EXTERNAL_ROUTES: Final = EXTERNAL_API + "/"  # what every path under it starts with
