"""Slow and hostile clients: trickled headers and bodies are cut off, limits answer in the spec's shape,
and hundreds of idle or trickling connections do not slow normal clients down.

Raw sockets (asyncio streams), because a normal HTTP client cannot send a request slowly on purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson
import pytest

from tests.helpers import assert_error_shape, customers_url
from tests.support import Gateway, Stack, unique_user

HEAD = b"POST /api/external/customers HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


async def connect(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gateway.port)


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> tuple[bool, bytes]:
    """(True, what was sent before closing) if the server closes the connection within ``within`` seconds."""
    received = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(4096):
                received += chunk
        return True, received
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received


@pytest.fixture
def slow_stack(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(CLIENT_TIMEOUT=2, KEEPALIVE_TIMEOUT=2)
    stack.start_worker()
    stack.start_gateway()
    return stack




async def test_a_client_trickling_its_headers_is_cut_off_after_client_timeout(slow_stack: Stack) -> None:
    reader, writer = await connect(slow_stack.gateway())
    started = time.monotonic()

    async def trickle() -> None:
        for byte in HEAD:  # one byte every 0.1 s: the head would take 8 s
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    trickler = asyncio.create_task(trickle())
    closed, _ = await closed_by_server(reader, within=6)
    trickler.cancel()
    writer.close()
    assert closed, "the server kept a trickling connection open past CLIENT_TIMEOUT"
    assert 1.5 < time.monotonic() - started < 4.5


async def test_a_body_not_sent_within_client_timeout_gets_408_and_the_connection_closed(slow_stack: Stack) -> None:
    reader, writer = await connect(slow_stack.gateway())
    writer.write(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"userId": "slow"')  # 17 of 100 bytes
    await writer.drain()
    closed, received = await closed_by_server(reader, within=6)
    writer.close()
    assert closed
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), received
    assert_error_shape(orjson.loads(body), status=408)


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(slow_stack: Stack) -> None:
    reader, writer = await connect(slow_stack.gateway())
    body = orjson.dumps({"userId": unique_user("ka")})
    writer.write(HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    assert b"201" in status_line
    closed, _ = await closed_by_server(reader, within=6)  # response rest, then the close
    writer.close()
    assert closed


@pytest.mark.parametrize(
    ("case", "extra_headers"),
    [("a header longer than MAX_HEADER_SIZE", b"X-Long: " + b"a" * 9000 + b"\r\n"),
     ("more headers than MAX_HEADERS", b"".join(b"X-H%d: 1\r\n" % i for i in range(150)))],
)
async def test_oversized_headers_get_400_in_the_spec_error_shape(
    gateway: Gateway, case: str, extra_headers: bytes
) -> None:
    reader, writer = await connect(gateway)
    writer.write(HEAD + extra_headers + b"Content-Length: 2\r\n\r\n{}")
    await writer.drain()
    _, received = await closed_by_server(reader, within=10)
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", (case, received[:200])
    assert b"application/json" in head
    assert_error_shape(orjson.loads(body), status=400)


async def test_hundreds_of_trickling_connections_do_not_slow_normal_clients(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession
) -> None:
    stack = make_stack()  # CLIENT_TIMEOUT at its default (30 s): the tricklers stay for the whole test
    stack.start_worker()
    gateway = stack.start_gateway()
    writers: list[asyncio.StreamWriter] = []
    for _ in range(300):
        _, writer = await connect(gateway)
        writer.write(HEAD[:20])  # a request started and never finished
        writers.append(writer)

    async def keep_trickling() -> None:
        while True:
            for writer in writers:
                writer.write(b"X")  # one more byte of a header name, every second
            await asyncio.sleep(1)

    trickling = asyncio.create_task(keep_trickling())
    url = customers_url(gateway)
    latencies: list[float] = []

    async def normal_client(n: int) -> None:
        for i in range(20):
            started = time.monotonic()
            async with http.post(url, json={"userId": f"{unique_user('normal')}_{n}_{i}", "name": "x"}) as response:
                assert response.status == 201, await response.text()
            latencies.append(time.monotonic() - started)

    try:
        await asyncio.gather(*(normal_client(n) for n in range(10)))  # 200 requests, 10 at a time
    finally:
        trickling.cancel()
        for writer in writers:
            writer.close()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert len(latencies) == 200
    assert p99 < 1.0, f"p99 {p99 * 1000:.0f} ms with 300 trickling connections open"
