"""The queue's operations by method name, for the transports that name them.

WebSocket frames and Connect RPCs carry a method name (``submitJob``, ``claimJob``, ...) and
the REST body of the operation. :func:`call_method` runs it through the same
:class:`~osqueue.broker.service.QueueService` call as the REST route, and answers what the
REST route would answer (``{}`` where REST has 204). Per-job methods take ``jobId`` inside
the params.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from osqueue.errors import BrokerProtocolError

if TYPE_CHECKING:
    from osqueue.broker.server import Broker

__all__ = ["METHOD_NAMES", "call_method"]

Method = Callable[["Broker", dict[str, Any]], Awaitable[dict[str, Any]]]


def _leader_only(broker: Broker) -> None:
    """Reads answer from memory, so a standby must refuse them itself, as REST does."""
    if not broker.leads_now():
        raise broker.not_leader_error()


async def _submit(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    return await broker.service.submit(params)


async def _submit_batch(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    return await broker.service.submit_batch(params)


async def _claim(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    return await broker.service.claim(params)


async def _heartbeat(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    await broker.service.heartbeat(params.get("jobId"), params)
    return {}


async def _complete(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    await broker.service.complete(params.get("jobId"), params)
    return {}


async def _fail(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    await broker.service.fail(params.get("jobId"), params)
    return {}


async def _stats(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    _leader_only(broker)
    return broker.service.stats()


async def _list_jobs(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    _leader_only(broker)
    return broker.service.list_jobs()


async def _get_job(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    _leader_only(broker)
    return broker.service.get_job(params.get("jobId"))


async def _cancel(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    await broker.service.cancel(params.get("jobId"))
    return {}


async def _dead(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    _leader_only(broker)
    return broker.service.dead()


async def _requeue(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    return await broker.service.requeue_dead(params)


async def _purge(broker: Broker, params: dict[str, Any]) -> dict[str, Any]:
    return await broker.service.purge_dead()


_METHODS: Final[dict[str, Method]] = {
    "submitJob": _submit,
    "submitBatch": _submit_batch,
    "claimJob": _claim,
    "heartbeat": _heartbeat,
    "completeJob": _complete,
    "failJob": _fail,
    "getStats": _stats,
    "listJobs": _list_jobs,
    "getJob": _get_job,
    "cancelJob": _cancel,
    "listDead": _dead,
    "requeueDead": _requeue,
    "purgeDead": _purge,
}

#: Every method name a transport may send.
METHOD_NAMES: Final[frozenset[str]] = frozenset(_METHODS)


async def call_method(broker: Broker, method: Any, params: Any) -> dict[str, Any]:
    """Run ``method`` with the REST body ``params`` and return the REST answer.

    Raises BrokerProtocolError for an unknown method or params that are not an object, and
    whatever error the operation raises.
    """
    handler = _METHODS.get(method) if isinstance(method, str) else None
    if handler is None:
        known = ", ".join(sorted(_METHODS))
        raise BrokerProtocolError(
            f"unknown method {method!r:.100}; the methods are {known}", method=str(method)[:100]
        )
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BrokerProtocolError(
            f"params of {method} must be a JSON object, got {type(params).__name__}",
            method=method,
        )
    return await handler(broker, params)
