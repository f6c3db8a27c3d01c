"""The ready retry policies: their delays, caps, jitter bounds and early burial."""

from __future__ import annotations

import random
from typing import Any

import pytest

from osqueue.errors import ConfigError
from osqueue.retries import ExponentialBackoff, FailureAction, FixedBackoff
from osqueue.worker import JobContext, Worker


def ctx(attempt: int) -> JobContext[Any]:
    return JobContext("job-1", "t", attempt, 10, {}, {}, "w1")


def test_exponential_doubles_from_the_base_up_to_the_cap() -> None:
    policy = ExponentialBackoff(base_s=1, cap_s=60, jitter=0)
    delays = [policy(ctx(n), ValueError()).retry_delay_ms for n in range(1, 10)]
    assert delays == [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
    assert ExponentialBackoff(base_s=0.1, factor=3, cap_s=1, jitter=0).delay_ms(3) == 900


def test_exponential_never_overflows_on_a_late_attempt() -> None:
    assert ExponentialBackoff(base_s=1, cap_s=5, jitter=0).delay_ms(5000) == 5000


def test_jitter_takes_at_most_its_fraction_away() -> None:
    policy = ExponentialBackoff(base_s=10, cap_s=10, jitter=0.5, rng=random.Random(7))
    delays = {policy.delay_ms(1) for _ in range(500)}
    assert min(delays) >= 5000 and max(delays) <= 10000
    assert max(delays) - min(delays) > 4000, "spread over the whole range"
    full = FixedBackoff(2, jitter=1.0, rng=random.Random(7))
    spread = [full.delay_ms(1) for _ in range(500)]
    assert min(spread) < 200 and max(spread) > 1800 and all(0 <= d <= 2000 for d in spread)


def test_fixed_waits_the_same_every_time() -> None:
    policy = FixedBackoff(0.25)
    assert [policy(ctx(n), OSError()).retry_delay_ms for n in (1, 2, 9)] == [250, 250, 250]
    assert FixedBackoff(0)(ctx(1), OSError()) == FailureAction(retry_delay_ms=0)


def test_dead_on_sends_matching_errors_to_dead_at_once() -> None:
    policy = ExponentialBackoff(dead_on=(PermissionError, KeyError))
    assert policy(ctx(1), PermissionError("no")) == FailureAction(dead=True)
    assert policy(ctx(1), KeyError("k")).dead
    assert not policy(ctx(1), ValueError()).dead


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: FixedBackoff(-1), "delay_s"),
        (lambda: FixedBackoff(1, jitter=1.5), "jitter"),
        (lambda: ExponentialBackoff(base_s=0), "base_s"),
        (lambda: ExponentialBackoff(base_s=10, cap_s=5), "cap_s"),
        (lambda: ExponentialBackoff(factor=0.5), "factor"),
        (lambda: ExponentialBackoff(cap_s=10**9), "cap_s"),
    ],
)
def test_bad_settings_name_the_setting(make: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        make()


class _Client:
    registry = None


def test_worker_checks_its_retry_policies() -> None:
    client: Any = _Client()
    handlers = {"resize": print, "email": print}
    worker = Worker(client, handlers, retry_policies={"resize": FixedBackoff(1)})
    assert worker._failure_action(ctx(1), ValueError()) == FailureAction()  # type "t"
    with pytest.raises(ConfigError, match="'resise'"):
        Worker(client, handlers, retry_policies={"resise": FixedBackoff(1)})
    with pytest.raises(ConfigError, match="retry_policy="):
        Worker(client, handlers, retry_policies={"*": FixedBackoff(1)})
    with pytest.raises(ConfigError, match="not callable"):
        Worker(client, handlers, retry_policies={"email": 5})  # type: ignore[dict-item]
    Worker(client, {"*": print}, retry_policies={"anything": FixedBackoff(1)})


def test_the_job_types_policy_wins_over_the_default() -> None:
    client: Any = _Client()
    worker = Worker(
        client,
        {"t": print, "u": print},
        retry_policy=FixedBackoff(5),
        retry_policies={"t": FixedBackoff(1)},
    )
    assert worker._failure_action(ctx(1), ValueError()).retry_delay_ms == 1000
    other = JobContext("job-2", "u", 1, 3, {}, {}, "w1")
    assert worker._failure_action(other, ValueError()).retry_delay_ms == 5000
