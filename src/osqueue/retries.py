"""Retry policies: what a worker does with a job whose handler raised.

A policy is any callable ``policy(ctx, error) -> FailureAction``. The worker asks the policy
of the job's type (``Worker(retry_policies={"resize": ...})``), else its default
``retry_policy``, else it leaves the delay to the broker (exponential from 1 s, doubling per
attempt, capped at 5 min, with jitter). Whatever the policy says, a job that has used its
``max_attempts`` goes to ``dead``; a policy decides only how long to wait before the next
attempt, and whether to give up early.

Two ready policies::

    from osqueue.retries import ExponentialBackoff, FixedBackoff

    Worker(
        client,
        {"resize": resize, "email": send},
        retry_policies={
            "resize": ExponentialBackoff(base_s=1, cap_s=60),
            "email": FixedBackoff(delay_s=30, dead_on=(InvalidAddress,)),
        },
    )
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from osqueue.errors import ConfigError

if TYPE_CHECKING:
    from osqueue.worker import JobContext

__all__ = ["Backoff", "ExponentialBackoff", "FailureAction", "FixedBackoff", "RetryPolicy"]

#: The broker refuses retry delays longer than this (a year and a day).
MAX_RETRY_DELAY_S = 366 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class FailureAction:
    """What to do with a job whose handler raised: retry after ``retry_delay_ms`` (None:
    the broker's exponential backoff), or with ``dead=True`` send it to ``dead`` now."""

    retry_delay_ms: int | None = None
    dead: bool = False


#: Decides what happens to a job whose handler raised.
RetryPolicy = Callable[["JobContext[Any]", BaseException], FailureAction]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, not {value}")


def _check_delay(name: str, value: float) -> None:
    if not 0.0 <= value <= MAX_RETRY_DELAY_S:
        raise ConfigError(f"{name} must be between 0 and {MAX_RETRY_DELAY_S:g} s, not {value}")


@dataclass(frozen=True)
class Backoff:
    """The common part of the ready policies; subclasses give :meth:`ceiling_s`.

    ``jitter`` is the fraction of the delay that may be taken away at random: 0 waits
    exactly the delay, 0.5 anywhere between half of it and all of it, 1 anywhere from 0.
    An error that is an instance of one of ``dead_on`` sends the job to ``dead`` at once
    (reason ``"failed"``) instead of retrying it.
    """

    jitter: float = field(default=0.0, kw_only=True)
    dead_on: tuple[type[BaseException], ...] = field(default=(), kw_only=True)
    rng: random.Random = field(
        default_factory=random.Random, kw_only=True, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        _check_fraction("jitter", self.jitter)

    def ceiling_s(self, attempt: int) -> float:
        """The delay before jitter after failed attempt number ``attempt`` (1 first)."""
        raise NotImplementedError

    def delay_ms(self, attempt: int) -> int:
        """The delay, jitter applied, after failed attempt number ``attempt``."""
        ceiling_s = self.ceiling_s(attempt)
        return round(1000 * ceiling_s * (1.0 - self.jitter * self.rng.random()))

    def __call__(self, ctx: JobContext[Any], error: BaseException) -> FailureAction:
        if isinstance(error, self.dead_on):
            return FailureAction(dead=True)
        return FailureAction(retry_delay_ms=self.delay_ms(ctx.attempt))


@dataclass(frozen=True)
class FixedBackoff(Backoff):
    """Wait ``delay_s`` before every retry (``FixedBackoff(0)`` retries at once)."""

    delay_s: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_delay("delay_s", self.delay_s)

    def ceiling_s(self, attempt: int) -> float:
        return self.delay_s


@dataclass(frozen=True)
class ExponentialBackoff(Backoff):
    """Wait ``base_s`` after the first attempt, ``factor`` times longer after each next
    one, never more than ``cap_s``; by default up to half of each delay is jitter."""

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 300.0
    jitter: float = field(default=0.5, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_delay("cap_s", self.cap_s)
        if not 0.0 < self.base_s <= self.cap_s:
            raise ConfigError(
                f"need 0 < base_s <= cap_s, got base_s={self.base_s}, cap_s={self.cap_s}"
            )
        if self.factor < 1.0:
            raise ConfigError(f"factor must be at least 1, not {self.factor}")

    def ceiling_s(self, attempt: int) -> float:
        try:
            delay_s = self.base_s * self.factor ** max(0, attempt - 1)
        except OverflowError:
            return self.cap_s
        return min(self.cap_s, delay_s)
