"""Shared fixtures. Service fixtures live in tests/plugins and are loaded here."""

pytest_plugins: list[str] = ["tests.plugins.emulators"]
