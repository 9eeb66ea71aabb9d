"""The offset estimator (``shared.clock.offset``) and the timeline's clock logic (``shared.clock.timeline``), no I/O.

Times are made up: a "true" server clock ``TRUE_OFFSET`` ahead of the local monotonic clock, and samples whose
query is delayed on the way out and back by chosen amounts, the way a network or a busy event loop delays them.
"""

from __future__ import annotations

import itertools
import random

import pytest

from shared.clock.offset import DRIFT_PPM, OffsetEstimator, Sample, shift_for_new_server
from shared.clock.timeline import Timeline

TRUE_OFFSET = 1_795_000_000_000_000_000  # ns: server time = local monotonic + this
MS = 1_000_000


def sample_at(sent_ns: int, out_ns: int, back_ns: int, offset_ns: int = TRUE_OFFSET) -> Sample:
    """A query sent at ``sent_ns`` that took ``out_ns`` to reach the server and ``back_ns`` to come back."""
    server_ns = sent_ns + out_ns + offset_ns
    return Sample(sent_ns=sent_ns, received_ns=sent_ns + out_ns + back_ns, server_us=server_ns // 1000)


def test_offset_of_a_symmetric_sample_is_exact() -> None:
    sample = sample_at(10 * MS, out_ns=MS, back_ns=MS)
    assert abs(sample.offset_ns - TRUE_OFFSET) < 1000  # within the server's 1 µs resolution


def test_offset_error_is_within_half_the_round_trip_however_asymmetric() -> None:
    for out_ns, back_ns in ((0, 8 * MS), (8 * MS, 0), (3 * MS, 5 * MS)):
        sample = sample_at(50 * MS, out_ns, back_ns)
        assert abs(sample.offset_ns - TRUE_OFFSET) <= sample.error_ns(sample.received_ns)


def test_estimator_keeps_the_least_delayed_of_noisy_samples() -> None:
    rng = random.Random(7)
    estimator = OffsetEstimator()
    now = 0
    for _ in range(8):
        now += 2_000 * MS
        # A busy loop delays the answer by 0-40 ms, asymmetrically; one sample is almost undelayed.
        estimator.add(sample_at(now, out_ns=rng.randrange(0, 2 * MS), back_ns=rng.randrange(0, 40 * MS)))
    now += 2_000 * MS
    quick = sample_at(now, out_ns=100_000, back_ns=150_000)
    estimator.add(quick)
    assert estimator.best == quick
    assert abs(estimator.offset_ns() - TRUE_OFFSET) <= 200_000
    assert estimator.error_ns(quick.received_ns) <= 200_000


def test_every_estimate_contains_the_true_offset() -> None:
    rng = random.Random(11)
    estimator = OffsetEstimator()
    now = 0
    for _ in range(200):
        now += rng.randrange(500 * MS, 3_000 * MS)
        sample = sample_at(now, out_ns=rng.randrange(0, 20 * MS), back_ns=rng.randrange(0, 20 * MS))
        assert estimator.add(sample) is None  # noise alone is never taken for a step
        assert abs(estimator.offset_ns() - TRUE_OFFSET) <= estimator.error_ns(sample.received_ns)


def test_error_bound_grows_with_age_while_the_database_is_away() -> None:
    estimator = OffsetEstimator()
    sample = sample_at(0, out_ns=MS, back_ns=MS)
    estimator.add(sample)
    one_minute = 60_000 * MS
    grown = estimator.error_ns(sample.received_ns + one_minute) - estimator.error_ns(sample.received_ns)
    assert grown == one_minute * DRIFT_PPM // 1_000_000  # 6 ms a minute at 100 ppm


def test_an_old_precise_sample_gives_way_to_a_fresh_one() -> None:
    estimator = OffsetEstimator()
    precise = sample_at(0, out_ns=10_000, back_ns=10_000)
    estimator.add(precise)
    later = 100_000 * MS  # 100 s later its error has grown by 10 ms
    fresh = sample_at(later, out_ns=MS, back_ns=MS)
    estimator.add(fresh)
    assert estimator.best == fresh


def test_a_step_of_the_local_clock_is_detected_and_the_old_samples_dropped() -> None:
    estimator = OffsetEstimator()
    for i in range(5):
        estimator.add(sample_at(i * 2_000 * MS, out_ns=MS, back_ns=MS))
    # The local monotonic clock jumps 500 ms ahead (a VM paused and resumed oddly): the offset falls by 500 ms.
    stepped = TRUE_OFFSET - 500 * MS
    step = estimator.add(sample_at(10_000 * MS, out_ns=MS, back_ns=MS, offset_ns=stepped))
    assert step is not None and abs(step + 500 * MS) < 2 * MS
    assert abs(estimator.offset_ns() - stepped) < 2 * MS  # the new timeline is used at once
    # ...and the stale samples are gone: a later slow sample on the new timeline is not outvoted by them.
    assert estimator.add(sample_at(12_000 * MS, out_ns=5 * MS, back_ns=5 * MS, offset_ns=stepped)) is None
    assert abs(estimator.offset_ns() - stepped) < 2 * MS


def test_a_sample_received_before_it_was_sent_is_refused() -> None:
    with pytest.raises(ValueError):
        OffsetEstimator().add(Sample(sent_ns=10, received_ns=5, server_us=1))


# ---- the timeline built on it -----------------------------------------------------------------------


class FakeClocks:
    """A local monotonic clock and a local wall clock that the test moves by hand."""

    def __init__(self, wall_ahead_of_server_ns: int) -> None:
        self.mono = 1_000 * MS
        self.wall_ahead = wall_ahead_of_server_ns

    def monotonic_ns(self) -> int:
        return self.mono

    def wall_ns(self) -> int:
        return self.mono + TRUE_OFFSET + self.wall_ahead


def timeline_with(clocks: FakeClocks) -> Timeline:
    return Timeline("postgresql://unused", bound_us=25_000, monotonic_ns=clocks.monotonic_ns,
                    wall_ns=clocks.wall_ns)


def test_timeline_stamps_with_the_wall_clock_until_the_first_sample_then_with_the_database_clock() -> None:
    clocks = FakeClocks(wall_ahead_of_server_ns=-500 * MS)  # this machine's wall clock is 0.5 s behind
    timeline = timeline_with(clocks)
    assert not timeline.synchronized and timeline.error_bound_us() is None
    assert timeline.now_us() == clocks.wall_ns() // 1000
    timeline.estimator.add(sample_at(clocks.mono, out_ns=MS, back_ns=MS))
    clocks.mono += 2 * MS
    assert timeline.synchronized
    assert abs(timeline.now_us() - (clocks.mono + TRUE_OFFSET) // 1000) <= 1
    assert abs(timeline.wall_offset_us() - 500_000) <= 1  # database clock minus wall clock


def test_stamps_stay_strictly_increasing_when_the_offset_moves_back() -> None:
    clocks = FakeClocks(wall_ahead_of_server_ns=+500 * MS)  # wall clock 0.5 s ahead: fallback stamps run ahead
    timeline = timeline_with(clocks)
    stamps = []
    for _ in range(5):
        clocks.mono += MS
        stamps.append(timeline.stamp())
    # The first sample moves the timeline 0.5 s back: the hybrid clock holds its ground, one µs at a time,
    timeline.estimator.add(sample_at(clocks.mono, out_ns=MS, back_ns=MS))
    for _ in range(5):
        clocks.mono += MS
        stamps.append(timeline.stamp())
    assert all(later > earlier for earlier, later in itertools.pairwise(stamps))
    assert stamps[-1] - stamps[4] == 5
    # ...and says how far ahead of the timeline it is running (part of the error bound).
    bound = timeline.error_bound_us()
    assert bound is not None and bound >= 490_000
    # Once database time passes the last stamp, stamps follow it again.
    clocks.mono += 600 * MS
    assert abs(timeline.stamp() - (clocks.mono + TRUE_OFFSET) // 1000) <= 1


# ---- a change of database server (shift_for_new_server) -----------------------------------------------


SECOND_US = 1_000_000


def test_a_new_server_whose_clock_is_behind_continues_the_timeline_where_it_was() -> None:
    shift, reason = shift_for_new_server(server_now_us=1_000 * SECOND_US - 30 * SECOND_US,
                                         timeline_now_us=1_000 * SECOND_US, high_water_us=999 * SECOND_US)
    assert (shift, reason) == (30 * SECOND_US, "continuity")


def test_the_timeline_floor_is_the_high_water_mark_when_no_step_was_measured() -> None:
    # A process that never saw the old server (started after the failover) cannot measure the step.
    shift, reason = shift_for_new_server(server_now_us=970 * SECOND_US, timeline_now_us=None,
                                         high_water_us=1_000 * SECOND_US)
    assert reason == "floor" and 970 * SECOND_US + shift > 1_000 * SECOND_US


def test_the_timeline_floor_wins_over_a_measured_step_that_would_stamp_below_a_stored_write() -> None:
    shift, reason = shift_for_new_server(server_now_us=970 * SECOND_US, timeline_now_us=990 * SECOND_US,
                                         high_water_us=1_000 * SECOND_US)
    assert reason == "floor" and 970 * SECOND_US + shift > 1_000 * SECOND_US


def test_a_forward_step_needs_no_floor() -> None:
    assert shift_for_new_server(server_now_us=1_030 * SECOND_US, timeline_now_us=1_000 * SECOND_US,
                                high_water_us=999 * SECOND_US) == (0, "continuity")
    assert shift_for_new_server(server_now_us=1_000 * SECOND_US, timeline_now_us=None, high_water_us=0) == (
        0, "continuity")


def test_an_earlier_shift_is_carried_over_to_the_next_server() -> None:
    # Server B ran 30 s behind server A (shift 30 s); server C runs 10 s behind B: the timeline keeps going.
    timeline_now = 2_000 * SECOND_US
    server_b_now = timeline_now - 30 * SECOND_US
    server_c_now = server_b_now - 10 * SECOND_US
    assert shift_for_new_server(server_c_now, timeline_now, timeline_now - SECOND_US) == (40 * SECOND_US,
                                                                                           "continuity")
