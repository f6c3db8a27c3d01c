"""JobRegistry: registering models, validating payloads, preparing submits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from osqueue.client import AsyncOsqueueClient, JobSpec
from osqueue.errors import BrokerProtocolError
from osqueue.model import decode_json
from osqueue.registry import JobRegistry
from tests.unit.scripted_broker import Received, ScriptedBroker


class ResizeArgs(BaseModel):
    path: str
    width: int = Field(gt=0)
    height: int = 100


class Aliased(BaseModel):
    model_config = ConfigDict(populate_by_name=False)
    source_path: str = Field(alias="sourcePath")


@pytest.fixture
def registry() -> JobRegistry:
    reg = JobRegistry()
    reg.register("resize", ResizeArgs)
    return reg


def test_register_directly_and_as_decorator(registry: JobRegistry) -> None:
    @registry.register("notify")
    class NotifyArgs(BaseModel):
        to: str

    assert registry.types == ["resize", "notify"]
    assert registry.model_for("notify") is NotifyArgs
    assert registry.type_of(ResizeArgs) == "resize"
    assert "notify" in registry and "other" not in registry
    assert registry.model_for(None) is None


def test_registering_another_model_for_a_type_is_refused(registry: JobRegistry) -> None:
    registry.register("resize", ResizeArgs)  # the same model again is harmless

    class Other(BaseModel):
        x: int

    with pytest.raises(BrokerProtocolError, match="already registered with ResizeArgs"):
        registry.register("resize", Other)


def test_register_refuses_what_is_not_a_model() -> None:
    with pytest.raises(BrokerProtocolError, match="needs a pydantic model"):
        JobRegistry().register("x", dict)  # type: ignore[type-var]
    with pytest.raises(BrokerProtocolError, match="non-empty string"):
        JobRegistry().register("", ResizeArgs)


def test_validate_returns_the_model_instance(registry: JobRegistry) -> None:
    args = registry.validate("resize", {"path": "a.png", "width": 10})
    assert isinstance(args, ResizeArgs)
    assert args == ResizeArgs(path="a.png", width=10, height=100)


def test_validate_names_the_bad_fields(registry: JobRegistry) -> None:
    with pytest.raises(BrokerProtocolError) as caught:
        registry.validate("resize", {"width": -1})
    err = caught.value
    assert "path: Field required" in err.message
    assert "width: Input should be greater than 0" in err.message
    assert err.fields["type"] == "resize"
    assert {tuple(e["loc"]) for e in err.fields["errors"]} == {("path",), ("width",)}
    assert err.to_body()["_tag"] == "BrokerProtocolError"


def test_validate_unknown_type_is_refused(registry: JobRegistry) -> None:
    with pytest.raises(BrokerProtocolError, match="'nope' is not registered"):
        registry.validate("nope", {})


def test_validate_accepts_an_instance_of_another_model(registry: JobRegistry) -> None:
    class Looser(BaseModel):
        path: str
        width: int

    assert registry.validate("resize", Looser(path="p", width=3)) == ResizeArgs(path="p", width=3)
    with pytest.raises(BrokerProtocolError, match="width"):
        registry.validate("resize", Looser(path="p", width=0))


def test_prepare_finds_the_type_of_a_model_and_dumps_it(registry: JobRegistry) -> None:
    job_type, payload = registry.prepare(None, ResizeArgs(path="p", width=3))
    assert (job_type, payload) == ("resize", {"path": "p", "width": 3, "height": 100})


def test_prepare_fills_defaults_of_a_plain_payload(registry: JobRegistry) -> None:
    assert registry.prepare("resize", {"path": "p", "width": 3}) == (
        "resize",
        {"path": "p", "width": 3, "height": 100},
    )


def test_prepare_passes_unregistered_types_unless_strict(registry: JobRegistry) -> None:
    assert registry.prepare("email", {"any": "thing"}) == ("email", {"any": "thing"})
    assert registry.prepare(None, [1, 2]) == (None, [1, 2])
    strict = JobRegistry(strict=True)
    strict.register("resize", ResizeArgs)
    with pytest.raises(BrokerProtocolError, match="strict"):
        strict.prepare("email", {})


def test_aliased_model_round_trips_through_the_dump() -> None:
    reg = JobRegistry()
    reg.register("copy", Aliased)
    _, payload = reg.prepare("copy", Aliased(sourcePath="/a"))
    assert payload == {"sourcePath": "/a"}
    assert reg.validate("copy", payload) == Aliased(sourcePath="/a")


def test_handler_decorator_records_handlers(registry: JobRegistry) -> None:
    @registry.handler("resize")
    def resize(ctx: Any) -> None:
        return None

    assert registry.handlers == {"resize": resize}


def _job_ids(request: Received) -> web.Response:
    """The scripted broker's answer: a job id, or two for a batch."""
    if request.path == "/v1/jobs/batch":
        return web.json_response({"results": [{"jobId": "b1"}, {"jobId": "b2"}]})
    return web.json_response({"jobId": "j1"})


def _bodies(broker: ScriptedBroker) -> list[Any]:
    return [decode_json(request.content) for request in broker.requests]


async def test_client_validates_and_dumps_on_submit(
    registry: JobRegistry, scripted: Callable[..., ScriptedBroker]
) -> None:
    broker = scripted(_job_ids)
    transport = broker.transport()
    async with AsyncOsqueueClient(
        transport=transport, registry=registry, auto_idempotency=False
    ) as client:
        assert await client.submit(ResizeArgs(path="p", width=2)) == "j1"
        await client.submit({"path": "q", "width": 5}, type="resize")
        with pytest.raises(BrokerProtocolError, match="width"):
            await client.submit({"path": "q", "width": 0}, type="resize")
        await client.submit_batch([JobSpec(ResizeArgs(path="r", width=1)), JobSpec({"x": 1})])
    assert _bodies(broker) == [
        {"payload": {"path": "p", "width": 2, "height": 100}, "type": "resize"},
        {"payload": {"path": "q", "width": 5, "height": 100}, "type": "resize"},
        {
            "jobs": [
                {"payload": {"path": "r", "width": 1, "height": 100}, "type": "resize"},
                {"payload": {"x": 1}},
            ]
        },
    ]


async def test_client_without_registry_dumps_models(
    scripted: Callable[..., ScriptedBroker],
) -> None:
    broker = scripted(_job_ids)
    transport = broker.transport()
    async with AsyncOsqueueClient(transport=transport, auto_idempotency=False) as client:
        await client.submit(ResizeArgs(path="p", width=2), type="resize")
    assert _bodies(broker) == [
        {"payload": {"path": "p", "width": 2, "height": 100}, "type": "resize"}
    ]
