"""Every answer to a POST names its request with ``X-Request-Id``, refusals included.

Flow: a POST arrives → the edge middleware (``gateway.middleware.edge``) makes an id in its unaccepted form
(``gateway.request_ids.new_unaccepted_request_id``: ``xxxxxxxx-xxxx-7bad-...``) on the shared timeline, keeps it
in ``request[REQUEST_ID]`` and binds it for the log lines → the API key, the rate limit, the in-flight cap,
validation may refuse it (401, 429, 503, 400, 413...) → ``gateway.api.customers.post_customer`` turns it into
its accepted form once the broker confirmed the request (``accept_request_id``) → whatever the answer, it
carries the id as it stands then.

So an id handed out with a refusal is recognisably one (``GET /api/external/requests/{id}`` answers 404 for
it instead of ``pending``), and nothing is written anywhere per refusal: every refusal passes the edge, which
puts the id on its answer.
"""

from __future__ import annotations

from aiohttp import web

from gateway.request_ids import accepted_request_id
from gateway.state import REQUEST_ID
from shared.logs import set_request_id


def accept_request_id(request: web.Request) -> str:
    """The accepted form of the request's id: what the envelope (so the worker, the record) carries.

    The request keeps its unaccepted id until ``accepted(request, ...)``: a publish that fails leaves it
    refused.
    """
    return accepted_request_id(request[REQUEST_ID])


def accepted(request: web.Request, request_id: str) -> None:
    """The broker confirmed the request: from now on its answer and its log lines carry ``request_id``."""
    request[REQUEST_ID] = request_id
    set_request_id(request_id)
