"""Fixtures of the unit tests: scripted brokers on loopback for the client's tests."""

from tests.unit.scripted_broker import broker_thread, scripted

__all__ = ["broker_thread", "scripted"]
