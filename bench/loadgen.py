"""``python -m bench.loadgen``: an async HTTP load generator for ``POST /api/external/customers``.

Two modes:
* ``steady``: ``--connections`` keep-alive connections, each sending its next request as soon as the previous
  one is answered, for ``--duration`` seconds (closed loop, like wrk);
* ``burst``: ``--requests`` requests in total over ``--connections`` connections, as fast as possible.

The workload is a mix of creates and updates over ``--users`` users picked at random: a user's first request
carries a full profile (with a phone unique to that user), later ones update one to four random fields.

The default client (``--client raw``) writes pre-built HTTP/1.1 requests on plain asyncio transports (uvloop
when installed) and only parses the status line and Content-Length of the answer: about a third of the CPU per
request of an aiohttp ``ClientSession`` (``--client aiohttp``), so on a 2-core box it takes as little as
possible from the server under test. The JSON result includes the generator's own CPU use.

The result (stdout, one JSON object): throughput, latency percentiles, counts by status, errors (non-2xx
answers and exceptions; 202 is counted apart as ``accepted``), and the number of distinct users sent.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson

PATH: Final = "/api/external/customers"
COMMUNITIES: Final = ("万科城", "华润城", "碧桂园", "保利花园", "龙湖天街", "招商花园城")
BUSINESS_TYPES: Final = ("whole_rent", "shared_rent", "centralized")
ROOM_TYPES: Final = ("one_bedroom", "two_bedroom", "three_bedroom", "four_plus", "master_room", "second_room")
CHANNELS: Final = ("xianyu", "xiaohongshu", "beike", "58tongcheng", "shipinhao", "douyin", "referral")
TAGS: Final = ("loft", "two_bath", "balcony", "south", "metro", "pets_ok")


class Workload:
    """The request bodies: first request of a user creates it, the next ones update random fields."""

    def __init__(self, users: int, tag: str, seed: int) -> None:
        self.users = users
        self.tag = tag
        # The same seed gives the same sequence of users and bodies: A and B of a round see the same load.
        self.rng = random.Random(seed)
        # Phones are 13xxxxxxxxx: user i gets (base + i) mod 10^9, unique per user, and per tag across runs.
        self.phone_base = zlib.crc32(tag.encode()) % 1_000_000_000
        self.seen: set[int] = set()

    def user_id(self, index: int) -> str:
        return f"{self.tag}-{index}"

    def phone(self, index: int) -> str:
        return f"13{(self.phone_base + index) % 1_000_000_000:09d}"

    def next_body(self) -> bytes:
        index = self.rng.randrange(self.users)
        if index not in self.seen:
            self.seen.add(index)
            return orjson.dumps(self._create(index))
        return orjson.dumps(self._update(index))

    def _create(self, index: int) -> dict[str, Any]:
        rng = self.rng
        low = rng.randrange(1000, 9000, 100)
        return {
            "userId": self.user_id(index),
            "botId": f"bot_{index % 50:03d}",
            "nickname": f"客户{index}",
            "name": f"张{index}",
            "phone": self.phone(index),
            "wechat": f"wx_{self.tag}_{index}",
            "status": 1,
            "community": rng.choice(COMMUNITIES),
            "business_type": rng.choice(BUSINESS_TYPES),
            "room_type": rng.choice(ROOM_TYPES),
            "room_tags": orjson.dumps(rng.sample(TAGS, 2)).decode(),
            "move_in_date": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "lease_period": rng.choice((6, 12, 24)),
            "price_range": f"{low}-{low + 2000}",
            "source_channel": rng.choice(CHANNELS),
            "creator": "bench",
            "internal_notes": "created by bench.loadgen",
        }

    def _update(self, index: int) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"userId": self.user_id(index)}
        choices: dict[str, Callable[[], Any]] = {
            "status": lambda: rng.randint(1, 5),
            "community": lambda: rng.choice(COMMUNITIES),
            "room_type": lambda: rng.choice(ROOM_TYPES),
            "room_tags": lambda: orjson.dumps(rng.sample(TAGS, rng.randint(1, 3))).decode(),
            "move_in_date": lambda: f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "lease_period": lambda: rng.randint(1, 36),
            "price_range": lambda: f"{rng.randrange(1000, 5000, 100)}-{rng.randrange(5000, 12000, 100)}",
            "internal_notes": lambda: f"update {rng.randrange(1_000_000)}",
        }
        for name in rng.sample(sorted(choices), rng.randint(1, 4)):
            body[name] = choices[name]()
        return body


@dataclass
class Recorder:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)

    def answer(self, status: int, started: float) -> None:
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.statuses[status] += 1

    def failure(self, exc: BaseException) -> None:
        self.exceptions[type(exc).__name__] += 1


# --- the raw HTTP/1.1 client ------------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time, answers parsed just enough."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self.buffer[:head_end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            waiter.set_exception(ValueError("answer without Content-Length"))
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
        total = head_end + 4 + length
        if len(self.buffer) < total:
            return
        del self.buffer[:total]
        if b"\r\nconnection: close" in head and self.transport is not None:
            self.transport.close()
        waiter.set_result(int(head[9:12]))

    async def request(self, payload: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    authority: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        return cls(host, port, parts.netloc)

    def request_bytes(self, body: bytes) -> bytes:
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {self.authority}\r\nContent-Type: application/json\r\n"
            f"User-Agent: crm-bench/1.0\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


async def raw_connection_loop(
    target: Target, next_body: Callable[[], bytes | None], recorder: Recorder, request_timeout: float
) -> None:
    loop = asyncio.get_running_loop()
    conn: HttpConnection | None = None
    try:
        while (body := next_body()) is not None:
            started = time.perf_counter()
            try:
                if conn is None or conn.closed:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(HttpConnection, target.host, target.port), request_timeout
                    )
                assert conn is not None
                status = await asyncio.wait_for(conn.request(target.request_bytes(body)), request_timeout)
            except (OSError, TimeoutError, ValueError) as exc:
                recorder.failure(exc)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            recorder.answer(status, started)
    finally:
        if conn is not None:
            conn.close()


async def aiohttp_loops(
    url: str, connections: int, next_body: Callable[[], bytes | None], recorder: Recorder, request_timeout: float
) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    headers = {"Content-Type": "application/json", "User-Agent": "crm-bench/1.0"}
    endpoint = url.rstrip("/") + PATH
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def loop_one() -> None:
            while (body := next_body()) is not None:
                started = time.perf_counter()
                try:
                    async with session.post(endpoint, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    recorder.failure(exc)
                    continue
                recorder.answer(status, started)

        await asyncio.gather(*(loop_one() for _ in range(connections)))


# --- the run ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    url: str
    mode: str = "steady"
    connections: int = 64
    duration: float = 10.0
    requests: int = 20_000
    users: int = 5_000
    tag: str = "bench"
    seed: int = 1
    client: str = "raw"
    timeout: float = 30.0


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


async def run_load(config: LoadConfig) -> dict[str, Any]:
    workload = Workload(config.users, config.tag, config.seed)
    recorder = Recorder()
    issued = 0
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    deadline = wall_start + config.duration

    def next_body() -> bytes | None:
        nonlocal issued
        if config.mode == "burst":
            if issued >= config.requests:
                return None
        elif time.perf_counter() >= deadline:
            return None
        issued += 1
        return workload.next_body()

    if config.client == "aiohttp":
        await aiohttp_loops(config.url, config.connections, next_body, recorder, config.timeout)
    else:
        target = Target.parse(config.url)
        await asyncio.gather(
            *(raw_connection_loop(target, next_body, recorder, config.timeout) for _ in range(config.connections))
        )
    elapsed = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start

    latencies = sorted(recorder.latencies_ms)
    answered = sum(recorder.statuses.values())
    accepted = recorder.statuses.get(202, 0)
    ok = sum(n for status, n in recorder.statuses.items() if 200 <= status < 300 and status != 202)
    failed = sum(recorder.exceptions.values())
    return {
        "mode": config.mode,
        "url": config.url,
        "client": config.client,
        "connections": config.connections,
        "users": config.users,
        "tag": config.tag,
        "elapsed_s": round(elapsed, 3),
        "requests": issued,
        "answered": answered,
        "throughput_rps": round(answered / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50), 2),
            "p95": round(percentile(latencies, 0.95), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(latencies[-1], 2) if latencies else 0.0,
            "mean": round(sum(latencies) / len(latencies), 2) if latencies else 0.0,
        },
        "status_counts": {str(status): n for status, n in sorted(recorder.statuses.items())},
        "ok": ok,
        "accepted": accepted,
        "errors": answered - ok - accepted + failed,
        "exceptions": dict(recorder.exceptions),
        "users_touched": len(workload.seen),
        "client_cpu_s": round(cpu, 3),
        "client_cpu_pct": round(100 * cpu / elapsed, 1) if elapsed > 0 else 0.0,
    }


def summary_line(result: dict[str, Any]) -> str:
    lat = result["latency_ms"]
    return (
        f"{result['mode']} {result['url']} c={result['connections']}: {result['answered']} answers in "
        f"{result['elapsed_s']}s = {result['throughput_rps']} req/s, p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"p99 {lat['p99']} ms, statuses {result['status_counts']}, errors {result['errors']} "
        f"{result['exceptions'] or ''}, client CPU {result['client_cpu_pct']}%"
    )


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="base URL of the server under test")
    parser.add_argument("--mode", choices=("steady", "burst"), default="steady")
    parser.add_argument("--connections", "-c", type=int, default=64)
    parser.add_argument("--duration", "-d", type=float, default=10.0, help="steady mode: seconds")
    parser.add_argument("--requests", "-n", type=int, default=20_000, help="burst mode: requests in total")
    parser.add_argument("--users", type=int, default=5_000, help="distinct userIds the requests spread over")
    parser.add_argument("--tag", default="bench", help="userId prefix (userIds are <tag>-<n>)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request before an error")
    args = parser.parse_args(argv)
    return LoadConfig(
        url=args.url, mode=args.mode, connections=args.connections, duration=args.duration,
        requests=args.requests, users=args.users, tag=args.tag, seed=args.seed, client=args.client,
        timeout=args.timeout,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(run_load(config))
    else:
        result = uvloop.run(run_load(config))
    print(summary_line(result), file=sys.stderr)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
