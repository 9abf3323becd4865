"""End-to-end helpers: the emulator as a subprocess (it outlives a killed CLI), configs, CLI runs.

The emulator runs in its own process so that the engine under test and the server never share
a GIL or an event loop, exactly as in production.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ingest.emulator import local_env

DATASET = "demo-dataset"
STORAGE_RW = "s3-rw"
STORAGE_RO = "s3-ro"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Emulator:
    def __init__(self, url: str, proc: subprocess.Popen[str]) -> None:
        self.url = url
        self.proc = proc

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        req = urllib.request.Request(
            f"{self.url}/_emulator/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return orjson.loads(raw) if raw else None

    def state(self) -> dict[str, Any]:
        return dict(self._call("GET", "state"))

    def counters(self) -> dict[str, Any]:
        st = self.state()
        return dict(st.get("counters", st))

    def configure(self, **settings: Any) -> None:
        self._call("POST", "config", settings)

    def reset(self) -> None:
        self._call("POST", "reset", {})

    def queue_fault(self, kind: str, count: int) -> None:
        self._call("POST", "faults", {"kind": kind, "count": count})

    def items(self, dataset: str = DATASET) -> list[dict[str, Any]]:
        return list(self._call("GET", f"items?dataset={dataset}")["items"])

    def add_storage(self, **cfg: Any) -> None:
        self._call("POST", "storage", cfg)

    def storage_for(self, bucket: str, *, readonly: bool = False, prefix: str = "thumbs") -> str:
        """A V7 storage configuration for an S3 bucket; returns its name."""
        name = f"{'ro' if readonly else 'rw'}-{bucket}"
        self.add_storage(name=name, provider="aws", bucket=bucket, readonly=readonly, prefix=prefix)
        return name


@contextmanager
def emulator_process(*args: str, port: int | None = None) -> Iterator[Emulator]:
    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ingest",
            "emulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    ready = False
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening" in line:
            ready = True
            break
    if not ready:
        proc.kill()
        raise RuntimeError("emulator did not start")
    try:
        yield Emulator(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def write_config(
    path: Path,
    *,
    v7_url: str,
    s3_url: str,
    bucket: str,
    ledger: Path,
    extra: str = "",
    prefix: str = "",
    storage: str = STORAGE_RW,
) -> Path:
    path.write_text(
        f"""
[v7]
base_url = "{v7_url}"
dataset = "{DATASET}"
storage = "{storage}"
request_timeout_s = 5
connect_timeout_s = 2

[source]
provider = "aws"
bucket = "{bucket}"
prefix = "{prefix}"
endpoint_url = "{s3_url}"

[ledger]
path = "{ledger}"

[output]
progress = false
log_format = "json"
{extra}
""",
        encoding="utf-8",
    )
    return path


def cli_env(**extra: str) -> dict[str, str]:
    return local_env(**extra)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args],
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def job_config(
    tmp_path: Path,
    emulator: Emulator,
    s3_url: str,
    bucket: str,
    storage: str,
    *,
    extra: str = "",
    ledger: Path | None = None,
) -> Path:
    """``write_config`` for the usual test job: c.toml and l.sqlite in ``tmp_path``."""
    return write_config(
        tmp_path / "c.toml",
        v7_url=emulator.url,
        s3_url=s3_url,
        bucket=bucket,
        ledger=ledger or tmp_path / "l.sqlite",
        storage=storage,
        extra=extra,
    )


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll a condition on external state (not a sleep-as-synchronisation: we wait for a fact,
    e.g. a request count on the emulator or an object in the bucket)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def make_clip(path: Path, *, size: str = "160x120", rate: int = 10, duration_s: float = 2) -> bytes:
    """A real H.264 test clip made by ffmpeg (no audio); returns its bytes."""
    source = f"testsrc2=size={size}:rate={rate}:duration={duration_s}"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            source,
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
    )
    return path.read_bytes()
