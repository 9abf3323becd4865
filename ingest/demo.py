"""`./dev demo`: the whole job end to end on this machine, nothing to set up by hand.

Starts a local S3 (moto server) and the V7 emulator (rate limited like V7), creates a sample
bucket (images, videos, PDFs, a DICOM series, files V7 can't take), runs `ingest run` on it as a
user would, runs it a second time to show that nothing is sent twice, then changes the bucket
(10 new objects, 2 overwritten, 3 deleted) and runs the nightly `ingest sync`, and prints what
the emulator holds.
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from ingest.emulator import local_env

BUCKET = "demo-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample_keys(n_images: int) -> list[str]:
    keys = [f"photos/{2020 + i % 5}/img_{i:05d}.jpg" for i in range(n_images)]
    keys += [f"photos/scans/page_{i:03d}.PNG" for i in range(20)]
    keys += [f"videos/clip_{i:02d}.mp4" for i in range(5)] + ["videos/raw/take_1.MOV"]
    keys += [f"docs/report_{i}.pdf" for i in range(5)]
    keys += [f"dicom/patient_1/slice_{i:03d}.dcm" for i in range(12)]
    keys += ["misc/notes.txt", "misc/.DS_Store", "misc/archive.zip"]
    return keys


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def seed(endpoint: str, keys: list[str]) -> None:
    s3 = _s3(endpoint)
    s3.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=b"x" * 64), keys))


def change_bucket(endpoint: str, keys: list[str]) -> tuple[int, int, int]:
    """A day later: 10 new photos, 2 overwritten, 3 deleted (new, changed, vanished)."""
    s3 = _s3(endpoint)
    added = [f"photos/2026/new_{i:02d}.jpg" for i in range(10)]
    for k in added:
        s3.put_object(Bucket=BUCKET, Key=k, Body=b"y" * 64)
    photos = [k for k in keys if k.endswith(".jpg")]
    for k in photos[:2]:
        s3.put_object(Bucket=BUCKET, Key=k, Body=b"edited" * 16)
    for k in photos[-3:]:
        s3.delete_object(Bucket=BUCKET, Key=k)
    return len(added), 2, 3


def start_emulator(port: int, rate: float) -> subprocess.Popen[str]:
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
            "--rate",
            str(rate),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening" in line:
            return proc
    proc.kill()
    raise SystemExit("error: the V7 emulator did not start")


def emulator_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_emulator/state", timeout=10) as r:
        return dict(orjson.loads(r.read()))


def write_config(path: Path, s3_url: str, v7_url: str, ledger: Path) -> None:
    path.write_text(
        f"""# Written by `./dev demo`.
[v7]
base_url = "{v7_url}"
dataset = "demo-dataset"
storage = "s3-rw"

[source]
provider = "aws"
bucket = "{BUCKET}"
prefix = ""
endpoint_url = "{s3_url}"
exclude = ["**/.DS_Store"]

[rate]
requests_per_s = 20
max_in_flight = 8

[ledger]
path = "{ledger}"
""",
        encoding="utf-8",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=600, help="sample images to create")
    ap.add_argument("--rate", type=float, default=20, help="emulator rate limit, requests/s")
    ns = ap.parse_args()

    try:
        import boto3  # noqa: F401  (used by _s3)
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        print(
            f"error: the demo needs moto and boto3 (a local S3), which `pip install -e .` does not "
            f"install ({e.name} is missing): pip install -e '.[demo]', or run ./dev demo",
            file=sys.stderr,
        )
        return 2

    work = Path(".demo")
    work.mkdir(exist_ok=True)
    ledger = work / "ledger.sqlite"
    for p in work.glob("ledger.sqlite*"):
        p.unlink()
    s3_port, v7_port = free_port(), free_port()
    s3_url, v7_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{v7_port}"

    # moto logs every request through werkzeug: keep the demo's output to what ingest says.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    emulator = start_emulator(v7_port, ns.rate)
    try:
        keys = sample_keys(ns.images)
        print(f"== seeding s3://{BUCKET} on {s3_url} with {len(keys)} objects", flush=True)
        seed(s3_url, keys)
        cfg = work / "demo.toml"
        write_config(cfg, s3_url, v7_url, ledger)
        env = local_env()
        cmd = [sys.executable, "-m", "ingest", "run", "--config", str(cfg)]
        print(
            f"== ingest run --config {cfg}   (V7 emulator at {v7_url}, {ns.rate:g} req/s)",
            flush=True,
        )
        first = subprocess.run(cmd, env=env, check=False)
        before = emulator_state(v7_url)
        print(
            "== the same command again: everything is in the ledger, nothing is re-sent", flush=True
        )
        second = subprocess.run(cmd, env=env, check=False)
        after = emulator_state(v7_url)
        new, changed, gone = change_bucket(s3_url, keys)
        print(
            f"== the next night: {new} new objects, {changed} overwritten, {gone} deleted; "
            f"ingest sync --config {cfg}",
            flush=True,
        )
        sync_cmd = [sys.executable, "-m", "ingest", "sync", "--config", str(cfg)]
        sync = subprocess.run(sync_cmd, env=env, check=False)
        synced = emulator_state(v7_url)
        print("== ingest status", flush=True)
        subprocess.run(
            [sys.executable, "-m", "ingest", "status", "--config", str(cfg)], env=env, check=False
        )
        counters = synced.get("counters", synced)
        sent_again = _register_requests(after) - _register_requests(before)
        sync_sent = _register_requests(synced) - _register_requests(after)
        print(
            f"== emulator: {counters.get('items_registered', '?')} items registered, "
            f"{_register_requests(synced)} register requests, "
            f"{counters.get('rate_limited', counters.get('requests_429', '?'))} answered 429; "
            f"second run sent {sent_again} register requests, the sync {sync_sent}",
            flush=True,
        )
        print(
            f"exit codes: first run {first.returncode}, second run {second.returncode}, "
            f"sync {sync.returncode}"
        )
        ok = first.returncode in (0, 3) and sent_again == 0 and sync.returncode in (0, 3)
        return 0 if ok else 1
    finally:
        emulator.terminate()
        emulator.wait(10)
        moto.stop()


def _register_requests(state: dict[str, Any]) -> int:
    counters = state.get("counters", state)
    value = counters.get("register_requests", 0)
    return int(value) if isinstance(value, int | float) else 0


if __name__ == "__main__":
    raise SystemExit(main())
