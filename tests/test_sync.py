"""`ingest sync` end to end: moto S3 + the V7 emulator over sockets, the CLI as a subprocess."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import s3_client, seed_bucket
from tests.support.e2e import Emulator, cli_env, job_config, run_cli, wait_for

pytestmark = pytest.mark.timeout(300)


def _sync(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("sync", "--config", str(cfg), *args, timeout=240)


def _report(cfg: Path) -> dict[str, dict[str, object]]:
    out = run_cli("report", "--config", str(cfg), "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    return {r["key"]: r for r in map(orjson.loads, out.stdout.splitlines())}


def _storage_key_names(emulator: Emulator) -> list[str]:
    return sorted(slot["storage_key"] for it in emulator.items() for slot in it["slots"])


def test_sync_registers_only_new_and_reports_changed_and_vanished(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = [f"d{i % 3}/img_{i:04d}.jpg" for i in range(120)] + ["top.png"]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, storage)

    first = _sync(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(emulator.items()) == 121
    before = emulator.counters()["register_requests"]

    again = _sync(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert emulator.counters()["register_requests"] == before  # nothing new: no request
    assert "listed 121" in again.stdout

    s3 = s3_client(moto_url)
    added = [f"d{i % 4}/new_{i:02d}.jpg" for i in range(10)]  # d3/ is a brand-new folder
    for k in added:
        s3.put_object(Bucket=bucket_name, Key=k, Body=b"new")
    changed = ["d0/img_0000.jpg", "top.png"]
    for k in changed:
        s3.put_object(Bucket=bucket_name, Key=k, Body=b"changed content")
    gone = ["d1/img_0001.jpg", "d2/img_0119.jpg", "d0/img_0117.jpg"]
    for k in gone:
        s3.delete_object(Bucket=bucket_name, Key=k)

    third = _sync(cfg)
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(emulator.items()) == 131
    assert set(_storage_key_names(emulator)) >= set(added)
    assert emulator.counters()["register_requests"] - before == 1  # 10 items, batch of 10
    assert "changed 2" in third.stdout and "vanished 3" in third.stdout

    rows = _report(cfg)
    for k in changed:
        assert rows[k]["state"] == "REGISTERED" and str(rows[k]["sync"]).startswith("changed")
    for k in gone:
        assert rows[k]["sync"] == "vanished"
    assert all(rows[k]["sync"] == "" for k in added)
    status = orjson.loads(run_cli("status", "--config", str(cfg), "--json").stdout)
    assert status["changed_objects"] == 2 and status["vanished_objects"] == 3
    only = run_cli("report", "--config", str(cfg), "--sync", "vanished", "--format", "csv")
    assert sorted(line.split(",")[0] for line in only.stdout.splitlines()[1:]) == sorted(gone)
    assert "2 changed, 3 vanished" in run_cli("status", "--config", str(cfg)).stdout

    # Reported once: a fourth sync finds nothing new to write or send.
    fourth = _sync(cfg)
    assert fourth.returncode == 0
    assert emulator.counters()["register_requests"] - before == 1
    assert "changed 0" in fourth.stdout and "vanished 0" in fourth.stdout

    # A deleted object put back is no longer reported as vanished.
    s3.put_object(Bucket=bucket_name, Key=gone[0], Body=b"x" * 32)
    assert _sync(cfg).returncode == 0
    assert _report(cfg)[gone[0]]["sync"] == ""


def test_sync_on_change_register_adds_a_versioned_item_once(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    series = ["scans/s1/1.dcm", "scans/s1/2.dcm"]
    seed_bucket(moto_url, bucket_name, ["a/one.jpg", "a/two.jpg", *series])
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra='[sync]\non_change = "register"\n',
    )
    assert _sync(cfg).returncode == 0
    s3 = s3_client(moto_url)
    s3.put_object(Bucket=bucket_name, Key="a/one.jpg", Body=b"version two")
    etag = s3.head_object(Bucket=bucket_name, Key="a/one.jpg")["ETag"].strip('"')
    # A slice of a DICOM series changes: it cannot become an item of its own, so it is
    # reported, not registered as a one-slice series.
    s3.put_object(Bucket=bucket_name, Key=series[1], Body=b"another slice")
    out = _sync(cfg)
    assert out.returncode == 0 and "changed 2" in out.stdout
    names = sorted(it["name"] for it in emulator.items())
    assert names == sorted(["one.jpg", "two.jpg", "s1", f"one.v{etag[:8]}.jpg"])
    requests = emulator.counters()["register_requests"]
    out = _sync(cfg)
    assert out.returncode == 0 and "changed 0" in out.stdout  # each reported once
    assert emulator.counters()["register_requests"] == requests
    rows = _report(cfg)
    assert rows["a/one.jpg"]["item_name"] == f"one.v{etag[:8]}.jpg"
    assert rows["a/one.jpg"]["sync"] == ""
    assert str(rows[series[1]]["sync"]).startswith("changed")
    assert rows[series[1]]["item_name"] == "s1"


def test_a_second_sync_of_the_same_job_is_refused_while_one_runs(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    seed_bucket(moto_url, bucket_name, [f"k/{i:04d}.jpg" for i in range(200)])
    storage = emulator.storage_for(bucket_name)
    emulator.configure(latency_ms=200)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 2\nmax_in_flight = 1\n",
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "ingest", "sync", "--config", str(cfg)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: emulator.counters()["register_requests"] >= 1, 60)
        second = _sync(cfg)
        assert second.returncode == 5, second.stderr[-2000:]
        assert "busy:" in second.stderr and "already running" in second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(60)
    # A graceful stop released the lease: the next sync runs and finishes the job.
    emulator.configure(latency_ms=0)
    done = run_cli("sync", "--config", str(cfg), "--set", "rate.requests_per_s=50", timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(emulator.items()) == 200


def test_an_expired_lease_of_a_dead_holder_does_not_block(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    seed_bucket(moto_url, bucket_name, ["x/a.jpg"])
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, storage)
    assert _sync(cfg).returncode == 0
    job = orjson.loads(run_cli("status", "--config", str(cfg), "--json").stdout)["job"]
    db = sqlite3.connect(tmp_path / "l.sqlite")
    with db:  # another machine's lease, still valid: refused
        db.execute(
            "INSERT INTO leases VALUES (?, 'elsewhere:42:ab', ?, ?)",
            (job, time.time(), time.time() + 600),
        )
    refused = _sync(cfg)
    assert refused.returncode == 5 and "elsewhere:42" in refused.stderr
    # `ingest retry` is refused too, and writes nothing to a ledger another process holds.
    with db:
        db.execute("UPDATE items SET state='FAILED', reason='gave up' WHERE job=?", (job,))
    retry = run_cli("retry", "--config", str(cfg))
    assert retry.returncode == 5, retry.stderr[-2000:]
    assert db.execute("SELECT state FROM items WHERE job=?", (job,)).fetchall() == [("FAILED",)]
    with db:  # its holder died and the lease ran out
        db.execute("UPDATE leases SET expires_at=? WHERE job=?", (time.time() - 1, job))
    db.close()
    assert run_cli("retry", "--config", str(cfg)).returncode == 0  # ours: ALREADY_EXISTS is ok
    assert _sync(cfg).returncode == 0
    assert _report(cfg)["x/a.jpg"]["state"] == "REGISTERED"


def test_kill_dash_nine_mid_sync_then_sync_again_registers_each_new_object_once(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    import os
    import signal

    old = [f"p{i % 4}/old_{i:04d}.jpg" for i in range(400)]
    seed_bucket(moto_url, bucket_name, old)
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 40\nmax_in_flight = 2\n",
    )
    pages = ("--set", "source.page_size=50")  # many pages: many listing checkpoints
    assert _sync(cfg, *pages).returncode == 0
    new = [f"p{i % 4}/new_{i:04d}.jpg" for i in range(300)]
    seed_bucket(moto_url, bucket_name, new)
    emulator.configure(latency_ms=30)
    before = emulator.counters()["register_requests"]
    slow = ("--set", "rate.requests_per_s=10")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "sync", "--config", str(cfg), *pages, *slow],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_for(lambda: emulator.counters()["register_requests"] >= before + 8, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    emulator.configure(latency_ms=0)
    again = _sync(cfg, *pages)
    assert again.returncode == 0, again.stderr[-3000:]
    stored = _storage_key_names(emulator)
    assert len(stored) == len(set(stored)) == 700
    assert "vanished 0" in again.stdout  # resuming mid-listing invented no deletions
    rows = _report(cfg)
    assert all(r["state"] == "REGISTERED" and r["sync"] == "" for r in rows.values())


def test_a_whole_folder_gone_is_reported_vanished(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = [f"keep/{i}.jpg" for i in range(3)] + [f"gone/sub/{i}.jpg" for i in range(4)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, storage)
    assert _sync(cfg).returncode == 0
    s3 = s3_client(moto_url)
    for k in keys[3:]:
        s3.delete_object(Bucket=bucket_name, Key=k)
    out = _sync(cfg)
    assert out.returncode == 0 and "vanished 4" in out.stdout
    rows = _report(cfg)
    assert sorted(k for k, r in rows.items() if r["sync"] == "vanished") == sorted(keys[3:])
