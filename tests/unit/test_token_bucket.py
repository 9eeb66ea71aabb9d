"""The token bucket and its bounded table, on a fake clock; and the rate limiter's policy and header fields."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from aiohttp import web

from gateway.middleware.ratelimit import Policy, RateLimiter, rate_limit_headers
from gateway.token_bucket import BucketTable, TokenBucket
from shared.apikeys import ApiKey
from shared.settings import Settings


def test_a_full_bucket_allows_burst_requests_at_once_then_refuses() -> None:
    bucket = TokenBucket.full(rate=2.0, capacity=3, now=0.0)
    decisions = [bucket.take(0.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]


def test_refill_is_rate_tokens_per_second_capped_at_capacity() -> None:
    bucket = TokenBucket.full(rate=2.0, capacity=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    refused = bucket.take(0.0)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.5)  # one token at 2/s
    assert refused.full_after == pytest.approx(1.5)
    assert bucket.take(0.25).allowed is False
    assert bucket.take(0.5).allowed is True  # exactly one token back
    later = bucket.take(100.0)  # a long idle time refills only to capacity
    assert later.allowed and later.remaining == 2


def test_retry_after_counts_the_missing_fraction_of_a_token() -> None:
    bucket = TokenBucket.full(rate=0.5, capacity=1, now=10.0)
    assert bucket.take(10.0).allowed
    refused = bucket.take(11.0)  # half a token back after 1 s at 0.5/s
    assert not refused.allowed and refused.retry_after == pytest.approx(1.0)


def test_a_clock_stepping_back_neither_adds_nor_takes_tokens() -> None:
    bucket = TokenBucket.full(rate=1.0, capacity=2, now=5.0)
    bucket.take(5.0)
    bucket.take(5.0)
    assert not bucket.take(4.0).allowed
    assert bucket.take(6.0).allowed


def test_sustained_rate_is_the_configured_rate() -> None:
    bucket = TokenBucket.full(rate=10.0, capacity=5, now=0.0)
    allowed = sum(bucket.take(i / 100).allowed for i in range(1000))  # 100 requests/s for 10 s
    assert allowed == pytest.approx(5 + 10 * 10, abs=1)


def test_table_keeps_one_bucket_per_client() -> None:
    table = BucketTable(max_size=10)
    assert [table.take("a", 1.0, 1, 0.0).allowed for _ in range(2)] == [True, False]
    assert table.take("b", 1.0, 1, 0.0).allowed  # another client has its own bucket


def test_table_drops_idle_buckets_once_they_are_full_again() -> None:
    table = BucketTable(max_size=1000)
    for n in range(100):
        table.take(f"client{n}", 10.0, 5, 0.0)
    assert len(table) == 100
    # 0.5 s later every old bucket is full (5 tokens at 10/s): each take drops some from the cold end.
    for n in range(60):
        table.take("busy", 10.0, 5, 0.5 + n / 1000)
    assert len(table) == 1  # two idle buckets dropped per take: all 100 gone after 50 takes


def test_table_never_drops_a_bucket_that_still_holds_a_debt() -> None:
    table = BucketTable(max_size=1000)
    table.take("spender", 1.0, 1, 0.0)  # empty now, 1 s to refill
    for n in range(50):
        table.take(f"other{n}", 1.0, 1, 0.5)
    assert "spender" in table
    assert not table.take("spender", 1.0, 1, 0.6).allowed  # its debt survived the others' traffic


def test_table_size_is_bounded_by_max_size_even_when_no_bucket_is_full() -> None:
    table = BucketTable(max_size=100)
    for n in range(10_000):
        table.take(f"addr{n}", 0.001, 1, 0.0)  # nothing refills: only the cap can evict
    assert len(table) == 100
    assert "addr9999" in table and "addr0" not in table  # least recently used went first


def test_changed_limits_give_the_client_a_new_bucket() -> None:
    table = BucketTable(max_size=10)
    table.take("a", 1.0, 1, 0.0)
    assert not table.take("a", 1.0, 1, 0.0).allowed
    assert table.take("a", 5.0, 5, 0.0).allowed  # a rotated keys file changed this key's limit


# ---- policy and header fields --------------------------------------------------------------------------


def test_policy_burst_defaults_to_the_rate_rounded_up_and_zero_rate_means_no_limit() -> None:
    assert Policy.of(0, 10) is None
    policy = Policy.of(2.5, 0)
    assert policy is not None and policy.burst == 3


@pytest.mark.parametrize(
    ("rate", "burst", "header"),
    [
        (10, 10, '"default";q=10;w=1'),
        (10, 20, '"default";q=20;w=2'),
        (0.5, 1, '"default";q=1;w=2'),
        (100, 5, '"default";q=100;w=1'),
        (3, 10, '"default";q=12;w=4'),
        (2, 3, '"default";q=4;w=2'),  # issue 13: was q=3;w=2, 1.5/s
        (2.5, 0, '"default";q=5;w=2'),
        (0.1, 0, '"default";q=1;w=10'),
    ],
)
def test_ratelimit_policy_field_states_exactly_the_rate_and_a_quota_no_smaller_than_the_burst(
    rate: float, burst: int, header: str
) -> None:
    policy = Policy.of(rate, burst)
    assert policy is not None and policy.header == header
    quota, window = (int(part.split("=")[1]) for part in header.split(";")[1:])
    assert Fraction(quota, window) == Fraction(str(rate))  # q/w: the rate itself, not less, not more
    assert quota >= policy.burst  # r (whole tokens left, at most the burst) never exceeds q


def test_ratelimit_field_gives_tokens_left_and_seconds_until_full_or_until_the_next_request() -> None:
    policy = Policy.of(2, 4)
    assert policy is not None
    bucket = TokenBucket.full(policy.rate, policy.burst, 0.0)
    response = web.Response()
    rate_limit_headers(response, policy, bucket.take(0.0))
    assert response.headers["RateLimit-Policy"] == '"default";q=4;w=2'
    assert response.headers["RateLimit"] == '"default";r=3;t=1'  # 1 token missing at 2/s: full in 0.5 s
    for _ in range(3):
        decision = bucket.take(0.0)
    rate_limit_headers(response, policy, decision)
    assert response.headers["RateLimit"] == '"default";r=0;t=1'  # next token in 0.5 s
    refused = bucket.take(0.1)
    rate_limit_headers(response, policy, refused)
    assert response.headers["RateLimit"] == f'"default";r=0;t={math.ceil(refused.retry_after)}'


def test_a_keys_own_rate_overrides_the_default_and_rate_0_exempts_it() -> None:
    limiter = RateLimiter(Settings(rate_limit=10, rate_burst=20))
    assert limiter.default is not None and (limiter.default.rate, limiter.default.burst) == (10, 20)
    plain = ApiKey("plain", b"x" * 32)
    own = ApiKey("own", b"y" * 32, rate=1.0, burst=2)
    exempt = ApiKey("exempt", b"z" * 32, rate=0.0, burst=0)
    assert limiter.policy_for(None) is limiter.default
    assert limiter.policy_for(plain) is limiter.default
    policy = limiter.policy_for(own)
    assert policy is not None and (policy.rate, policy.burst) == (1.0, 2)
    assert limiter.policy_for(exempt) is None
    assert RateLimiter(Settings()).policy_for(None) is None  # RATE_LIMIT defaults to 0: off


def test_limiter_uses_its_clock() -> None:
    now = [0.0]
    limiter = RateLimiter(Settings(rate_limit=1, rate_burst=1), clock=lambda: now[0])
    policy = limiter.default
    assert policy is not None
    assert limiter.take("key:a", policy).allowed
    assert not limiter.take("key:a", policy).allowed
    now[0] = 1.0
    assert limiter.take("key:a", policy).allowed
