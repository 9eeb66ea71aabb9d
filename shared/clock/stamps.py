"""Hybrid logical clock: the write stamp that orders a userId's requests.

A stamp is an int: microseconds since the Unix epoch *on the shared timeline* (the database server's clock,
see ``shared.clock.timeline``), bumped by one whenever that time has not moved (or went back, e.g. after a better
offset sample) since the last stamp. Within one process stamps are strictly increasing; across processes they
are ordered by the shared timeline, to within the processes' offset errors (docs/architecture.md, "How ordering works").
``observe`` folds in a stamp learned elsewhere, so the clock never issues one at or below it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class HybridClock:
    def __init__(self, physical_us: Callable[[], int] = wall_clock_us) -> None:
        self._physical_us = physical_us
        self._last = 0

    def now(self) -> int:
        """A stamp strictly greater than every stamp this clock returned or observed before."""
        physical = self._physical_us()
        self._last = physical if physical > self._last else self._last + 1
        return self._last

    def observe(self, stamp: int) -> None:
        """Never issue a stamp at or below one already seen."""
        self._last = max(self._last, stamp)

    def lead_us(self) -> int:
        """How far the last stamp is ahead of physical time (0 when the clock follows it)."""
        return max(0, self._last - self._physical_us())
