"""NTP-style estimate of the offset between this process's monotonic clock and the database server's clock.

Pure logic, no I/O (``shared.clock.timeline`` takes the samples). One sample is one query of the server's
``clock_timestamp()``: the local monotonic clock is read just before the query is sent and just after the
answer arrives. The server read its clock somewhere in between, so

    offset = server_time - (sent + received) / 2      with an error of at most (received - sent) / 2

as long as both clocks tick at the same rate. They do not quite (crystal drift, tens of ppm), so a sample's
error grows with its age: ``rtt / 2 + DRIFT_PPM * age``. The estimator keeps the last few samples and uses the
one with the smallest error now — the one least delayed by the network or a busy event loop (NTP's clock
filter). A sample whose interval does not overlap the current estimate's means one of the clocks stepped
(a suspended VM, a restarted database host): the old samples are dropped and the step is reported.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

# Assumed worst drift between the local monotonic clock and the server's clock, parts per million. Ordinary
# quartz is within ~50 ppm; NTP-disciplined clocks far better. Used only to age the error bound.
DRIFT_PPM: Final = 100
WINDOW: Final = 8


@dataclass(frozen=True, slots=True)
class Sample:
    sent_ns: int  # local monotonic clock just before the query went out
    received_ns: int  # local monotonic clock just after the answer came back
    server_us: int  # the server's clock_timestamp(), microseconds since the Unix epoch

    @property
    def rtt_ns(self) -> int:
        return self.received_ns - self.sent_ns

    @property
    def offset_ns(self) -> int:
        """Add to a local monotonic reading to get server time (ns since the epoch)."""
        return self.server_us * 1000 - (self.sent_ns + self.received_ns) // 2

    def error_ns(self, now_ns: int) -> int:
        """Bound on this sample's error at local monotonic time ``now_ns`` (+1 µs: the server's resolution)."""
        age = max(0, now_ns - self.received_ns)
        return self.rtt_ns // 2 + age * DRIFT_PPM // 1_000_000 + 1000


class OffsetEstimator:
    """The best current offset from recent samples; see the module docstring."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[Sample] = deque(maxlen=window)
        self.best: Sample | None = None

    @property
    def synchronized(self) -> bool:
        return self.best is not None

    def add(self, sample: Sample) -> int | None:
        """Take a sample; return the step in ns when it contradicts the current estimate, else None."""
        if sample.rtt_ns < 0:
            raise ValueError("a sample cannot be received before it was sent")
        step = None
        best = self.best
        if best is not None:
            difference = sample.offset_ns - best.offset_ns
            if abs(difference) > sample.error_ns(sample.received_ns) + best.error_ns(sample.received_ns):
                step = difference
                self._samples.clear()
        self._samples.append(sample)
        now = sample.received_ns
        self.best = min(self._samples, key=lambda s: s.error_ns(now))
        return step

    def offset_ns(self) -> int:
        if self.best is None:
            raise LookupError("no sample yet")
        return self.best.offset_ns

    def error_ns(self, now_ns: int) -> int:
        if self.best is None:
            raise LookupError("no sample yet")
        return self.best.error_ns(now_ns)


# A timeline floored at the high-water mark starts just above it (a larger margin would buy nothing certain:
# how far processes still on the old timeline run ahead is unknown to the one that floors it).
FLOOR_MARGIN_US: Final = 1


def shift_for_new_server(server_now_us: int, timeline_now_us: int | None, high_water_us: int) -> tuple[int, str]:
    """How far the shared timeline must run ahead of a database server seen for the first time, and why.

    ``server_now_us`` is the new server's clock now; ``timeline_now_us`` the shared timeline now as this process
    kept it on the previous server (None when it never had one); ``high_water_us`` the highest stamp stored.

    * continuity: a process that was on the previous server measures the step and cancels it, so the timeline
      goes on as if the server had not changed (a backward step of 30 s gives a shift of +30 s);
    * floor: whatever the measurement, the timeline restarts above every stamp already written, so a causally
      later write can never stamp below a stored one;
    * never negative: a server whose clock is ahead moves the timeline forward, which orders nothing wrongly.
    """
    continuity = timeline_now_us - server_now_us if timeline_now_us is not None else 0
    floor = high_water_us + FLOOR_MARGIN_US - server_now_us if high_water_us else 0
    if floor > max(continuity, 0):
        return floor, "floor"
    return max(continuity, 0), "continuity"
