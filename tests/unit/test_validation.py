"""Request body parsing: depth and 64-bit limits, and submits with and without options."""

from __future__ import annotations

import orjson
import pytest

from osqueue.broker.validation import (
    MAX_JSON_DEPTH,
    Unrepresentable,
    parse_body,
    parse_submit,
)
from osqueue.errors import BrokerProtocolError
from osqueue.state import SubmitSpec


def nested(levels: int) -> bytes:
    """A submit whose payload is ``levels`` lists, one inside the other."""
    return b'{"payload": ' + b"[" * levels + b"]" * levels + b"}"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert parse_body(nested(MAX_JSON_DEPTH - 1))["payload"]


def test_nesting_past_the_limit_is_refused_naming_where() -> None:
    with pytest.raises(BrokerProtocolError, match=r"deeper than 200 levels at \$\.payload\["):
        parse_body(nested(MAX_JSON_DEPTH))


def test_many_brackets_side_by_side_are_not_depth() -> None:
    body = {"jobs": [{"payload": {"n": [i]}, "type": "t"} for i in range(3 * MAX_JSON_DEPTH)]}
    assert parse_body(orjson.dumps(body)) == body


@pytest.mark.parametrize(
    "number",
    [b"999999999999999999", b"18446744073709551615", b"-9223372036854775808"],
)
def test_integers_that_fit_in_64_bits_come_back_exactly(number: bytes) -> None:
    assert parse_body(b'{"payload": ' + number + b"}") == {"payload": int(number)}


@pytest.mark.parametrize("number", [b"18446744073709551616", b"-9223372036854775809"])
def test_integers_beyond_64_bits_are_refused_naming_the_field(number: bytes) -> None:
    with pytest.raises(BrokerProtocolError, match=r"\$\.payload\.n does not fit in 64 bits"):
        parse_body(b'{"payload": {"n": ' + number + b"}}")


def test_long_digit_runs_inside_strings_are_kept() -> None:
    raw = b'{"payload": "123456789012345678901234567890"}'
    assert parse_body(raw) == {"payload": "123456789012345678901234567890"}


def test_lenient_parse_marks_a_big_integer_and_its_submit_alone_is_refused() -> None:
    raw = b'{"jobs": [{"payload": 18446744073709551616}, {"payload": 2}]}'
    jobs = parse_body(raw, lenient=True)["jobs"]
    assert isinstance(jobs[0]["payload"], Unrepresentable)
    with pytest.raises(BrokerProtocolError, match="beyond 64 bits"):
        parse_submit(jobs[0])
    assert parse_submit(jobs[1]) == SubmitSpec(2)


@pytest.mark.parametrize(
    ("body", "spec"),
    [
        ({"payload": 1}, SubmitSpec(1)),
        ({"payload": None, "type": None}, SubmitSpec(None)),
        ({"payload": [1], "type": "a"}, SubmitSpec([1], "a")),
        (
            {"payload": 1, "type": "a", "maxAttempts": 2, "priority": 0},
            SubmitSpec(1, "a", max_attempts=2),
        ),
        (
            {"payload": 1, "delayMs": 5, "runAt": 7, "priority": -3, "idempotencyKey": "k"},
            SubmitSpec(1, run_at_ms=7, delay_ms=5, priority=-3, idempotency_key="k"),
        ),
    ],
)
def test_submit_with_and_without_options(body: dict[str, object], spec: SubmitSpec) -> None:
    assert parse_submit(body) == spec


@pytest.mark.parametrize(
    "body",
    [{"payload": 1, "type": 5}, {"payload": 1, "type": "t" * 257}, {"type": "a"}, [1]],
)
def test_bad_submits_are_refused(body: object) -> None:
    with pytest.raises(BrokerProtocolError):
        parse_submit(body)
