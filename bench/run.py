"""``python -m bench.run``: pipeline vs direct-write baseline, measured alternately by the same generator.

One command: a fresh database and RabbitMQ vhost, 1 gateway + N workers + the baseline server, a warm-up of
each, then ``--rounds`` rounds of "pipeline run, baseline run" (A B A B …) with the tables truncated before
every run. Prints every run, the medians and the ratio pipeline/baseline; ``--burst`` adds the 20,000-request
burst with its storage check, ``--soak SECONDS`` a long pipeline run with the RSS of gateway and workers.
Results go to ``bench/results/<time>-<id>.json``. Everything started is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.stack import (
    BenchStack,
    cpu_seconds,
    machine_busy_seconds,
    rabbitmq_pids,
    rss_kib,
)
from shared.brokers import connect_once
from shared.settings import CONNECT_TIMEOUT, Settings
from shared.topology import Topology

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = ("pipeline", "baseline")


@dataclass(frozen=True)
class Options:
    workers: int = 1
    rounds: int = 3
    duration: float = 10.0
    warmup: float = 3.0
    connections: int = 64
    users: int = 5_000
    client: str = "raw"
    burst: bool = False
    burst_requests: int = 20_000
    burst_connections: int = 500
    soak: float = 0.0
    drain_timeout: float = 120.0
    keep_logs: bool = False
    profile: bool = False
    profile_format: str = "flamegraph"


# --- one load generator run ---------------------------------------------------------------------------------


async def run_loadgen(url: str, options: Options, *, mode: str, tag: str, seed: int, connections: int,
                      duration: float = 0.0, requests: int = 0) -> dict[str, Any]:
    """Run ``bench.loadgen`` in a process of its own (it gets a core's worth of scheduling, not ours)."""
    args = [
        sys.executable, "-m", "bench.loadgen", "--url", url, "--mode", mode, "--connections", str(connections),
        "--users", str(options.users), "--tag", tag, "--seed", str(seed), "--client", options.client,
    ]
    args += ["--duration", str(duration)] if mode == "steady" else ["--requests", str(requests)]
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent,
        start_new_session=True,  # Ctrl-C reaches only us; we end the generator ourselves
    )
    try:
        stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed ({process.returncode}):\n{stderr.decode(errors='replace')}")
    result: dict[str, Any] = orjson.loads(stdout.strip().splitlines()[-1])
    return result


class CpuMeter:
    """CPU used during one run by each part of the system, in % of one core (machine: cores busy).

    Per process: Postgres backends come and go (autovacuum, pool churn), so a backend that exits during the run
    counts 0 and one that appears counts its whole CPU time; sums never go negative.
    """

    def __init__(self, stack: BenchStack) -> None:
        self.stack = stack
        self.start: dict[str, dict[int, float]] = {}
        self.started_at = 0.0
        self.machine_start = 0.0

    async def _pids(self) -> dict[str, list[int]]:
        stack = self.stack
        return {
            "gateway": [stack.gateway.pid] if stack.gateway else [],
            "workers": [worker.pid for worker in stack.workers],
            "baseline": [stack.baseline.pid] if stack.baseline else [],
            "postgres": await stack.postgres_backend_pids(),
            "rabbitmq": rabbitmq_pids(),
        }

    async def begin(self) -> None:
        self.start = {name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in (await self._pids()).items()}
        self.machine_start = machine_busy_seconds()[0]
        self.started_at = time.monotonic()

    async def end(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.started_at
        machine = machine_busy_seconds()[0] - self.machine_start
        usage: dict[str, float] = {}
        for name, pids in (await self._pids()).items():
            before = self.start.get(name, {})
            used = 0.0
            for pid in set(pids) | set(before):
                now = cpu_seconds(pid)
                if now:  # 0: the process is gone, its last slice is lost
                    used += max(0.0, now - before.get(pid, 0.0))
            usage[name] = round(100 * used / elapsed, 1)
        usage["machine_cores"] = round(machine / elapsed, 2)
        return usage


async def queued_requests(stack: BenchStack) -> int:
    """Messages ready in the shard queues (passive declares: works with a vhost or a prefix alike)."""
    settings = Settings()
    topology = Topology(stack.prefix, settings.shard_count, settings.queue_type)
    connection = await connect_once(stack.amqp_url, attempt_timeout=CONNECT_TIMEOUT)
    async with connection:
        channel = await connection.channel()
        total = 0
        for shard in range(topology.shard_count):
            queue = await channel.declare_queue(topology.shard_queue(shard), passive=True)
            total += queue.declaration_result.message_count or 0
        return total


async def wait_drained(stack: BenchStack, within: float, expected_rows: int | None = None) -> dict[str, Any]:
    """Wait until the queues are empty and the row count settles (or reaches ``expected_rows``)."""
    started = time.monotonic()
    last_rows, stable_since = -1, time.monotonic()
    while time.monotonic() - started < within:
        stack.check_alive()
        rows, _ = await stack.count_customers()
        if rows != last_rows:
            last_rows, stable_since = rows, time.monotonic()
        if expected_rows is not None and rows >= expected_rows:
            break
        if await queued_requests(stack) == 0 and time.monotonic() - stable_since >= 1.0:
            break
        await asyncio.sleep(0.25)
    return {"drained_after_s": round(time.monotonic() - started, 2), "rows": last_rows}


async def measured_run(stack: BenchStack, options: Options, target: str, *, mode: str, tag: str, seed: int,
                       connections: int, duration: float = 0.0, requests: int = 0) -> dict[str, Any]:
    await stack.reset_data()
    url = stack.gateway_url if target == "pipeline" else stack.baseline_url
    meter, packing = CpuMeter(stack), PackingMeter(stack)
    if target == "pipeline":
        await packing.begin()
    await meter.begin()
    result = await run_loadgen(url, options, mode=mode, tag=tag, seed=seed, connections=connections,
                               duration=duration, requests=requests)
    result["cpu_pct"] = await meter.end()
    if target == "pipeline":
        result["packing"] = await packing.end()
    result["target"] = target
    if target == "pipeline" and result["accepted"]:
        result["drain"] = await wait_drained(stack, options.drain_timeout)  # 202s still in the queue
    stack.check_alive()
    return result


class PackingMeter:
    """How many requests travelled together during one pipeline run: the mean gateway pack (requests per AMQP
    message) and worker batch (requests per transaction), from the differences of the processes' own histograms
    (``crm_gateway_pack_size``, ``crm_worker_batch_size``). Per-message and per-transaction costs are divided by
    these: they are what the CPU per request depends on most."""

    SERIES: Final = {"pack": "crm_gateway_pack_size", "batch": "crm_worker_batch_size"}

    def __init__(self, stack: BenchStack) -> None:
        self.stack = stack
        self.start: dict[str, tuple[float, float]] = {}

    async def _totals(self) -> dict[str, tuple[float, float]]:
        sums = dict.fromkeys(self.SERIES, (0.0, 0.0))
        async with aiohttp.ClientSession() as http:
            for url in self.stack.pipeline_metrics_urls():
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                        text = await response.text()
                    for family in text_string_to_metric_families(text):
                        for key, name in self.SERIES.items():
                            if family.name != name:
                                continue
                            total, count = sums[key]
                            for sample in family.samples:
                                if sample.name == f"{name}_sum":
                                    total += sample.value
                                elif sample.name == f"{name}_count":
                                    count += sample.value
                            sums[key] = (total, count)
        return sums

    async def begin(self) -> None:
        self.start = await self._totals()

    async def end(self) -> dict[str, float]:
        means: dict[str, float] = {}
        for key, (total, count) in (await self._totals()).items():
            before_total, before_count = self.start.get(key, (0.0, 0.0))
            means[key] = round((total - before_total) / max(count - before_count, 1), 1)
        return means


# --- the benchmark parts ------------------------------------------------------------------------------------


def run_row(label: str, result: dict[str, Any]) -> str:
    lat, cpu = result["latency_ms"], result["cpu_pct"]
    return (
        f"{label:<8} {result['target']:<9} {result['throughput_rps']:>8.0f} {lat['p50']:>7.1f} {lat['p95']:>7.1f} "
        f"{lat['p99']:>7.1f} {result['ok']:>7} {result['accepted']:>5} {result['errors']:>6} | "
        f"gw {cpu['gateway']:>3.0f} wk {cpu['workers']:>3.0f} base {cpu['baseline']:>3.0f} "
        f"pg {cpu['postgres']:>3.0f} mq {cpu['rabbitmq']:>3.0f} client {result['client_cpu_pct']:>3.0f} "
        f"machine {cpu['machine_cores']:.2f}"
        + (f" | pack {result['packing']['pack']:g} batch {result['packing']['batch']:g}" if "packing" in result else "")
    )


HEADER = (
    f"{'run':<8} {'target':<9} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'2xx':>7} {'202':>5} "
    f"{'errors':>6} | CPU % of one core (machine: cores busy) | mean requests per pack / per batch"
)


async def warm_up(stack: BenchStack, options: Options) -> None:
    """Open connections and pools, fill caches: the first seconds of load are not measured."""
    print(f"warm-up: {options.warmup:g}s per target", flush=True)
    for target in TARGETS:
        await measured_run(stack, options, target, mode="steady", tag="warmup", seed=0,
                           connections=options.connections, duration=options.warmup)


async def ab_rounds(stack: BenchStack, options: Options) -> dict[str, Any]:
    print(HEADER, flush=True)
    runs: list[dict[str, Any]] = []
    for round_no in range(1, options.rounds + 1):
        for target in TARGETS:  # A B A B …: drift of the machine hits both alike
            result = await measured_run(stack, options, target, mode="steady", tag=f"r{round_no}{target[0]}",
                                        seed=round_no, connections=options.connections,
                                        duration=options.duration)
            result["round"] = round_no
            runs.append(result)
            print(run_row(f"round {round_no}", result), flush=True)

    medians: dict[str, dict[str, float]] = {}
    for target in TARGETS:
        mine = [r for r in runs if r["target"] == target]
        medians[target] = {
            "throughput_rps": statistics.median(r["throughput_rps"] for r in mine),
            "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in mine),
            "p95_ms": statistics.median(r["latency_ms"]["p95"] for r in mine),
            "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
            "accepted": sum(r["accepted"] for r in mine),
        }
    pipe, base = medians["pipeline"], medians["baseline"]
    ratio = {
        "throughput": round(pipe["throughput_rps"] / base["throughput_rps"], 3) if base["throughput_rps"] else 0.0,
        "p99": round(pipe["p99_ms"] / base["p99_ms"], 3) if base["p99_ms"] else 0.0,
    }
    print(f"\nmedians over {options.rounds} rounds of {options.duration:g}s at {options.connections} connections:")
    for target in TARGETS:
        m = medians[target]
        print(f"  {target:<9} {m['throughput_rps']:>8.0f} req/s  p50 {m['p50_ms']:.1f} ms  p95 {m['p95_ms']:.1f} ms  "
              f"p99 {m['p99_ms']:.1f} ms  errors {m['errors']:.0f}  accepted(202) {m['accepted']:.0f}")
    print(f"  ratio pipeline/baseline: throughput {ratio['throughput']:.2f}, p99 {ratio['p99']:.2f}")
    cpu = cpu_per_request(runs)
    print_cpu_per_request(cpu)
    clean = pipe["errors"] == 0
    fast = ratio["throughput"] >= 1.0 and pipe["p99_ms"] <= base["p99_ms"] and clean
    print(f"  targets: throughput ratio >= 1.0 with p99 <= the baseline's and zero errors: "
          f"{'met' if fast else 'NOT met'}; moonshot ratio >= 1.2: "
          f"{'met' if fast and ratio['throughput'] >= 1.2 else 'NOT met'}", flush=True)
    return {"runs": runs, "medians": medians, "ratio": ratio, "cpu_us_per_request": cpu}


# Components whose CPU is counted per request, per target (the baseline is one process plus Postgres).
CPU_PARTS: Final = {"pipeline": ("gateway", "workers", "rabbitmq", "postgres"), "baseline": ("baseline", "postgres")}


def cpu_per_request(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median CPU µs per answered request of each component, per target (CPU time, not wall time: a busy
    machine slows a run down but hardly changes what each request costs)."""
    result: dict[str, dict[str, float]] = {}
    for target, parts in CPU_PARTS.items():
        mine = [r for r in runs if r["target"] == target and r["throughput_rps"] > 0]
        result[target] = {
            part: round(statistics.median(r["cpu_pct"][part] / 100 / r["throughput_rps"] * 1e6 for r in mine), 1)
            for part in parts
        } if mine else {}
    return result


def print_cpu_per_request(cpu: dict[str, dict[str, float]]) -> None:
    pipe, base = cpu.get("pipeline", {}), cpu.get("baseline", {})
    if not pipe or not base:
        return
    print("  CPU µs per request (median): " + ", ".join(f"{part} {value:.0f}" for part, value in pipe.items())
          + f" = {sum(pipe.values()):.0f} | baseline: process {base['baseline']:.0f}, postgres {base['postgres']:.0f}"
          f" = {sum(base.values()):.0f}")
    process = base["baseline"] or float("nan")
    print(f"  CPU against the baseline: gateway {pipe['gateway'] / process:.2f}x its process (target <= 0.75), "
          f"worker {pipe['workers'] / process:.2f}x (target <= 0.5), postgres "
          f"{pipe['postgres'] / (base['postgres'] or float('nan')):.2f}x its postgres (target <= 0.25)")


async def profile(stack: BenchStack, options: Options, run_id: str) -> list[str]:
    """One more pipeline run with py-spy sampling the gateway and every worker (200 Hz): where the time goes.

    Writes one flame graph (SVG) per process to bench/results — or, with ``--profile-format raw``, collapsed stacks
    (one line per stack and its sample count: grep-able, and what ``bench/hotspots.py`` summarises); py-spy comes
    from PyPI (`pip install py-spy`)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("\nprofile: py-spy not found (pip install py-spy); skipped", flush=True)
        return []
    RESULTS_DIR.mkdir(exist_ok=True)
    targets = [("gateway", stack.gateway)] + [(f"worker-{n}", w) for n, w in enumerate(stack.workers, start=1)]
    outputs: list[str] = []
    recorders = []
    for name, server in targets:
        assert server is not None
        suffix = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[options.profile_format]
        output = RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}-{name}.{suffix}"
        recorders.append(await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(server.pid), "--rate", "200", "--duration", str(int(options.duration)),
            "--nonblocking", "--format", options.profile_format, "--output", str(output),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
        outputs.append(str(output))
    print(f"\nprofile: {options.duration:g}s pipeline run under py-spy", flush=True)
    result = await measured_run(stack, options, "pipeline", mode="steady", tag="profile", seed=99,
                                connections=options.connections, duration=options.duration)
    print(run_row("profile", result), flush=True)
    for recorder, written in zip(recorders, outputs, strict=True):
        code = await recorder.wait()
        print(f"  profile: {written}" if code == 0 else f"  py-spy failed ({code}); no profile: {written}")
    return outputs


async def burst(stack: BenchStack, options: Options) -> dict[str, Any]:
    """N requests over C connections as fast as possible; then every request answered, every user stored."""
    print(f"\nburst: {options.burst_requests} requests over {options.burst_connections} connections", flush=True)
    report: dict[str, Any] = {}
    for target in TARGETS:
        result = await measured_run(stack, options, target, mode="burst", tag=f"burst{target[0]}", seed=99,
                                    connections=options.burst_connections, requests=options.burst_requests)
        drain = await wait_drained(stack, options.drain_timeout, expected_rows=result["users_touched"])
        rows, phones = await stack.count_customers()
        answered_all = result["answered"] == result["requests"] and not result["exceptions"]
        stored_all = rows == result["users_touched"] and phones == rows
        result.update(drain=drain, rows=rows, rows_with_phone=phones, every_request_answered=answered_all,
                      every_user_stored=stored_all, passed=answered_all and stored_all and result["errors"] == 0)
        lat = result["latency_ms"]
        print(f"  {target:<9} {result['throughput_rps']:>8.0f} req/s in {result['elapsed_s']:.1f}s, "
              f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms; statuses "
              f"{result['status_counts']}, exceptions {result['exceptions'] or 0}; "
              f"users {result['users_touched']}, rows {rows} (with phone {phones}) after "
              f"{drain['drained_after_s']}s: {'PASS' if result['passed'] else 'FAIL'}", flush=True)
        report[target] = result
    return report


async def soak(stack: BenchStack, options: Options) -> dict[str, Any]:
    """A long steady pipeline run; RSS of gateway and workers sampled from /proc/<pid>/status."""
    print(f"\nsoak: {options.soak:g}s of pipeline load at {options.connections} connections", flush=True)
    pids = stack.pipeline_pids()
    samples: list[dict[str, Any]] = []

    def sample(moment: str) -> None:
        samples.append({"t": moment, **{name: rss_kib(pid) for name, pid in pids.items()}})

    async def sampler() -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(max(5.0, options.soak / 20))
            sample(f"{time.monotonic() - started:.0f}s")

    sample("start")
    task = asyncio.create_task(sampler())
    try:
        result = await measured_run(stack, options, "pipeline", mode="steady", tag="soak", seed=7,
                                    connections=options.connections, duration=options.soak)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    sample("end")
    await asyncio.sleep(5)
    sample("end+5s")
    print(run_row("soak", result))
    for name in pids:
        values = [s[name] for s in samples]
        print(f"  {name:<9} RSS start {values[0] / 1024:.1f} MiB, end {values[-2] / 1024:.1f} MiB, "
              f"max {max(values) / 1024:.1f} MiB, 5 s after {values[-1] / 1024:.1f} MiB")
    return {"result": result, "rss_kib": samples}


# --- main ---------------------------------------------------------------------------------------------------


def pipeline_settings() -> dict[str, Any]:
    settings = Settings().model_dump()
    for secret in ("database_url", "amqp_url"):
        settings.pop(secret, None)
    return settings


async def main_async(options: Options) -> int:
    run_id = uuid.uuid4().hex[:8]
    log_dir = RESULTS_DIR / "logs" / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = BenchStack(
        admin_database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        admin_amqp_url=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        run_id=run_id,
        log_dir=log_dir,
    )
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:  # like Ctrl-C: cancel the run once; a second signal must not cut the cleanup short
        loop.remove_signal_handler(signal.SIGTERM)
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    report: dict[str, Any] = {
        "run_id": run_id,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "options": asdict(options),
        "pipeline_settings": pipeline_settings(),
    }
    succeeded = False
    try:
        await stack.create_storage()
        await stack.start_servers(options.workers)
        where = f"vhost {stack.vhost}" if stack.vhost else f"prefix {stack.prefix}"
        print(f"bench {run_id}: database {stack.database}, {where}, 1 gateway + {options.workers} worker(s), "
              f"baseline; logs in {log_dir}", flush=True)
        if options.warmup > 0:
            await warm_up(stack, options)
        if options.rounds > 0:
            report["ab"] = await ab_rounds(stack, options)
        if options.burst:
            report["burst"] = await burst(stack, options)
        if options.soak > 0:
            report["soak"] = await soak(stack, options)
        if options.profile:
            report["profiles"] = await profile(stack, options, run_id)
        succeeded = True
    finally:
        await stack.close()
        if succeeded or report.get("ab") or report.get("burst"):
            RESULTS_DIR.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = RESULTS_DIR / f"{stamp}-{run_id}.json"
            path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            print(f"\nresults: {path}")
        if succeeded and not options.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif not succeeded:
            print(f"server logs kept in {log_dir}", file=sys.stderr)
    burst_failed = any(not r["passed"] for r in report.get("burst", {}).values())
    return 1 if burst_failed else 0


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the pipeline (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds; 0 skips them (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per target (default 3)")
    parser.add_argument("--connections", "-c", type=int, default=64, help="steady connections (default 64)")
    parser.add_argument("--users", type=int, default=5_000, help="distinct userIds (default 5000)")
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw", help="load generator client")
    parser.add_argument("--burst", action="store_true", help="also run the burst and check storage")
    parser.add_argument("--burst-requests", type=int, default=20_000)
    parser.add_argument("--burst-connections", type=int, default=500)
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="also run a pipeline soak of SECONDS and report RSS at start and end")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for the queue to drain after a run")
    parser.add_argument("--keep-logs", action="store_true", help="keep server logs even when all went well")
    parser.add_argument("--profile", action="store_true",
                        help="also profile gateway and workers with py-spy during one pipeline run (flame graphs "
                             "in bench/results)")
    parser.add_argument("--profile-format", choices=["flamegraph", "raw", "speedscope"], default="flamegraph",
                        help="py-spy's output format: flamegraph (SVG), raw (collapsed stacks), speedscope (JSON)")
    args = parser.parse_args(argv)
    return Options(**vars(args))


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    try:
        code = asyncio.run(main_async(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped and removed", file=sys.stderr)
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
