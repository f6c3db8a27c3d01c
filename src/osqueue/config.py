"""Settings from the environment (contract section 9), with CLI flags taking precedence.

Every setting has one environment variable; a bad value raises ConfigError naming it, so a
misconfigured broker refuses to start instead of running with a surprise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from osqueue.broker.server import BrokerConfig
from osqueue.engine import EngineConfig
from osqueue.errors import ConfigError

__all__ = ["Setting", "broker_config", "read_setting"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Setting(Generic[T]):
    env: str
    parse: Callable[[str], T]
    default: T
    help: str


def int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def text(raw: str) -> str:
    return raw.strip()


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


DAY_MS = 24 * 3600 * 1000

SETTINGS: dict[str, Setting[Any]] = {
    "host": Setting("BROKER_HOST", text, "0.0.0.0", "address to listen on"),
    "port": Setting("BROKER_PORT", int_range(0, 65535), 8080, "port to listen on"),
    "advertise": Setting(
        "BROKER_ADVERTISE_ADDRESS", text, "", "host:port clients use to reach this broker"
    ),
    "token": Setting("OSQUEUE_TOKEN", text, "", "bearer token required on every request"),
    "max_body": Setting(
        "MAX_BODY_BYTES", int_range(1024, 256 * 1024 * 1024), 1024 * 1024, "request size limit"
    ),
    "commit_interval": Setting(
        "GROUP_COMMIT_INTERVAL_MS", int_range(0, 60_000), 50, "minimum gap between writes"
    ),
    "heartbeat_interval": Setting(
        "BROKER_HEARTBEAT_INTERVAL_MS", int_range(100, 600_000), 3000, "leader heartbeat"
    ),
    "heartbeat_timeout": Setting(
        "BROKER_HEARTBEAT_TIMEOUT_MS", int_range(300, 3_600_000), 10_000, "standby takeover"
    ),
    "job_timeout": Setting(
        "JOB_HEARTBEAT_TIMEOUT_MS", int_range(100, DAY_MS), 30_000, "job lease timeout"
    ),
    "dead_limit": Setting("DEAD_LETTER_LIMIT", int_range(0, 1_000_000), 1000, "dead jobs kept"),
    "idempotency_retention": Setting(
        "IDEMPOTENCY_RETENTION_MS", int_range(0, 30 * DAY_MS), DAY_MS, "idempotency window"
    ),
    "standby": Setting("BROKER_STANDBY", boolean, False, "wait as standby if another leads"),
}


def read_setting(name: str, override: Any, env: Mapping[str, str]) -> Any:
    """The flag's value if given, else the variable's, else the default."""
    setting = SETTINGS[name]
    if override is not None:
        return override
    raw = env.get(setting.env)
    if raw is None or raw == "":
        return setting.default
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{setting.env} {exc}", variable=setting.env) from None


def broker_config(
    overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> BrokerConfig:
    """A BrokerConfig from flags (``overrides``) and the environment."""
    env = os.environ if env is None else env
    flags = overrides or {}

    def get(name: str) -> Any:
        return read_setting(name, flags.get(name), env)

    heartbeat_interval = get("heartbeat_interval")
    heartbeat_timeout = get("heartbeat_timeout")
    if heartbeat_timeout <= heartbeat_interval:
        raise ConfigError(
            "BROKER_HEARTBEAT_TIMEOUT_MS must be larger than BROKER_HEARTBEAT_INTERVAL_MS "
            f"({heartbeat_timeout} <= {heartbeat_interval})"
        )
    return BrokerConfig(
        host=get("host"),
        port=get("port"),
        advertise_address=get("advertise") or None,
        token=get("token") or None,
        max_body_bytes=get("max_body"),
        standby=get("standby"),
        heartbeat_timeout_ms=heartbeat_timeout,
        engine=EngineConfig(
            commit_interval_ms=get("commit_interval"),
            job_timeout_ms=get("job_timeout"),
            broker_heartbeat_interval_ms=heartbeat_interval,
            dead_limit=get("dead_limit"),
            idempotency_retention_ms=get("idempotency_retention"),
        ),
    )
