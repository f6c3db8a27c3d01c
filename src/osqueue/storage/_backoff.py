"""Jittered exponential backoff shared by the network backends (S3, GCS)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays for retry ``attempt`` 0, 1, 2...: exponential, capped, with "equal jitter".

    The delay for an attempt is uniform in ``[d/2, d]`` with ``d = min(cap, base * 2**attempt)``,
    so retries never come back at once (useful against a 429) yet callers that failed together
    spread out.
    """

    base_ms: float = 100.0
    cap_ms: float = 5_000.0
    rng: random.Random = field(default_factory=random.Random)

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry)."""
        ceiling_ms = min(self.cap_ms, self.base_ms * (1 << min(attempt, 30)))
        jitter_ms: float = self.rng.uniform(0, ceiling_ms / 2)
        return (ceiling_ms / 2 + jitter_ms) / 1000
