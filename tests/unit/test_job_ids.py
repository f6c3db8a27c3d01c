"""Job ids: canonical version 4 UUID strings, never repeated, across draws of random bytes."""

from __future__ import annotations

import uuid

from osqueue.broker.service import JobIds


def test_job_ids_are_distinct_canonical_version_4_uuids() -> None:
    ids = JobIds()
    taken = [ids.next() for _ in range(JobIds.PER_DRAW + 7)] + ids.take(3 * JobIds.PER_DRAW)

    assert len(set(taken)) == len(taken)
    for job_id in taken:
        parsed = uuid.UUID(job_id)
        assert str(parsed) == job_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_take_zero_draws_nothing() -> None:
    assert JobIds().take(0) == []
