"""The state document's types and its strict JSON codec.

The document is plain JSON objects all the way down: jobs stay ``dict`` so that fields this
version does not know (written by a newer broker, or the TypeScript one) survive a round trip.
The ``TypedDict`` classes below name the fields osqueue itself reads and writes.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import orjson

from osqueue.errors import BrokerProtocolError, EngineStateError

__all__ = [
    "DEAD_REASONS",
    "DeadJob",
    "Job",
    "StateDocument",
    "decode_json",
    "decode_state",
    "empty_document",
    "encode_json",
    "encode_state",
    "freeze_payload",
    "thaw_payload",
]

JobStatus = Literal["unclaimed", "in_progress"]
DeadReason = Literal["exhausted", "failed", "invalid_payload", "heartbeat_timeout", "cancelled"]
DEAD_REASONS: frozenset[str] = frozenset(
    ("exhausted", "failed", "invalid_payload", "heartbeat_timeout")
)


class Job(TypedDict):
    id: str
    status: JobStatus
    payload: Any
    createdAt: int
    attempts: int
    maxAttempts: int
    type: NotRequired[str]
    workerId: NotRequired[str]
    heartbeat: NotRequired[int]
    runAt: NotRequired[int]
    priority: NotRequired[int]
    lastError: NotRequired[str]
    idempotencyKey: NotRequired[str]


class DeadJob(Job):
    reason: DeadReason
    deadAt: int


class StateDocument(TypedDict):
    broker: str | None
    brokerHeartbeat: int
    jobs: list[Job]
    completedTotal: int
    brokerId: NotRequired[str]
    epoch: NotRequired[int]
    dead: NotRequired[list[DeadJob]]
    deadTotal: NotRequired[int]
    commitId: NotRequired[str]


def empty_document() -> dict[str, Any]:
    """What an absent object means: an empty queue with no broker."""
    return {"broker": None, "brokerHeartbeat": 0, "jobs": [], "completedTotal": 0}


def encode_json(value: Any) -> bytes:
    """Encode strictly: a float that is NaN or infinite raises instead of becoming null.

    orjson itself refuses integers beyond 64 bits; both come out as BrokerProtocolError.
    """
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise BrokerProtocolError(f"value cannot be encoded as JSON: {exc}") from exc


def freeze_payload(value: Any) -> orjson.Fragment:
    """A payload as the broker keeps it: its JSON text, which it never looks inside.

    Encoding the document, a claim answer or a Connect message then copies the text as it
    is. A parsed payload costs several times its text in Python objects (a dict of two
    short fields about 300 bytes, against about 90 here), which is most of a large queue's
    memory. The text is copied into a bytes object of its exact size: what orjson returns
    keeps its whole working buffer allocated (about 4 KB) for as long as it lives.
    """
    if isinstance(value, orjson.Fragment):
        return value
    return orjson.Fragment(b"%b" % encode_json(value))  # formatting makes an exact copy


def thaw_payload(value: Any) -> Any:
    """The Python value of a payload that :func:`freeze_payload` froze (others as they are)."""
    if isinstance(value, orjson.Fragment):
        return orjson.loads(orjson.dumps(value))  # a Fragment encodes as its text
    return value


def decode_json(data: bytes | str) -> Any:
    """Decode JSON the broker wrote (orjson refuses NaN, Infinity and invalid UTF-8).

    orjson turns integers beyond 64 bits into floats; text from users goes through
    ``osqueue.broker.validation.parse_body``, which refuses them instead.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BrokerProtocolError(f"malformed JSON: {exc}") from exc


def encode_state(doc: dict[str, Any] | list[Any]) -> bytes:
    """The bytes of the state document, or of a piece of it (compact, UTF-8)."""
    try:
        return orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise EngineStateError(f"state document cannot be encoded: {exc}") from exc


def decode_state(data: bytes) -> dict[str, Any]:
    """Parse a stored document, filling the fields an older writer left out."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EngineStateError(f"stored state is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs", []), list):
        raise EngineStateError("stored state is not an osqueue document (no jobs list)")
    for key, default in empty_document().items():
        doc.setdefault(key, default)
    for job in doc["jobs"]:
        if not isinstance(job, dict) or not isinstance(job.get("id"), str):
            raise EngineStateError("stored state holds a job without a string id")
    return doc
