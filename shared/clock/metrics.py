"""The clock's metrics: offset to the database clock, its error bound, steps (shared/clock/timeline.py).

Read at scrape time from the timeline itself, so the sampling path calls nothing; the gateway and the worker
both register them (``follow_timeline``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from shared.clock.timeline import Timeline

ClockReading = tuple[float, float]


class ClockMetrics:
    """``crm_clock_*``: this process's estimate of the database clock, in the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.synchronized = Gauge(
            "crm_clock_synchronized",
            "1 once the offset to the database clock has been measured, 0 before",
            registry=registry,
        )
        self.offset = Gauge(
            "crm_clock_offset_seconds",
            "Database clock minus this process's wall clock, as last estimated",
            unit="seconds",
            registry=registry,
        )
        self.error_bound = Gauge(
            "crm_clock_error_bound_seconds",
            "Largest error of this process's reading of the database clock (half the best round trip plus drift)",
            unit="seconds",
            registry=registry,
        )
        self.steps = _StepCounter()
        registry.register(self.steps)
        self.server_steps = _ServerStepCounter()
        registry.register(self.server_steps)

    def observe(self, offset_seconds: float, error_bound_seconds: float) -> None:
        """Record a fresh estimate (after each sample of the database clock)."""
        self.offset.set(offset_seconds)
        self.error_bound.set(error_bound_seconds)
        self.synchronized.set(1)

    def count_step(self) -> None:
        """A clock step was detected (``OffsetEstimator.add`` returned a step)."""
        self.steps.count += 1

    def follow(self, read: Callable[[], ClockReading | None], steps: Callable[[], int] | None = None) -> None:
        """Read the estimate at scrape time instead of being told: nothing to call on the sampling path.

        ``read()`` gives (offset, error bound) in seconds, or None before the first sample; ``steps()`` the
        number of clock steps seen so far. The error bound grows with the age of the best sample: read at
        scrape time it is the bound now, not the one at the last sample.
        """
        self.synchronized.set_function(lambda: 0.0 if read() is None else 1.0)
        self.offset.set_function(lambda: _part(read(), 0))
        self.error_bound.set_function(lambda: _part(read(), 1))
        if steps is not None:
            self.steps.source = steps


    def follow_timeline(self, timeline: Timeline) -> None:
        """Follow a ``shared.clock.timeline.Timeline`` (gateway and worker both do)."""

        def read() -> ClockReading | None:
            bound = timeline.error_bound_us()
            return None if bound is None else (timeline.wall_offset_us() / 1e6, bound / 1e6)

        self.follow(read, steps=lambda: timeline.steps)
        self.server_steps.source = lambda: timeline.server_steps


class _StepCounter(Collector):
    """``crm_clock_step_events_total``: counted here, or read from the clock's own count at scrape time."""

    def __init__(self) -> None:
        self.count = 0
        self.source: Callable[[], int] | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        value = self.source() if self.source is not None else self.count
        yield CounterMetricFamily(
            "crm_clock_step_events",
            "Times a new sample contradicted the estimate (a clock stepped) and the estimate was reset",
            value=value,
        )


class _ServerStepCounter(Collector):
    """``crm_clock_steps_total``: changes of database server that moved the shared timeline (``timeline``)."""

    def __init__(self) -> None:
        self.source: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "crm_clock_steps",
            "Times the database server changed (failover, restore) with a clock that would have moved the shared "
            "timeline, and the timeline was kept continuous and above every stored stamp instead",
            value=self.source(),
        )


def _part(reading: ClockReading | None, index: int) -> float:
    # Unsynchronized: NaN, so that a graph shows a gap rather than a made-up 0.
    return float("nan") if reading is None else reading[index]
