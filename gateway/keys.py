"""Typed keys of what the gateway application holds."""

from __future__ import annotations

from aiohttp import web

from gateway.inflight import InFlight
from gateway.rpc import RpcClient
from shared.settings import Settings
from shared.stamps import HybridClock

SETTINGS = web.AppKey("settings", Settings)
RPC = web.AppKey("rpc", RpcClient)
CLOCK = web.AppKey("clock", HybridClock)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
