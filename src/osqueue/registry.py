"""Job types as pydantic models, shared by the code that submits jobs and the workers.

::

    registry = JobRegistry()

    @registry.register("resize")
    class ResizeArgs(BaseModel):
        path: str
        width: int

    @registry.handler("resize")
    async def resize(ctx: JobContext[ResizeArgs]) -> None: ...

A client given the registry validates a payload before submitting it (a model instance is
accepted too and sent as its JSON dump); a worker given the registry validates the payload
of every job it claims and hands the handler the model instance. A payload that does not
validate raises :class:`~osqueue.errors.BrokerProtocolError` on submit; a worker sends such
a job to ``dead`` with reason ``invalid_payload``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from osqueue.errors import BrokerProtocolError

__all__ = ["JobRegistry", "dump_payload"]

ModelT = TypeVar("ModelT", bound=BaseModel)
HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])

_MAX_ERRORS_IN_MESSAGE = 5


def dump_payload(model: BaseModel) -> Any:
    """The JSON value sent for a model instance.

    Dumped by alias, so that validating the dump against the same model (on the worker)
    works whether or not the model accepts field names as input.
    """
    return model.model_dump(mode="json", by_alias=True)


class JobRegistry:
    """A mapping of job type names to pydantic models, and optionally to handlers.

    With ``strict=True`` a client refuses to submit a job whose type is not registered;
    otherwise such payloads are sent as they are.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._models: dict[str, type[BaseModel]] = {}
        self._handlers: dict[str, Callable[..., Any]] = {}

    def __contains__(self, type_: object) -> bool:
        return type_ in self._models

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"JobRegistry({sorted(self._models)!r})"

    # -- registering ----------------------------------------------------------------------

    @overload
    def register(self, type_: str, model: type[ModelT]) -> type[ModelT]: ...

    @overload
    def register(self, type_: str) -> Callable[[type[ModelT]], type[ModelT]]: ...

    def register(
        self, type_: str, model: type[ModelT] | None = None
    ) -> type[ModelT] | Callable[[type[ModelT]], type[ModelT]]:
        """Register ``model`` as the payload of job type ``type_``.

        Called with the model it registers it at once; called with the type name only it
        returns a class decorator. Registering a second model for a type is an error.
        """
        if model is not None:
            self._add_model(type_, model)
            return model

        def decorate(cls: type[ModelT]) -> type[ModelT]:
            self._add_model(type_, cls)
            return cls

        return decorate

    def _add_model(self, type_: str, model: type[BaseModel]) -> None:
        if not isinstance(type_, str) or not type_:
            raise BrokerProtocolError(f"a job type must be a non-empty string, not {type_!r}")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise BrokerProtocolError(f"job type {type_!r} needs a pydantic model, not {model!r}")
        known = self._models.get(type_)
        if known is not None and known is not model:
            raise BrokerProtocolError(
                f"job type {type_!r} is already registered with {known.__name__}"
            )
        self._models[type_] = model

    def handler(self, type_: str) -> Callable[[HandlerT], HandlerT]:
        """A decorator that makes the function the handler of ``type_`` for workers."""

        def decorate(func: HandlerT) -> HandlerT:
            self._handlers[type_] = func
            return func

        return decorate

    # -- looking up -----------------------------------------------------------------------

    @property
    def types(self) -> list[str]:
        """The registered type names, in registration order."""
        return list(self._models)

    @property
    def handlers(self) -> Mapping[str, Callable[..., Any]]:
        """The handlers registered with :meth:`handler`, by type."""
        return dict(self._handlers)

    def model_for(self, type_: str | None) -> type[BaseModel] | None:
        """The model of ``type_``, or None when it is not registered."""
        return self._models.get(type_) if type_ is not None else None

    def type_of(self, model: type[BaseModel]) -> str | None:
        """The type name ``model`` is registered under, or None."""
        for name, known in self._models.items():
            if known is model:
                return name
        return None

    # -- validating -----------------------------------------------------------------------

    def validate(self, type_: str | None, payload: Any) -> BaseModel:
        """Validate ``payload`` (JSON value or model instance) as job type ``type_``.

        Raises :class:`~osqueue.errors.BrokerProtocolError` when the type is not registered
        or the payload does not fit its model; the error's ``errors`` field lists what is
        wrong.
        """
        model = self.model_for(type_)
        if model is None:
            raise BrokerProtocolError(
                f"job type {type_!r} is not registered; registered: {sorted(self._models)}",
                type=type_,
            )
        if isinstance(payload, model):
            return payload
        if isinstance(payload, BaseModel):
            payload = dump_payload(payload)
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            raise _invalid(type_, model, exc) from None

    def prepare(self, type_: str | None, payload: Any) -> tuple[str | None, Any]:
        """The ``(type, JSON payload)`` to submit for a payload given by a producer.

        A model instance names its own type when ``type_`` is None. Registered types are
        validated and sent as the validated model's dump; other payloads go through as
        they are, unless the registry is strict.
        """
        if type_ is None and isinstance(payload, BaseModel):
            type_ = self.type_of(type(payload))
        if self.model_for(type_) is not None:
            return type_, dump_payload(self.validate(type_, payload))
        if self.strict:
            raise BrokerProtocolError(
                f"job type {type_!r} is not registered and the registry is strict; "
                f"registered: {sorted(self._models)}",
                type=type_,
            )
        return type_, dump_payload(payload) if isinstance(payload, BaseModel) else payload


def _invalid(
    type_: str | None, model: type[BaseModel], exc: ValidationError
) -> BrokerProtocolError:
    errors = [
        {"loc": [str(part) for part in err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    shown = "; ".join(
        f"{'.'.join(e['loc']) or '(payload)'}: {e['msg']}" for e in errors[:_MAX_ERRORS_IN_MESSAGE]
    )
    more = len(errors) - _MAX_ERRORS_IN_MESSAGE
    if more > 0:
        shown += f"; and {more} more"
    return BrokerProtocolError(
        f"payload of job type {type_!r} does not fit {model.__name__}: {shown}",
        type=type_,
        errors=errors,
    )
