"""The broker: the ASGI app (REST, WebSocket, Connect), the service and the process."""

from osqueue.broker.server import (
    Broker,
    BrokerConfig,
    BrokerHandle,
    run_broker_in_background,
    serve,
)

__all__ = ["Broker", "BrokerConfig", "BrokerHandle", "run_broker_in_background", "serve"]
