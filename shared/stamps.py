"""Hybrid logical clock: the write stamp that orders a userId's requests.

A stamp is an int: microseconds since the Unix epoch, bumped by one whenever the wall clock has not moved
(or went backwards) since the last stamp. Within one gateway process stamps are strictly increasing, so
they record the order in which the gateway received requests. ``observe`` folds in a stamp learned
elsewhere, so the clock never issues one at or below it. Across processes, order follows the wall clocks
(see README, "How ordering works").
"""

from __future__ import annotations

import time
from collections.abc import Callable


class HybridClock:
    def __init__(self, wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_clock_ns = wall_clock_ns
        self._last = 0

    def now(self) -> int:
        """A stamp strictly greater than every stamp this clock returned or observed before."""
        physical = self._wall_clock_ns() // 1000
        self._last = physical if physical > self._last else self._last + 1
        return self._last

    def observe(self, stamp: int) -> None:
        """Never issue a stamp at or below one already seen."""
        self._last = max(self._last, stamp)
