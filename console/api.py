"""The console's JSON API (the sub-application ``/api``): the same desk, filters, dry run, replay and drop as the
pages, for scripts. Authenticated by the session cookie (then POSTs need the ``X-CSRF-Token`` header) or by
``Authorization: Bearer <console key>``.

    GET  /api/dead-letters?userId=&reason=&since=&until=&q=&requestId=&page=   newest first, 50 a page, masked
    GET  /api/dead-letters/{id}                                                one, masked
    POST /api/dead-letters/replay  {"filter": {..} | "ids": [..] | "all": true, "force", "dryRun", "confirmed"}
    POST /api/dead-letters/drop    {"filter": {..} | "ids": [..] | "all": true, "reason", "dryRun", "confirmed"}
    GET  /api/requests?id=..&id=..                                             where each request stands now
    GET  /api/audit?page=                                                      audit rows, newest first

An action needs a selection — ``filter`` (the list's fields: userId, reason, since, until, q, requestId), ``ids``
or ``"all": true`` — so an empty body never replays or drops everything; a drop's ``reason`` (required) says
why. ``dryRun`` answers how many and the first 20 with what a replay would set and which fields a newer write
holds, and changes nothing. ``confirmed`` (optional) is the count the caller saw in its dry run: if another number
matches now, nothing is done (409).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from console.access import REFUSE, VISITOR, operator, viewer
from console.desk import DESK, PAGE_SIZE, BadQuery, Changed, Desk, DryRun, parse_filter, parse_page
from worker.dead_letters import DeadLetter, LetterFilter, Report


def create_api() -> web.Application:
    api = web.Application()
    api[REFUSE] = refuse  # refusals of its routes are JSON
    api.router.add_get("/dead-letters", list_letters)
    api.router.add_get("/dead-letters/{id:\\d+}", one_letter)
    api.router.add_post("/dead-letters/replay", replay)
    api.router.add_post("/dead-letters/drop", drop)
    api.router.add_get("/requests", request_statuses)
    api.router.add_get("/audit", audit)
    return api


def answer(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


ERRORS: Final = {401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict", 503: "unavailable"}


def refuse(request: web.Request, status: int, message: str) -> web.StreamResponse:
    return answer({"error": ERRORS.get(status, "bad_request"), "message": message}, status)


def _desk(request: web.Request) -> Desk:
    return request.config_dict[DESK]


def _item(letter: DeadLetter) -> dict[str, Any]:
    return {**letter.summary(show_pii=False), "deadAt": letter.dead_at.isoformat() if letter.dead_at else None}


@viewer
async def list_letters(request: web.Request) -> web.StreamResponse:
    try:
        letter_filter, page = parse_filter(request.query), parse_page(request.query.get("page"))
    except BadQuery as exc:
        return refuse(request, 400, str(exc))
    found = await _desk(request).browse(letter_filter, page)
    return answer({"total": found.total, "page": page, "pageSize": PAGE_SIZE, "pages": found.pages,
                   "items": [_item(letter) for letter in found.letters]})


@viewer
async def one_letter(request: web.Request) -> web.StreamResponse:
    letter = await _desk(request).letter(int(request.match_info["id"]))
    if letter is None:
        return answer({"error": "not_found", "message": "no such dead letter"}, 404)
    return answer(_item(letter))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise BadQuery("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadQuery("the body must be a JSON object")
    return body


def _selection(body: dict[str, Any]) -> tuple[LetterFilter | None, list[int] | None]:
    ids = body.get("ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadQuery("ids must be a list of dead-letter ids (integers)")
        return None, ids
    given = body.get("filter", {})
    if not isinstance(given, dict):
        raise BadQuery("filter must be an object: userId, reason, since, until, q, requestId")
    letter_filter = parse_filter(given)
    if not letter_filter.given() and body.get("all") is not True:
        raise BadQuery('say which dead letters: "filter" (userId, reason, since, until, q, requestId), "ids", '
                       'or "all": true')
    return letter_filter, None


def _confirmed(body: dict[str, Any]) -> int | None:
    confirmed = body.get("confirmed")
    if confirmed is not None and (not isinstance(confirmed, int) or isinstance(confirmed, bool)):
        raise BadQuery("confirmed must be the count of the dry run")
    return confirmed


def _dry_run_answer(dry_run: DryRun) -> dict[str, Any]:
    first = []
    for letter in dry_run.first:
        plans = [dry_run.plans[rid] for rid in letter.request_ids if rid in dry_run.plans]
        first.append({**_item(letter), "plan": [{
            "requestId": plan.request_id, "userId": plan.user_id, "createsCustomer": plan.creates,
            "wouldSet": sorted(plan.sets), "newerWriteHolds": plan.held, "alreadyApplied": plan.already,
            "invalid": plan.invalid} for plan in plans]})
    return {"dryRun": True, "total": dry_run.total, "force": dry_run.force, "first": first}


def _report_answer(report: Report) -> dict[str, Any]:
    return {"dryRun": False, "auditId": report.audit_id,
            **{action: report.count(action) for action in ("replayed", "skipped", "failed", "dropped")},
            "requestIds": report.request_ids,
            "results": [{"id": r.letter.row_id, "requestId": r.letter.request_id, "action": r.action,
                         "detail": r.detail} for r in report.results]}


async def _answer_action(
    request: web.Request, action: Callable[[dict[str, Any]], Awaitable[Any]]
) -> web.StreamResponse:
    """Run a replay or drop on the request's JSON body: its answer, or 400 (a bad selection) / 409 (the matching
    letters changed since the dry run the confirmation names)."""
    try:
        return answer(await action(await _body(request)))
    except BadQuery as exc:
        return refuse(request, 400, str(exc))
    except Changed as exc:
        return refuse(request, 409, str(exc))


@operator
async def replay(request: web.Request) -> web.StreamResponse:
    async def act(body: dict[str, Any]) -> dict[str, Any]:
        letter_filter, ids = _selection(body)
        force = body.get("force") is True
        if body.get("dryRun") is True:
            return _dry_run_answer(await _desk(request).dry_run(letter_filter, force=force, ids=ids))
        return _report_answer(await _desk(request).replay(
            letter_filter, ids=ids, force=force, confirmed=_confirmed(body), actor=request[VISITOR].name or "-"))

    return await _answer_action(request, act)


@operator
async def drop(request: web.Request) -> web.StreamResponse:
    async def act(body: dict[str, Any]) -> dict[str, Any]:
        letter_filter, ids = _selection(body)
        if body.get("dryRun") is True:
            return _dry_run_answer(await _desk(request).dry_run(letter_filter, force=False, ids=ids))
        why = body.get("reason")
        return _report_answer(await _desk(request).drop(
            letter_filter, ids=ids, confirmed=_confirmed(body), why=why if isinstance(why, str) else "",
            actor=request[VISITOR].name or "-"))

    return await _answer_action(request, act)


@viewer
async def request_statuses(request: web.Request) -> web.StreamResponse:
    ids = request.query.getall("id", [])
    statuses = await _desk(request).statuses(ids)
    return answer({"requests": [{"requestId": rid, "status": statuses[rid].status, "error": statuses[rid].error,
                                 "supersededFields": statuses[rid].superseded} for rid in ids if rid in statuses]})


@viewer
async def audit(request: web.Request) -> web.StreamResponse:
    try:
        page = parse_page(request.query.get("page"))
    except BadQuery as exc:
        return refuse(request, 400, str(exc))
    total, rows = await _desk(request).audit(page)
    return answer({"total": total, "page": page, "items": [
        {"id": row["id"], "at": row["at"].isoformat(), "actor": row["actor"], "action": row["action"],
         "filters": row["filters"], "requestIds": row["request_ids"], "outcome": row["outcome"]} for row in rows]})
