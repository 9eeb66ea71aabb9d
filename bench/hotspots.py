"""Summarise a py-spy collapsed-stack profile (``python -m bench.run --profile --profile-format raw``).

    python -m bench.hotspots bench/results/<time>-<id>-gateway.txt [--top 25] [--match TEXT] [--us-per-request N]

Prints, per function (``name (file)``), the share of samples in which it is on the stack (inclusive) and at
the top of the stack (self), highest inclusive first; ``--match`` keeps only functions whose name or file
contains TEXT. Then the self samples per package (``aiohttp``, ``aiormq``, ``gateway``...); given the
process's CPU µs per request (``make bench`` prints it), ``--us-per-request`` turns those shares into µs.
py-spy records only busy samples (without ``--idle``): the shares are of the time the process was on a CPU
or in a system call.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``: one entry per function, whatever the line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:]) if path else ""
    return f"{name} ({short})" if short else name


def package_of(frame: str) -> str:
    """The package a frame's file belongs to: ``aiohttp`` for ``.../site-packages/aiohttp/web.py``, ``gateway`` for
    ``gateway/rpc.py``, ``stdlib`` for a top-level module (``threading.py``, ``<frozen runpy>``)."""
    path = frame.partition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    if len(parts) < 2:
        return "stdlib"
    return parts[0]


def summarise(lines: list[str]) -> tuple[Counter[str], Counter[str], Counter[str], int]:
    """Inclusive and self sample counts per function, self counts per package, and the number of samples."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    busy = 0
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = [f for f in stack.split(";") if f]
        frames = [frame_name(f) for f in raw_frames]
        busy += count
        for name in set(frames):
            inclusive[name] += count
        if frames:
            self_time[frames[-1]] += count
            packages[package_of(raw_frames[-1])] += count
    return inclusive, self_time, packages, busy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotspots", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="a collapsed-stack file written by py-spy --format raw")
    parser.add_argument("--top", type=int, default=25, help="how many functions to print (default 25)")
    parser.add_argument("--match", default="", help="only functions whose name or file contains this text")
    parser.add_argument("--us-per-request", type=float, default=0.0,
                        help="the process's CPU µs per request: print each package's share in µs too")
    args = parser.parse_args(argv)
    inclusive, self_time, packages, busy = summarise(args.profile.read_text().splitlines())
    print(f"{args.profile.name}: {busy} samples")
    print(f"{'incl %':>7} {'self %':>7}  function")
    rows = [(name, count) for name, count in inclusive.most_common() if args.match in name]
    for name, count in rows[: args.top]:
        print(f"{100 * count / max(busy, 1):7.1f} {100 * self_time[name] / max(busy, 1):7.1f}  {name}")
    print("\nhighest self:")
    for name, count in [(n, c) for n, c in self_time.most_common() if args.match in n][: args.top // 2]:
        print(f"{100 * count / max(busy, 1):7.1f}  {name}")
    print("\nself by package:" + (f" (µs of {args.us_per_request:g} per request)" if args.us_per_request else ""))
    for package, count in packages.most_common():
        share = count / max(busy, 1)
        micros = f" {share * args.us_per_request:7.1f} µs" if args.us_per_request else ""
        print(f"{100 * share:7.1f}{micros}  {package}")


if __name__ == "__main__":
    main()
