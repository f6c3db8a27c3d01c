"""Helpers to run the ``osqueue`` CLI in subprocesses, configured by environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

OSQUEUE = [sys.executable, "-m", "osqueue"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll an observable condition until it holds; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Processes:
    """Starts CLI processes and makes sure none outlives the test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {
            **os.environ,
            "STORAGE_URL": f"file://{workdir / 'store'}",
            "PYTHONUNBUFFERED": "1",
        }
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        with (self.workdir / f"proc-{len(self.started)}.log").open("w") as log:
            proc = subprocess.Popen(
                [*OSQUEUE, *args],
                cwd=self.workdir,
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.started.append(proc)
        return proc

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout_s: float = 60,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end; ``input_text`` is its stdin (else an empty one)."""
        return subprocess.run(
            [*OSQUEUE, *args],
            cwd=self.workdir,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            input=input_text if input_text is not None else "",
        )

    def output(self, proc: subprocess.Popen[str]) -> str:
        index = self.started.index(proc)
        return (self.workdir / f"proc-{index}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()
