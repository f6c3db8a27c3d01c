"""Parse and check request bodies: every mistake becomes a BrokerProtocolError that says
which field is wrong and why. Shared by REST, WebSocket and Connect."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import orjson

from osqueue.errors import BrokerProtocolError
from osqueue.state import DEFAULT_MAX_ATTEMPTS, SubmitSpec

__all__ = [
    "MAX_ATTEMPTS_LIMIT",
    "MAX_JSON_DEPTH",
    "MAX_TYPE_LENGTH",
    "Unrepresentable",
    "parse_body",
    "parse_claim",
    "parse_fail",
    "parse_lease",
    "parse_submit",
]

#: Dead reasons a worker may ask for; the broker itself sets the others.
FAIL_REASONS = frozenset(("failed", "invalid_payload"))
MAX_TYPE_LENGTH = 256
MAX_KEY_LENGTH = 512
MAX_ATTEMPTS_LIMIT = 1000
MAX_TYPES = 100
MAX_WAIT_MS = 60_000
MAX_DELAY_MS = 366 * 24 * 3600 * 1000
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
#: orjson encodes at most 254 levels and the state document puts a few around each payload.
MAX_JSON_DEPTH = 200
#: Integers of 19 digits or more may not fit in 64 bits. Found by mapping every digit to
#: "0" and looking for a run of zeros: much cheaper than a regular expression.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"0" * 9)
_LONG_RUN = b"0" * 19
#: A tuple: isinstance is faster with it than with a union.
_CONTAINERS = (dict, list)
#: The keys of a submit without options.
_PLAIN_SUBMIT = frozenset(("payload", "type"))


class Unrepresentable:
    """Stands in, in a leniently parsed body, for a value the state could not hold."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


class _TaintedDict(dict[str, Any]):
    """An object that holds an :class:`Unrepresentable` somewhere inside."""


class _TaintedList(list[Any]):
    """An array that holds an :class:`Unrepresentable` somewhere inside."""


def _nodes(value: Any) -> Iterator[tuple[str, int, Any]]:
    """Every value inside ``value`` with its JSON path and nesting depth, without recursion."""
    stack: list[tuple[str, int, Any]] = [("$", 0, value)]
    while stack:
        path, depth, node = stack.pop()
        yield path, depth, node
        if isinstance(node, dict):
            stack.extend((f"{path}.{k}", depth + 1, v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", depth + 1, v) for i, v in reversed(list(enumerate(node))))


def _is_big_int(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not INT64_MIN <= value <= UINT64_MAX
    )


def _has_long_digit_run(raw: bytes) -> bool:
    return _LONG_RUN in raw.translate(_DIGITS_TO_ZERO)


def _nests_too_deep(value: Any) -> bool:
    """Whether a container lies ``MAX_JSON_DEPTH`` levels down; visits containers only,
    one level at a time."""
    level = [value] if isinstance(value, _CONTAINERS) else []
    depth = 0
    while level:
        if depth >= MAX_JSON_DEPTH:
            return True
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, _CONTAINERS)
        ]
        depth += 1
    return False


def _check_depth(raw: bytes, value: Any) -> None:
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return  # cannot nest deeper than it has brackets
    if not _nests_too_deep(value):
        return
    for path, depth, node in _nodes(value):  # find the place to name it
        if depth >= MAX_JSON_DEPTH and isinstance(node, dict | list):
            raise BrokerProtocolError(
                f"request body nests deeper than {MAX_JSON_DEPTH} levels at {path[:80]}..."
            )


def _float_or_mark(text: str) -> float | Unrepresentable:
    value = float(text)
    if math.isfinite(value):
        return value
    return Unrepresentable(f"{text}, which overflows to infinity; send a smaller number")


def _constant(name: str) -> Unrepresentable:
    return Unrepresentable(f"{name}, which JSON cannot carry; send a number or a string")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _taint(value: Any) -> tuple[Any, bool]:
    """Replace what the state cannot hold by :class:`Unrepresentable` and mark the
    containers above it, so that each part of the body can be judged on its own."""
    if isinstance(value, Unrepresentable):
        return value, True
    if isinstance(value, str):
        return (
            (value, False)
            if _utf8(value)
            else (Unrepresentable("text that is not valid UTF-8"), True)
        )
    if _is_big_int(value):
        return Unrepresentable("an integer beyond 64 bits; send it as a string"), True
    if isinstance(value, dict):
        items = [(k, *_taint(v)) for k, v in value.items()]
        tainted = any(t for _, _, t in items) or not all(_utf8(k) for k in value)
        pairs = {k if _utf8(k) else ascii(k): v for k, v, _ in items}
        return (_TaintedDict(pairs) if tainted else pairs), tainted
    if isinstance(value, list):
        marked = [_taint(v) for v in value]
        tainted = any(t for _, t in marked)
        values = [v for v, _ in marked]
        return (_TaintedList(values) if tainted else values), tainted
    return value, False


def _first_unrepresentable(value: Any) -> str:
    for path, _depth, node in _nodes(value):
        if isinstance(node, Unrepresentable):
            return f"{path} is {node.what}"
        if isinstance(node, _TaintedDict) and not all(_utf8(k) for k in node):
            return f"{path} has a key that is not UTF-8"
    return "$ holds a value JSON cannot carry"


def parse_body(raw: bytes, *, lenient: bool = False) -> Any:
    """Decode a request body strictly.

    orjson refuses NaN, Infinity, overflowing numbers and invalid UTF-8, but it silently
    turns integers beyond 64 bits into floats; such a body is refused instead, naming the
    field, because the payload would not come back as it was sent. Bodies nested deeper
    than ``MAX_JSON_DEPTH`` are refused too: the state document could not be encoded.

    With ``lenient`` (a batch, whose parts are answered one by one) a body that is JSON
    apart from such values is accepted; each value is replaced by an
    :class:`Unrepresentable`, and :func:`parse_submit` refuses the parts that hold one.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if not lenient:
            raise BrokerProtocolError(f"request body is not valid JSON: {exc}") from exc
        return _parse_leniently(raw, exc)
    _check_depth(raw, value)
    if _has_long_digit_run(raw):
        exact = json.loads(raw)
        if lenient:
            return _taint(exact)[0]
        for path, _depth, node in _nodes(exact):
            if _is_big_int(node):
                raise BrokerProtocolError(
                    f"integer at {path} does not fit in 64 bits; send it as a string"
                )
    return value


def _parse_leniently(raw: bytes, strict_error: orjson.JSONDecodeError) -> Any:
    try:
        text = raw.decode("utf-8", errors="surrogateescape")
        value = json.loads(text, parse_constant=_constant, parse_float=_float_or_mark)
    except (ValueError, RecursionError):
        raise BrokerProtocolError(f"request body is not valid JSON: {strict_error}") from None
    _check_depth(raw, value)
    return _taint(value)[0]


def _object(body: Any, what: str) -> dict[str, Any]:
    if isinstance(body, _TaintedDict):
        raise BrokerProtocolError(f"{what} body refused: {_first_unrepresentable(body)}")
    if not isinstance(body, dict):
        raise BrokerProtocolError(f"{what} body must be a JSON object, got {type(body).__name__}")
    return body


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BrokerProtocolError(f"{name} must be an integer, got {value!r:.50}")
    if not low <= value <= high:
        raise BrokerProtocolError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _str(body: dict[str, Any], name: str, max_length: int, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BrokerProtocolError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise BrokerProtocolError(f"{name} must be a string, got {type(value).__name__}")
    if required and not value:
        raise BrokerProtocolError(f"{name} must not be empty")
    if len(value) > max_length:
        raise BrokerProtocolError(f"{name} is {len(value)} characters; the limit is {max_length}")
    return value


def _required_str(body: dict[str, Any], name: str, max_length: int) -> str:
    value = _str(body, name, max_length, required=True)
    if value is None:  # unreachable: _str raises for a missing required field
        raise BrokerProtocolError(f"{name} is required")
    return value


def parse_submit(body: Any) -> SubmitSpec:
    body = _object(body, "submit")
    if "payload" not in body:
        raise BrokerProtocolError("payload is required (any JSON value, null included)")
    if body.keys() <= _PLAIN_SUBMIT:  # the common case: no option to check
        return SubmitSpec(body["payload"], _str(body, "type", MAX_TYPE_LENGTH))
    max_attempts = _int(body, "maxAttempts", 1, MAX_ATTEMPTS_LIMIT)
    return SubmitSpec(
        payload=body["payload"],
        type=_str(body, "type", MAX_TYPE_LENGTH),
        max_attempts=DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts,
        run_at_ms=_int(body, "runAt", 0, 2**53),
        delay_ms=_int(body, "delayMs", 0, MAX_DELAY_MS),
        priority=_int(body, "priority", -(2**31), 2**31 - 1) or 0,
        idempotency_key=_str(body, "idempotencyKey", MAX_KEY_LENGTH),
    )


def parse_claim(body: Any) -> tuple[str, list[str] | None, int]:
    """(worker id, type filter or None, wait in ms)."""
    body = _object(body, "claim")
    worker_id = _required_str(body, "workerId", MAX_KEY_LENGTH)
    types = body.get("types")
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise BrokerProtocolError("types must be a list of strings")
        if len(types) > MAX_TYPES:
            raise BrokerProtocolError(f"types lists {len(types)} types; the limit is {MAX_TYPES}")
    wait_ms = _int(body, "waitMs", 0, MAX_WAIT_MS) or 0
    return worker_id, types or None, wait_ms


def parse_lease(body: Any) -> tuple[str, int | None]:
    """(worker id, attempt or None) of a heartbeat, complete or fail."""
    body = _object(body, "request")
    worker_id = _required_str(body, "workerId", MAX_KEY_LENGTH)
    return worker_id, _int(body, "attempt", 0, MAX_ATTEMPTS_LIMIT)


def parse_fail(body: Any) -> tuple[str | None, int | None, str | None]:
    """(error text, retry delay in ms, dead reason) of a fail."""
    body = _object(body, "fail")
    error = _str(body, "error", 64 * 1024)
    delay = _int(body, "retryDelayMs", 0, MAX_DELAY_MS)
    reason = _str(body, "reason", 64)
    if reason is not None and reason not in FAIL_REASONS:
        raise BrokerProtocolError(
            f"reason must be 'failed' or 'invalid_payload' when given, got {reason!r}"
        )
    return error, delay, reason


def parse_requeue(body: Any) -> tuple[list[str] | None, str | None]:
    """(job ids or None for all, type or None) of a dead-letter requeue."""
    body = _object({} if body is None else body, "requeue")
    job_ids = body.get("jobIds")
    if job_ids is not None and (
        not isinstance(job_ids, list) or not all(isinstance(j, str) for j in job_ids)
    ):
        raise BrokerProtocolError("jobIds must be a list of strings")
    return job_ids, _str(body, "type", MAX_TYPE_LENGTH)


def parse_job_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise BrokerProtocolError("jobId must be a non-empty string")
    return value
