"""Typed keys of what the gateway application holds (its state: settings, clients, counters)."""

from __future__ import annotations

from aiohttp import web

from gateway.inflight import InFlight
from gateway.metrics import METRICS as METRICS
from gateway.rpc import RpcClient
from gateway.store import ReadStore
from shared.clock.timeline import Timeline
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
RPC = web.AppKey("rpc", RpcClient)
TIMELINE = web.AppKey("timeline", Timeline)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
STORE = web.AppKey("store", ReadStore)
# Per request (POSTs): our request id, made by gateway.request_id (which puts it in X-Request-Id) in its
# unaccepted form, and turned into its accepted form by the handler once the broker confirmed the request.
REQUEST_ID = "crm_request_id"
# Per request, once gateway.auth accepted its API key: the configured entry (name and limits, never the key)
# and its name (for the envelope, the access log and the metrics).
API_KEY = "crm_api_key"
API_KEY_NAME = "crm_api_key_name"
