"""Shared helpers for the benchmarks: subprocesses (emulator, synthetic S3, the CLI), configs,
the emulator's admin API, peak RSS of a child, and a little table printing.

Every server runs in its own process, as in production: the engine never shares a GIL or an
event loop with the servers it talks to.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ingest.emulator import local_env

DATASET = "demo-dataset"
STORAGE = "s3-rw"
BUCKET = "demo-bucket"  # the emulator's default storage configuration points here
ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that `finally` stops the servers this process started


signal.signal(signal.SIGTERM, _exit_on_sigterm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workdir(name: str) -> Path:
    d = WORK / name
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def server(cmd: Sequence[str], ready: str = "listening", log: Path | None = None) -> Iterator[int]:
    """Start ``cmd`` (which must print a line containing ``ready``); yield its pid; stop it."""
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    ok = False
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if ready in line:
            ok = True
            break
    if not ok:
        proc.kill()
        raise RuntimeError(f"{cmd[:4]} did not start")
    # Keep draining its output so a chatty server never blocks on a full pipe.
    sink = log.open("w", encoding="utf-8") if log else None

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if sink is not None:
                sink.write(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if sink is not None:
            sink.close()


@contextmanager
def emulator(*args: str) -> Iterator[str]:
    """The V7 emulator (``python -m ingest emulator``) in its own process; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "ingest", "emulator", "--host", "127.0.0.1", "--port", str(port)]
    with server([*cmd, *args]):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def synthetic_s3(objects: int, folders: int = 100, hide_every: int = 0) -> Iterator[str]:
    """benchmarks/synthetic_s3.py serving ``objects`` generated keys (less every
    ``hide_every``-th); yields its URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.synthetic_s3",
        "--port",
        str(port),
        "--objects",
        str(objects),
        "--folders",
        str(folders),
        "--hide-every",
        str(hide_every),
    ]
    with server(cmd):
        yield f"http://127.0.0.1:{port}"


def admin(url: str, path: str, body: Any = None) -> Any:
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(
        f"{url}/_emulator/{path}",
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return orjson.loads(r.read())


def emulator_state(url: str) -> dict[str, Any]:
    return dict(admin(url, "state"))


def write_config(
    path: Path,
    *,
    v7_url: str,
    s3_url: str,
    ledger: Path,
    requests_per_s: float = 10_000,
    max_in_flight: int = 16,
    max_items: int = 500,
    extra: str = "",
    keep_ledger: bool = False,
) -> Path:
    """A run's config; the ledger starts empty unless ``keep_ledger``. The rate defaults suit
    an unlimited emulator (``--rate 0``): V7 round trips out of the way, so the figures are
    the engine's own work."""
    if not keep_ledger:
        for p in ledger.parent.glob(ledger.name + "*"):
            p.unlink()
    path.write_text(
        f"""# Written by the benchmarks.
[v7]
base_url = "{v7_url}"
dataset = "{DATASET}"
storage = "{STORAGE}"
request_timeout_s = 30

[source]
provider = "aws"
bucket = "{BUCKET}"
prefix = ""
endpoint_url = "{s3_url}"

[batch]
max_items = {max_items}
max_bytes = 5000000

[rate]
requests_per_s = {requests_per_s}
max_in_flight = {max_in_flight}

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


@dataclass
class ChildRun:
    """One finished subprocess: exit code, wall time, peak RSS, output, RSS samples."""

    returncode: int
    wall_s: float
    peak_rss_mb: float  # ru_maxrss of this child alone (os.wait4)
    output: str
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (t, MB)


def run_child(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    *,
    timeout_s: float = 3600,
    sample_every_s: float = 0.5,
    log: Path | None = None,
    cwd: Path | None = None,
) -> ChildRun:
    """Run ``cmd``; measure wall time, sample RSS (psutil) and take its exact peak RSS from
    ``wait4`` (the kernel's high-water mark for that child only)."""
    import psutil

    out = (log or (WORK / "last-child.log")).open("w+", encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), env=env or cli_env(), stdout=out, stderr=subprocess.STDOUT, cwd=cwd or ROOT
    )
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    status = 0
    usage: Any = None
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            break
        with suppress(psutil.Error):
            samples.append((time.perf_counter() - t0, ps.memory_info().rss / 2**20))
        time.sleep(sample_every_s)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read()
    out.close()
    peak_kb = float(usage.ru_maxrss) if usage is not None else 0.0
    return ChildRun(proc.returncode, wall, peak_kb / 1024, text, samples)


def servers_usage() -> dict[str, tuple[float, float]]:
    """CPU seconds and RSS (MB) of the servers this process started, by role."""
    import psutil

    out: dict[str, tuple[float, float]] = {}
    for child in psutil.Process().children():
        try:
            cmd = " ".join(child.cmdline())
            cpu = child.cpu_times()
            rss = child.memory_info().rss / 2**20
        except psutil.Error:
            continue
        role = "emulator" if " emulator " in cmd else "s3" if "synthetic_s3" in cmd else ""
        if role:
            out[role] = (cpu.user + cpu.system, rss)
    return out


def ingest_cmd(config: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "ingest", "run", "--config", str(config), *more]


def load_note() -> str:
    """A line on how busy the machine was: load average and core count."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pasted as is into benchmarks/README.md)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def counter(state: dict[str, Any], name: str) -> int:
    return int(state.get("counters", {}).get(name, 0))


def register_requests_by_status(state: dict[str, Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for _t, status in state.get("timeline", []):
        out[int(status)] = out.get(int(status), 0) + 1
    return out
