"""Typed keys of what the gateway holds that is not the gateway's own class: the settings, the timeline, and the
per-request keys. The keys of the gateway's own classes sit beside them (``IN_FLIGHT`` in ``gateway.inflight``,
``METRICS`` in ``gateway.metrics``, ``RPC`` in ``gateway.rpc``, ``STORE`` in ``gateway.store``, ``AUTH``,
``RATE_LIMITER``, ``DOCS`` in their modules)."""

from __future__ import annotations

from aiohttp import web

from shared.apikeys import ApiKey
from shared.clock.timeline import Timeline
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
TIMELINE = web.AppKey("timeline", Timeline)
# Per request (POSTs): our request id, made by gateway.request_id (which puts it in X-Request-Id) in its
# unaccepted form, and turned into its accepted form by the handler once the broker confirmed the request.
REQUEST_ID = web.RequestKey("crm_request_id", str)
# Per request, once gateway.middleware.auth accepted its API key: the configured entry (name and limits, never the key)
# and its name (for the envelope, the access log and the metrics).
API_KEY = web.RequestKey("crm_api_key", ApiKey)
API_KEY_NAME = web.RequestKey("crm_api_key_name", str)
