"""The dead-letter console (``python -m console``), as its users meet it: in Debian's Chromium, driven by Playwright.

Real everything: the console runs as a subprocess beside a real gateway and worker (``tests.support``) with a
queue prefix of this module's own; its dead letters are made by the poison trigger (``tests.poison``: requests
the database refuses until the trigger is dropped) through the gateway, or published exactly as a worker
publishes them (``publish_dead_letters``). The browser journey — log in, filter, open, reveal, dry run, replay,
outcomes, audit, the viewer's view, a cross-site POST, logout — runs in file order on one set of dead letters;
the screenshots of docs/images are taken on the way (written there with UPDATE_SCREENSHOTS=1). The performance
test puts 10,000 dead letters in the table and times the list and filter pages against the empty-table page of
the same console.

Chromium is Debian's (``apt-get install chromium``, scripts/install_test_tools.sh): no browser is downloaded, and
the browser tests skip where it is missing.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import shutil
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bench.stack import free_port
from console.app import create_app
from console.desk import DESK
from console.keys import (
    check_open_console,
    is_loopback,
    parse_console_keys_file,
    parse_console_keys_variable,
)
from shared.apikeys import key_line, new_key
from shared.settings import READ_BY, Settings
from tests.conftest import fetch_customer, post
from tests.poison import FAST_RETRIES, MAX_ATTEMPTS, PoisonTrigger
from tests.support import ROOT, RUN_ID, Proc, Stack, unique_phone
from tests.test_entry_points import assert_one_line_failure, run
from tests.test_poison_and_replay import (
    api_of,
    envelope_for,
    listed_ids,
    publish_dead_letters,
    send_poison,
    topology_of,
)
from worker.dead_letters import DeadLetter, plain_headers
from worker.deadletter import dead_letter_message
from worker.repository import INSERT_DEAD_LETTER, init_connection

try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright
except ImportError:  # the test extras not installed: the browser tests skip
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
IMAGES = ROOT / "docs" / "images"
OPERATOR, VIEWER = f"ops-{RUN_ID}", f"viewer-{RUN_ID}"
OPERATOR_KEY, VIEWER_KEY = new_key(), new_key()
KEYS = f"{key_line(OPERATOR, OPERATOR_KEY)}:operator,{key_line(VIEWER, VIEWER_KEY)}:viewer"
PAGE_LIMIT_SECONDS = 1.0


# ---- the console process -----------------------------------------------------------------------------------


class Console(Proc):
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{env['CONSOLE_PORT']}"
        super().__init__("console", env, log_path)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"console exited:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/login", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"console not answering after {timeout}s:\n{self.output()}")


_consoles = itertools.count(1)


def start_console(stack: Stack, **env: Any) -> Console:
    console = Console(stack.env(CONSOLE_PORT=free_port(), **env), stack.log_dir / f"console-{next(_consoles)}.log")
    stack.procs.append(console)  # stopped with the stack
    console.wait_ready()
    return console


@pytest.fixture(scope="module")
def console_stack(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway, a worker and — started by the tests — consoles, on a queue prefix of this module's own."""
    stack = Stack(database_url, amqp_url, prefix=f"con{RUN_ID}", log_dir=tmp_path_factory.mktemp("console"),
                  **FAST_RETRIES)
    try:
        stack.start_worker()
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def console(console_stack: Stack) -> Console:
    """The console with an operator's and a viewer's key."""
    return start_console(console_stack, CONSOLE_KEYS=KEYS)


# ---- real dead letters: the poison trigger, through the gateway ------------------------------------------


class Letters:
    """The journey's dead letters: user A's two requests and user B's one."""

    def __init__(self, poison: PoisonTrigger) -> None:
        self.poison = poison
        self.user_a, self.user_b = poison.user(), poison.user()
        self.phone_a, self.phone_b = unique_phone(), unique_phone()
        self.community_b = f"万科城{RUN_ID[:4]}期"
        self.first_a = {"userId": self.user_a, "name": "张三", "phone": self.phone_a, "wechat": "zhangsan_wx88",
                        "community": "翠苑小区", "price_range": "5000-8000"}
        self.second_a = {"userId": self.user_a, "nickname": "小张", "internal_notes": "第二次来访"}
        self.only_b = {"userId": self.user_b, "name": "李四", "phone": self.phone_b, "community": self.community_b}


@pytest.fixture(scope="module")
async def letters(console_stack: Stack, db: asyncpg.Pool, http: aiohttp.ClientSession) -> AsyncIterator[Letters]:
    poison = PoisonTrigger(db)
    await poison.create()
    try:
        made = Letters(poison)
        await send_poison(http, console_stack, made.first_a)
        await send_poison(http, console_stack, made.second_a)
        await send_poison(http, console_stack, made.only_b)
        yield made
    finally:
        await poison.drop()


async def letter_ids(db: asyncpg.Pool, stack: Stack, user: str) -> list[int]:
    rows = await db.fetch("SELECT id FROM dead_letters WHERE queue = $1 AND $2 = ANY(user_ids) ORDER BY id",
                          topology_of(stack).dead_letter_queue, user)
    return [row["id"] for row in rows]


# ---- the browser -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None or CHROMIUM is None:
        pytest.skip("Debian's chromium (and playwright) are needed: scripts/install_test_tools.sh installs them")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def new_context(browser: Browser) -> BrowserContext:
    return await browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-GB")


async def log_in(context: BrowserContext, console: Console, key: str) -> Page:
    page = await context.new_page()
    await page.goto(f"{console.url}/")
    assert "/login" in page.url, page.url  # not logged in: the login page
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{console.url}/")
    return page


@pytest.fixture
async def operator_page(browser: Browser, console: Console) -> AsyncIterator[Page]:
    context = await new_context(browser)
    try:
        yield await log_in(context, console, OPERATOR_KEY)
    finally:
        await context.close()


@pytest.fixture
async def viewer_page(browser: Browser, console: Console) -> AsyncIterator[Page]:
    context = await new_context(browser)
    try:
        yield await log_in(context, console, VIEWER_KEY)
    finally:
        await context.close()


async def filter_by(page: Page, label: str, value: str) -> None:
    """Fill one filter field (the others cleared) and submit the form."""
    for other in ("userId", "reason contains", "field value"):
        await page.get_by_label(other).fill(value if other == label else "")
    async with page.expect_navigation():
        await page.get_by_role("button", name="Filter").click()


async def table_text(page: Page) -> str:
    return await page.locator("main").inner_text()


def masked(phone: str) -> str:
    return f"{phone[:3]}****{phone[-4:]}"


async def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """The docs' screenshots: written to docs/images with UPDATE_SCREENSHOTS=1, else to the test's own folder (so a
    test run leaves the work tree as it was)."""
    folder = IMAGES if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    await page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


# ---- the browser journey (in file order) --------------------------------------------------------------------


async def test_operator_logs_in_and_sees_every_dead_letter_newest_first_with_the_total(
    operator_page: Page, letters: Letters, tmp_path: Path,
) -> None:
    page = operator_page
    await page.wait_for_selector("#total")

    assert "3 dead letters" in await page.locator("#total").inner_text()
    users = await page.locator("table.letters tbody tr td:nth-child(2)").all_inner_texts()
    assert users == [letters.user_b, letters.user_a, letters.user_a]  # newest first
    reasons = await page.locator("table.letters tbody tr td.reason").all_inner_texts()
    assert all("test trigger refuses" in reason for reason in reasons), reasons
    attempts = await page.locator("table.letters tbody tr td.num").all_inner_texts()
    assert attempts == [str(MAX_ATTEMPTS)] * 3
    await screenshot(page, "console-list.png", tmp_path)


async def test_filter_by_user_id_shows_only_that_users_dead_letters(operator_page: Page, letters: Letters) -> None:
    page = operator_page
    await filter_by(page, "userId", letters.user_a)

    assert "2 dead letters matching" in await page.locator("#total").inner_text()
    users = await page.locator("table.letters tbody tr td:nth-child(2)").all_inner_texts()
    assert users == [letters.user_a, letters.user_a]


async def test_filter_by_q_matches_a_whole_field_value_and_shows_it_masked(
    operator_page: Page, letters: Letters,
) -> None:
    page = operator_page
    found = {}
    shown = {}
    for value in (letters.phone_b, letters.community_b, letters.phone_b[:7], "zhangsan_wx88"):
        await filter_by(page, "field value", value)
        found[value] = await page.locator("table.letters tbody tr td:nth-child(2)").all_inner_texts()
        shown[value] = await page.locator("table.letters tbody tr td.matched").all_inner_texts()
        assert letters.phone_b not in await page.locator("table.letters").inner_text()

    assert found[letters.phone_b] == [letters.user_b]
    assert found[letters.community_b] == [letters.user_b]  # Chinese text, whole value
    assert found[letters.phone_b[:7]] == []  # a part of a value is not a match
    assert found["zhangsan_wx88"] == [letters.user_a]
    assert shown[letters.phone_b] == [f"phone={masked(letters.phone_b)}"]  # the match, masked
    assert shown["zhangsan_wx88"] == ["wechat=zh*********88"]


async def test_a_dead_letters_page_shows_the_request_masked_and_its_failures(
    operator_page: Page, letters: Letters, tmp_path: Path,
) -> None:
    page = operator_page
    await filter_by(page, "userId", letters.user_b)
    await page.locator("table.letters tbody tr td a").first.click()
    await page.wait_for_url("**/letters/*")
    text = await table_text(page)

    assert masked(letters.phone_b) in text
    assert letters.phone_b not in await page.content()
    assert "李*" in text and "李四" not in text
    assert letters.community_b in text  # not personal data: shown as it is
    assert "test trigger refuses" in text and "first failure" in text and "last failure" in text
    assert "GET /api/external/requests/" in text and "failed" in text  # its status now, and the link
    await screenshot(page, "console-detail.png", tmp_path)


async def test_an_operator_may_reveal_one_letter_and_the_reveal_is_audited(
    operator_page: Page, console: Console, letters: Letters, console_stack: Stack, db: asyncpg.Pool,
) -> None:
    page = operator_page
    [letter_id] = await letter_ids(db, console_stack, letters.user_b)
    await page.goto(f"{console.url}/letters/{letter_id}")
    await page.locator("#reveal").click()
    await page.wait_for_url(f"**/letters/{letter_id}/reveal")
    text = await table_text(page)

    assert letters.phone_b in text and "李四" in text
    audit = await db.fetch("SELECT actor, action, request_ids FROM dead_letter_audit WHERE actor = $1 AND "
                           "action = 'reveal'", OPERATOR)
    assert len(audit) == 1 and audit[0]["request_ids"], audit


async def test_dry_run_then_replay_all_matching_shows_the_plan_the_count_and_the_outcomes(
    operator_page: Page, letters: Letters, console_stack: Stack, db: asyncpg.Pool, http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    await letters.poison.drop()  # the cause is fixed
    # A newer write for user A: its name must survive the replay (the stamps decide).
    status, body = await post(http, api_of(console_stack), {"userId": letters.user_a, "name": "王五"})
    assert status == 201, body
    page = operator_page
    await filter_by(page, "userId", letters.user_a)
    await page.locator("#replay-matching").click()
    await page.wait_for_url("**/replay?*")
    plan = await page.locator("table.plan").inner_text()

    assert "2 dead letters would be replayed" in await page.locator("#dry-run-count").inner_text()
    assert "a newer write holds name (kept)" in plan
    assert "sets" in plan and masked(letters.phone_a) in plan and letters.phone_a not in plan
    assert "nickname=小张" in plan
    await screenshot(page, "console-dry-run.png", tmp_path)
    assert await fetch_customer(db, letters.user_a) is not None
    assert (await fetch_customer(db, letters.user_a) or {})["phone"] is None  # the dry run changed nothing

    await page.locator("#confirm-replay").click()
    await page.wait_for_url("**/audit/*")
    await page.locator("#statuses[data-settled=yes]").wait_for(timeout=20_000)  # htmx polls until applied
    outcomes = await page.locator("table.outcomes").inner_text()

    assert outcomes.count("updated") == 2, outcomes
    assert "a newer write holds name" in outcomes
    row = await fetch_customer(db, letters.user_a)
    assert row is not None and (row["name"], row["phone"], row["nickname"]) == ("王五", letters.phone_a, "小张")
    assert await letter_ids(db, console_stack, letters.user_a) == []


async def test_the_audit_page_lists_the_replay_and_the_reveal_by_key_name(operator_page: Page) -> None:
    page = operator_page
    await page.get_by_role("link", name="Audit").first.click()
    await page.wait_for_url("**/audit")
    rows = await page.locator("table.audit tbody tr").all_inner_texts()

    mine = [row for row in rows if OPERATOR in row]
    assert any("replay" in row and "userId=" in row and "replayed 2, skipped 0, failed 0" in row for row in mine), rows
    assert any("reveal" in row for row in mine), rows


async def test_a_viewer_sees_no_replay_or_drop_controls_and_gets_403_from_the_api(
    viewer_page: Page, console: Console, letters: Letters, console_stack: Stack, db: asyncpg.Pool,
) -> None:
    page = viewer_page
    [letter_id] = await letter_ids(db, console_stack, letters.user_b)
    assert await page.locator("#total").count() == 1
    assert await page.locator("#replay-matching").count() == 0
    await page.goto(f"{console.url}/letters/{letter_id}")
    for control in ("#reveal", "#replay-one", "#drop-one"):
        assert await page.locator(control).count() == 0, control
    token = await page.locator("input[name=csrf]").first.input_value()

    listed = await page.request.get(f"{console.url}/api/dead-letters?userId={letters.user_b}")
    by_cookie = await page.request.post(f"{console.url}/api/dead-letters/replay", headers={"X-CSRF-Token": token},
                                        data={"ids": [letter_id]})
    by_key = await page.request.post(f"{console.url}/api/dead-letters/drop", data={"ids": [letter_id], "reason": "x"},
                                     headers={"Authorization": f"Bearer {VIEWER_KEY}"})
    page_post = await page.request.post(f"{console.url}/letters/{letter_id}/drop",
                                        form={"csrf": token, "reason": "viewer tries"})

    assert listed.status == 200 and (await listed.json())["total"] == 1
    assert by_cookie.status == 403 and "operator" in (await by_cookie.json())["message"]
    assert by_key.status == 403
    assert page_post.status == 403
    assert await letter_ids(db, console_stack, letters.user_b) == [letter_id]


async def test_a_cross_site_post_is_refused(
    operator_page: Page, console: Console, letters: Letters, console_stack: Stack, db: asyncpg.Pool,
) -> None:
    [letter_id] = await letter_ids(db, console_stack, letters.user_b)
    # Another site (another port: another origin) whose page posts a drop to the console, with the operator's
    # cookie in the browser.
    evil = web.Application()
    form = (f'<form method="post" action="{console.url}/letters/{letter_id}/drop">'
            '<input name="csrf" value="guessed"><input name="reason" value="evil">'
            '<button id="go">win a prize</button></form>')

    async def evil_page(_: web.Request) -> web.Response:
        return web.Response(text=form, content_type="text/html")

    evil.router.add_get("/", evil_page)
    runner = web.AppRunner(evil)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    page = operator_page
    token = await page.locator("input[name=csrf]").first.input_value()
    try:
        await page.goto(f"http://127.0.0.1:{port}/")
        async with page.expect_response(lambda response: "/drop" in response.url) as refused:
            await page.locator("#go").click()
        # Even with the right token, a request saying it comes from elsewhere is refused.
        with_token = await page.request.post(
            f"{console.url}/api/dead-letters/drop", data={"ids": [letter_id], "reason": "evil"},
            headers={"X-CSRF-Token": token, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    finally:
        await runner.cleanup()

    assert (await refused.value).status == 403
    assert "cross-site" in await page.locator("main").inner_text()
    assert with_token.status == 403 and "cross-site" in (await with_token.json())["message"]
    assert await letter_ids(db, console_stack, letters.user_b) == [letter_id]


async def test_logout_ends_the_session(browser: Browser, console: Console, letters: Letters) -> None:
    context = await new_context(browser)
    try:
        page = await log_in(context, console, OPERATOR_KEY)
        cookies = await context.cookies()
        await page.get_by_role("button", name="Log out").click()
        await page.wait_for_url("**/login")
        await page.goto(f"{console.url}/")
        after_logout = page.url
    finally:
        await context.close()
    # The old cookie, kept by someone: no longer a session.
    replayed = await new_context(browser)
    try:
        await replayed.add_cookies(cookies)  # type: ignore[arg-type]
        page = await replayed.new_page()
        await page.goto(f"{console.url}/")
        with_old_cookie = page.url
    finally:
        await replayed.close()

    assert "/login" in after_logout
    assert "/login" in with_old_cookie


async def test_session_cookie_is_httponly_samesite_strict_and_signed(browser: Browser, console: Console) -> None:
    context = await new_context(browser)
    try:
        await log_in(context, console, OPERATOR_KEY)
        [cookie] = await context.cookies()
        await context.clear_cookies()
        forged = "AAAA" if not cookie["value"].endswith("AAAA") else "BBBB"
        await context.add_cookies([{"name": cookie["name"], "value": cookie["value"][:-4] + forged,
                                    "url": console.url}])
        page = await context.new_page()
        await page.goto(f"{console.url}/")
        tampered = page.url
    finally:
        await context.close()

    assert cookie.get("httpOnly") is True and cookie.get("sameSite") == "Strict", cookie
    assert cookie.get("secure") is False  # CONSOLE_SECURE_COOKIE is off here
    assert "/login" in tampered


# ---- the JSON API with a key (scripts) -----------------------------------------------------------------------


async def test_api_with_an_operator_key_lists_dry_runs_and_drops_with_a_reason(
    console: Console, console_stack: Stack, db: asyncpg.Pool, http: aiohttp.ClientSession,
) -> None:
    user = f"api_{RUN_ID}"
    envelopes = [envelope_for(user, nickname=f"n{i}", phone=unique_phone()) for i in range(3)]
    await publish_dead_letters(console_stack, envelopes, reason="schema drift in column nickname")
    auth = {"Authorization": f"Bearer {OPERATOR_KEY}"}

    async def call(method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        async with http.request(method, f"{console.url}{path}", json=body, headers=auth) as response:
            return response.status, await response.json()

    listed = await call("GET", f"/api/dead-letters?userId={user}&reason=SCHEMA+DRIFT")
    mine = {"userId": user}
    dry = await call("POST", "/api/dead-letters/drop", {"filter": mine, "dryRun": True})
    everything = await call("POST", "/api/dead-letters/drop", {"reason": "no selection"})
    no_reason = await call("POST", "/api/dead-letters/drop", {"filter": mine})
    changed = await call("POST", "/api/dead-letters/drop", {"filter": mine, "reason": "r", "confirmed": 2})
    dropped = await call("POST", "/api/dead-letters/drop", {"filter": mine, "reason": "test data", "confirmed": 3})

    assert listed[0] == 200 and listed[1]["total"] == 3, listed
    assert [item["requestId"] for item in listed[1]["items"]] == [e.request_id for e in reversed(envelopes)]
    assert "****" in listed[1]["items"][0]["payload"]["phone"]
    assert dry[0] == 200 and dry[1]["total"] == 3 and dry[1]["first"][0]["plan"][0]["createsCustomer"], dry
    assert everything[0] == 400 and "say which" in everything[1]["message"]
    assert no_reason[0] == 400 and "reason is required" in no_reason[1]["message"]
    assert changed[0] == 409
    assert dropped[0] == 200 and dropped[1]["dropped"] == 3, dropped
    audit = await db.fetchrow("SELECT actor, action, outcome, filters FROM dead_letter_audit WHERE id = $1",
                              dropped[1]["auditId"])
    assert (audit["actor"], audit["action"], audit["outcome"]) == (OPERATOR, "drop", "dropped 3: test data")
    assert await letter_ids(db, console_stack, user) == []


async def test_api_without_a_session_or_key_is_401(console: Console, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{console.url}/api/dead-letters") as response:
        status, body = response.status, await response.json()
    async with http.get(f"{console.url}/api/dead-letters", headers={"Authorization": "Bearer wrong"}) as response:
        wrong = response.status

    assert (status, body["error"]) == (401, "unauthorized")
    assert wrong == 401


async def test_the_replay_tool_selects_with_the_same_filters_as_the_console(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession,
) -> None:
    stack = make_stack()
    phone, user = unique_phone(), f"same_{RUN_ID}"
    envelopes = [envelope_for(user, phone=phone), envelope_for(user, nickname="x"), envelope_for(f"other_{RUN_ID}")]
    await publish_dead_letters(stack, envelopes, reason="Deadlock detected")
    console = start_console(stack)

    by_tool = {args: await listed_ids(stack, *args) for args in
               (("--q", phone), ("--user-id", user), ("--reason", "deadlock"), ("--q", phone[:6]))}
    by_console = {}
    for args in by_tool:
        name = {"--q": "q", "--user-id": "userId", "--reason": "reason"}[args[0]]
        async with http.get(f"{console.url}/api/dead-letters", params={name: args[1]}) as response:
            by_console[args] = [item["requestId"] for item in reversed((await response.json())["items"])]

    assert by_tool == by_console
    assert by_tool[("--q", phone)] == [envelopes[0].request_id]
    assert by_tool[("--user-id", user)] == [envelopes[0].request_id, envelopes[1].request_id]
    assert len(by_tool[("--reason", "deadlock")]) == 3 and by_tool[("--q", phone[:6])] == []


async def test_an_outage_mid_request_is_a_503_saying_so_not_a_crash(database_url: str, amqp_url: str) -> None:
    settings = Settings(database_url=database_url, amqp_url=amqp_url, amqp_prefix=f"out{RUN_ID}", shard_count=8)
    app = create_app(settings, parse_console_keys_variable(""), "a test secret")
    async with TestClient(TestServer(app)) as client:
        await app[DESK].pool.close()  # as if PostgreSQL went away
        async with client.get("/") as response:
            page = response.status, await response.text()
        async with client.get("/api/dead-letters") as response:
            api = response.status, await response.json()

    assert page[0] == 503 and "cannot be reached right now" in page[1]
    assert api == (503, {"error": "unavailable", "message": api[1]["message"]})


# ---- browsing changes nothing in the broker ------------------------------------------------------------------


async def test_browsing_moves_the_queue_into_the_table_once_and_reads_the_same_order_every_time(
    make_stack: Callable[..., Stack], db: asyncpg.Pool, http: aiohttp.ClientSession,
) -> None:
    stack = make_stack()
    envelopes = [envelope_for(f"browse_{RUN_ID}_{i}", nickname=f"n{i}") for i in range(12)]
    await publish_dead_letters(stack, envelopes)
    console = start_console(stack)  # no keys, loopback: open

    pages = []
    for _ in range(3):
        async with http.get(f"{console.url}/api/dead-letters") as response:
            pages.append([item["requestId"] for item in (await response.json())["items"]])
    queue_depth = await dead_letter_queue_depth(stack)

    assert pages == [[e.request_id for e in reversed(envelopes)]] * 3
    assert queue_depth == 0  # moved into PostgreSQL: no message left to count deliveries on
    stored = await db.fetchval("SELECT count(*) FROM dead_letters WHERE queue = $1",
                               topology_of(stack).dead_letter_queue)
    assert stored == 12


async def dead_letter_queue_depth(stack: Stack) -> int:
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await topology_of(stack).declare_dead_letter_queue(channel)
        return int(queue.declaration_result.message_count or 0)


# ---- 10,000 dead letters -------------------------------------------------------------------------------------

LETTERS = 10_000
REASONS = ("test trigger refuses %s", "deadlock detected", "value too long for type character varying(64)",
           "payload fails the request schema: 1 error(s)", "could not serialize access")
COMMUNITIES = [f"{name}{n}期" for name in ("万科城", "翠苑", "星河湾", "保利花园", "碧桂园") for n in range(1, 11)]


def bulk_rows(queue: str, now: dt.datetime) -> list[tuple[Any, ...]]:
    """10,000 dead letters as a worker writes them and the console moves them in (``INSERT_DEAD_LETTER``'s
    arguments): 1,000 users with 10 each, a phone each, 50 communities, 5 reasons."""
    rows = []
    for i in range(LETTERS):
        user = f"perf_{RUN_ID}_{i % 1000}"
        envelope = envelope_for(user, name=f"客户{i}", phone=f"139{i:08d}", community=COMMUNITIES[i % 50],
                                nickname=f"nick{i}")
        dead_at = now - dt.timedelta(seconds=LETTERS - i)
        message = dead_letter_message(
            envelope.to_json(), error=RuntimeError(REASONS[i % 5].replace("%s", user)), attempts=5,
            first_failure=dead_at, last_failure=dead_at, routing_key=f"shard.{i % 8}",
            request_id=envelope.request_id, user_id=user)
        headers = plain_headers({**(message.headers or {}), "x-dead-at": dead_at.isoformat()})
        letter = DeadLetter.read(0, message.body, headers)
        search = letter.search_columns()
        rows.append((queue, uuid.uuid4().hex, letter.request_id, letter.user_id, letter.reason, headers,
                     message.body, search["dead_at"], search["user_ids"], search["request_ids"],
                     search["field_values"]))
    return rows


async def timed_get(http: aiohttp.ClientSession, url: str, times: int = 3) -> tuple[float, str]:
    """The slowest of ``times`` answers, in seconds, and the last body."""
    took, body = [], ""
    for _ in range(times):
        started = time.perf_counter()
        async with http.get(url) as response:
            body = await response.text()
            assert response.status == 200, body[:500]
        took.append(time.perf_counter() - started)
    return max(took), body


async def test_list_and_filter_pages_answer_within_a_second_with_10000_dead_letters(
    make_stack: Callable[..., Stack], database_url: str, http: aiohttp.ClientSession,
) -> None:
    stack = make_stack()
    console = start_console(stack)
    queue = topology_of(stack).dead_letter_queue
    baseline, _ = await timed_get(http, f"{console.url}/")

    rows = bulk_rows(queue, dt.datetime.now(dt.UTC))
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        started = time.perf_counter()
        await conn.executemany(INSERT_DEAD_LETTER, rows)
        inserted = time.perf_counter() - started
        await conn.execute("ANALYZE dead_letters")
    finally:
        await conn.close()

    user, phone, community = f"perf_{RUN_ID}_421", "13900004242", COMMUNITIES[7]
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=600)).strftime("%Y-%m-%dT%H:%M:%S")
    pages = {
        "list, page 1": "/",
        "list, last page (200)": "/?page=200",
        "userId": f"/?userId={user}",
        "q = a phone": f"/?q={phone}",
        "q = a community (1 in 50)": f"/?q={urllib.parse.quote(community)}",
        "reason substring": "/?reason=deadlock",
        "since (last 10 min)": f"/?since={since}",
        "userId + reason + q": f"/?userId={user}&reason=trigger&q={urllib.parse.quote(COMMUNITIES[21])}",
        "API: q = a phone": f"/api/dead-letters?q={phone}",
        "dry run, reason (2,000 match)": "/replay?reason=deadlock",
    }
    timings = {}
    for name, path in pages.items():
        timings[name], body = await timed_get(http, f"{console.url}{path}")
        if name == "q = a phone":
            table = body[body.index("<table"):]
            assert "<strong>1</strong> dead letter matching" in body and f"phone={masked(phone)}" in table
            assert phone not in table
        if name == "list, page 1":
            assert "<strong>10000</strong> dead letters" in body
        if name == "reason substring":
            assert "<strong>2000</strong> dead letters matching" in body

    print(f"\n10,000 dead letters inserted in {inserted:.2f} s; the empty-table page took {baseline * 1000:.1f} ms")
    for name, seconds in timings.items():
        print(f"  {name:32} {seconds * 1000:7.1f} ms  ({seconds / baseline:5.1f}x the empty-table page)")
    print(f"  median {statistics.median(timings.values()) * 1000:.1f} ms")
    slow = {name: seconds for name, seconds in timings.items() if seconds >= PAGE_LIMIT_SECONDS}
    assert not slow, slow


# ---- start-up, as for every entry point ------------------------------------------------------------------


def console_env(database_url: str, amqp_url: str, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": database_url, "AMQP_URL": amqp_url,
            "AMQP_PREFIX": f"cs{RUN_ID}", "CONSOLE_PORT": str(free_port()), **extra}


async def test_console_help_lists_the_settings_it_reads(database_url: str, amqp_url: str) -> None:
    result = await run("console", "--help", env=console_env(database_url, amqp_url), limit=30)

    assert result.code == 0, result
    assert result.stdout.startswith("usage: python -m console"), result
    for name in Settings.model_fields:
        assert (f"\n  {name.upper()} " in result.stdout) == (name in READ_BY["console"]), name
    assert "python -m gateway.keys new" in result.stdout


async def test_console_without_keys_on_a_non_loopback_address_refuses_to_start(
    database_url: str, amqp_url: str,
) -> None:
    result = await run("console", env=console_env(database_url, amqp_url, CONSOLE_HOST="0.0.0.0"), limit=30)

    assert_one_line_failure(result, "CONSOLE_HOST=0.0.0.0 is not a loopback address", "CONSOLE_KEYS")


async def test_console_key_without_a_role_is_named_by_its_position_not_shown(
    database_url: str, amqp_url: str,
) -> None:
    secret = new_key()
    result = await run("console", env=console_env(database_url, amqp_url, CONSOLE_KEYS=key_line("alice", secret)),
                       limit=30)

    assert_one_line_failure(result, "CONSOLE_KEYS: entry 1", "role viewer or operator")
    assert key_line("alice", secret).split(":")[1] not in result.stderr


async def test_console_with_an_unreachable_database_is_one_line(database_url: str, amqp_url: str) -> None:
    result = await run("console", env=console_env("postgresql://postgres:s3cretPW@127.0.0.1:1/crm", amqp_url),
                       limit=30)

    assert_one_line_failure(result, "PostgreSQL", "127.0.0.1:1")


# ---- console keys: pure rules ----------------------------------------------------------------------------


def sha(key: str) -> str:
    return key_line("x", key).split(":")[1]


def test_console_keys_are_name_sha256_and_role_lines() -> None:
    keys = parse_console_keys_file(f"# ops\nalice:{sha('ka')}:operator\n\nbob:{sha('kb')}:viewer  # read only\n"
                                   f"alice:{sha('ka2')}:operator\n")

    assert keys.find("ka") == ("alice", "operator")
    assert keys.find("ka2") == ("alice", "operator")  # a rotation: two keys, one name
    assert keys.find("kb") == ("bob", "viewer")
    assert keys.find("kc") is None
    assert keys.role_of("bob") == "viewer" and keys.role_of("carol") is None


@pytest.mark.parametrize(("value", "message"), [
    (f"alice:{sha('k')}", "entry 1: expected name:sha256hex:role"),
    (f"alice:{sha('k')}:admin", "entry 1: expected name:sha256hex:role"),
    (f"alice:{sha('k')}:operator,alice:{sha('k2')}:viewer", "entry 2: key name 'alice' has another role on entry 1"),
    (f"alice:{sha('k')}:operator,bob:{sha('k')}:viewer", "entry 2: the same key hash as entry 1"),
    ("alice:notahash:operator", "entry 1: the second field must be the key's SHA-256"),
])
def test_bad_console_keys_are_named_by_position(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_console_keys_variable(value)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
    ("10.1.2.3", False), ("::", False), ("console.internal", False),
])
def test_only_loopback_addresses_may_run_without_keys(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        check_open_console(host, parse_console_keys_variable(""))
    else:
        with pytest.raises(ValueError, match="not a loopback address"):
            check_open_console(host, parse_console_keys_variable(""))
    check_open_console(host, parse_console_keys_variable(f"a:{sha('k')}:viewer"))  # keys: any address


def test_an_empty_console_secret_is_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSOLE_SECRET", "")
    assert Settings().console_secret is None


def test_compose_console_uses_the_replay_role_and_user_on_loopback_with_keys() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    console, replay = compose["services"]["console"], compose["services"]["replay"]

    assert console["command"] == ["python", "-m", "console"]
    for name in ("DATABASE_URL", "AMQP_URL"):
        assert console["environment"][name] == replay["environment"][name], name
    assert console["ports"] == ["127.0.0.1:${CONSOLE_HOST_PORT:-8090}:8090"]  # published on loopback only
    assert {"CONSOLE_KEYS", "CONSOLE_KEYS_FILE"} <= console["environment"].keys()


def test_the_image_has_the_console_package() -> None:
    """compose's console service runs the app image: the package (with its templates and htmx) must be in it."""
    copied = [line.split()[1] for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
              if line.startswith("COPY ")]
    assert "console/" in copied


def test_the_console_ships_htmx_and_loads_nothing_from_elsewhere() -> None:
    static = ROOT / "console" / "static"
    assert (static / "htmx.min.js").read_text(encoding="utf-8").startswith("var htmx=")
    for template in (ROOT / "console" / "templates").glob("*.html"):
        text = template.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, template.name

