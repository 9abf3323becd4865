"""`ingest worker` end to end: a real process, moto S3 (+ SQS), the V7 emulator, real signals."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest import __version__
from ingest.emulator import API_KEY
from tests.conftest import s3_client, seed_bucket
from tests.support.e2e import (
    Emulator,
    cli_env,
    emulator_process,
    free_port,
    job_config,
    run_cli,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)


def _worker_config(
    tmp_path: Path, emulator_url: str, moto_url: str, bucket: str, storage: str, extra: str = ""
) -> tuple[Path, int]:
    port = free_port()
    fake = Emulator(emulator_url, None)  # type: ignore[arg-type]
    cfg = job_config(
        tmp_path,
        fake,
        moto_url,
        bucket,
        storage,
        extra=f"""
[worker]
http_host = "127.0.0.1"
http_port = {port}
schedule = "every 2s"
grace_period_s = 20
unreachable_retry_cap_s = 1
retry_failed_base_s = 1
retry_failed_cap_s = 2
{extra}
""",
    )
    return cfg, port


@contextmanager
def _worker(cfg: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "worker", "--config", str(cfg), *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _metrics(port: int) -> dict[str, float]:
    status, text = _get(port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _ledger_states(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
    finally:
        db.close()


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_sigterm_mid_sync_exits_0_in_grace_and_the_next_start_completes(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = [f"w/{i % 5}/{i:04d}.jpg" for i in range(300)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name)
    emulator.configure(latency_ms=150)
    cfg, port = _worker_config(
        tmp_path,
        emulator.url,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 8\nmax_in_flight = 2\n",
    )
    with _worker(cfg) as proc:
        assert wait_for(lambda: emulator.counters()["register_requests"] >= 4, 60)
        assert _get(port, "/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=25)  # well within grace_period_s = 20 + startup
        assert proc.returncode == 0, err[-3000:]
    states = _ledger_states(tmp_path / "l.sqlite")
    assert "SENT" not in states and "PROCESSING" not in states, states  # nothing in doubt
    assert states.get("REGISTERED", 0) < 300  # it really stopped early
    assert states.get("REGISTERED", 0) == len(emulator.items())
    lines = _json_lines(err)
    assert lines and all(line.get("run_id") for line in lines)
    assert API_KEY not in out + err
    assert any("SIGTERM" in line["msg"] for line in lines)

    emulator.configure(latency_ms=0)
    again = run_cli("worker", "--config", str(cfg), "--once", "--set", "worker.http_port=0")
    assert again.returncode == 0, again.stderr[-3000:]
    items = emulator.items()
    stored = [slot["storage_key"] for it in items for slot in it["slots"]]
    assert len(stored) == len(set(stored)) == 300
    assert _ledger_states(tmp_path / "l.sqlite") == {"REGISTERED": 300}


def test_worker_survives_v7_down_and_metrics_match_the_emulator(
    tmp_path: Path, moto_url: str, bucket_name: str
) -> None:
    seed_bucket(moto_url, bucket_name, [f"v/{i:03d}.jpg" for i in range(40)])
    v7_port = free_port()
    url = f"http://127.0.0.1:{v7_port}"
    storage = f"rw-{bucket_name}"
    cfg, port = _worker_config(
        tmp_path,
        url,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 20\nretry_max_total_s = 2\nretry_cap_s = 0.5\n",
    )
    with _worker(cfg) as proc:
        # V7 is not there at all: alive, not ready, and still running.
        assert wait_for(lambda: _get(port, "/healthz")[0] == 200, 30)
        status, why = _get(port, "/readyz")
        assert status == 503 and "preflight" in why.lower()
        assert proc.poll() is None
        with emulator_process("--rate", "4", port=v7_port) as emu:
            emu.storage_for(bucket_name)
            assert wait_for(lambda: len(emu.items()) == 40, 60)
            assert wait_for(lambda: _get(port, "/readyz")[0] == 200, 30)
            # Counters agree with what the server saw (429s included: the server allows 4/s).
            c = emu.counters()
            m = _metrics(port)
            assert m["ingest_register_requests_total"] == c["register_requests"]
            assert m["ingest_rate_limited_total"] == c["rate_limited"]
            assert m["ingest_items_registered_total"] == c["items_registered"] == 40
            assert m["ingest_objects_listed_total"] >= 40
            assert m[f"ingest_build_info{{version={__version__}}}"] == 1 and m["ingest_ready"] == 1
            assert "ingest_up" not in m and m["process_resident_memory_bytes"] > 0
            assert m["ingest_last_successful_sync_timestamp_seconds"] > 0
        # V7 goes away mid-life; new objects arrive meanwhile.
        s3 = s3_client(moto_url)
        for i in range(5):
            s3.put_object(Bucket=bucket_name, Key=f"v/late_{i}.jpg", Body=b"x")
        assert wait_for(lambda: _metrics(port)["ingest_syncs_failed_total"] >= 1, 60)
        assert proc.poll() is None
        with emulator_process(port=v7_port) as emu:  # back, empty (a fresh emulator)
            emu.storage_for(bucket_name)
            assert wait_for(lambda: len(emu.items()) == 5, 60)
            names = sorted(it["name"] for it in emu.items())
            assert names == [f"late_{i}.jpg" for i in range(5)]
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
    assert _ledger_states(tmp_path / "l.sqlite") == {"REGISTERED": 45}
    # Each "trying again" line says why (here: V7's port refused the connection).
    retries = [
        d for d in _json_lines(err) if d["msg"].startswith("V7 or the bucket is unavailable")
    ]
    assert retries and all(d["reason"] for d in retries)
    assert any(f"V7 at {url} is not reachable" in d["reason"] for d in retries)


def test_event_mode_registers_a_new_object_within_seconds(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    import boto3

    seed_bucket(moto_url, bucket_name, ["e/first.jpg"])
    sqs = boto3.client(
        "sqs",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    queue_url = sqs.create_queue(QueueName=f"q-{bucket_name}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3 = s3_client(moto_url)
    s3.put_bucket_notification_configuration(
        Bucket=bucket_name,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    storage = emulator.storage_for(bucket_name)
    cfg, port = _worker_config(
        tmp_path,
        emulator.url,
        moto_url,
        bucket_name,
        storage,
        extra=f'events = "sqs"\nevents_queue = "{queue_url}"\nevents_endpoint_url = "{moto_url}"\n'
        "events_wait_s = 0.2\n",
    )
    cfg.write_text(cfg.read_text().replace('schedule = "every 2s"', 'schedule = "every 1h"'))
    with _worker(cfg) as proc:
        assert wait_for(lambda: len(emulator.items()) == 1, 60)  # the first, scheduled sync
        assert wait_for(lambda: _metrics(port).get("ingest_syncs_total", 0) >= 1, 30)
        # An event, twice (at-least-once delivery), and one object in an ignored place.
        s3.put_object(Bucket=bucket_name, Key="e/second one.jpg", Body=b"y")
        s3.put_object(Bucket=bucket_name, Key="e/second one.jpg", Body=b"y")
        # Slices of a DICOM series: left to the sync, which sees the whole folder at once.
        for k in ("e/scan/1.dcm", "e/scan/2.dcm"):
            s3.put_object(Bucket=bucket_name, Key=k, Body=b"slice")
        assert wait_for(lambda: len(emulator.items()) == 2, 10)
        assert wait_for(lambda: _metrics(port)["ingest_object_events_total"] >= 4, 10)
        assert wait_for(lambda: _metrics(port)["ingest_object_events_deferred_total"] >= 2, 10)
        assert len(emulator.items()) == 2  # the duplicate event sent nothing new
        assert _metrics(port)["ingest_syncs_total"] == 1  # no scheduled sync did it
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
    names = sorted(it["name"] for it in emulator.items())
    assert names == ["first.jpg", "second one.jpg"]
    out = run_cli("sync", "--config", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    series = [it for it in emulator.items() if it["name"] == "scan"]
    assert len(series) == 1 and len(series[0]["slots"]) == 2
    assert len(emulator.items()) == 3


def test_a_second_signal_exits_at_once_and_the_next_start_resumes(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    seed_bucket(moto_url, bucket_name, [f"s/{i:03d}.jpg" for i in range(50)])
    storage = emulator.storage_for(bucket_name)
    cfg, _port = _worker_config(tmp_path, emulator.url, moto_url, bucket_name, storage)
    slow = ("--set", "rate.requests_per_s=0.5", "--set", "v7.request_timeout_s=60")
    with _worker(cfg, *slow) as proc:
        assert wait_for(lambda: emulator.counters()["register_requests"] >= 1, 60)
        emulator.configure(latency_ms=30_000)  # the next request stays in flight for 30 s
        assert wait_for(lambda: emulator.counters()["register_requests"] >= 2, 30)
        proc.send_signal(signal.SIGTERM)
        # Signals of one kind coalesce while pending: send the second once the first is seen.
        assert proc.stderr is not None
        seen = ""
        while "finishing in-flight work" not in seen:
            line = proc.stderr.readline()
            assert line, "the worker exited on the first signal"
            seen += line
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)  # not the 20 s grace, nor the 30 s request
        err = seen + err
        assert proc.returncode == 130, err[-3000:]
        assert "second SIGTERM" in err
    assert "SENT" in _ledger_states(tmp_path / "l.sqlite")  # in doubt: re-sent next time
    emulator.configure(latency_ms=0)
    again = run_cli("worker", "--config", str(cfg), "--once", "--set", "worker.http_port=0")
    assert again.returncode == 0, again.stderr[-3000:]
    stored = [slot["storage_key"] for it in emulator.items() for slot in it["slots"]]
    assert len(stored) == len(set(stored)) == 50
    assert _ledger_states(tmp_path / "l.sqlite") == {"REGISTERED": 50}


def test_a_worker_whose_lease_is_taken_over_exits_4(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """Stalled past its lease (a frozen VM, a paused container) and someone else took the job:
    the worker stops and exits non-zero, so systemd or Kubernetes notices and restarts it."""
    import time

    seed_bucket(moto_url, bucket_name, ["l/a.jpg"])
    storage = emulator.storage_for(bucket_name)
    cfg, port = _worker_config(tmp_path, emulator.url, moto_url, bucket_name, storage)
    cfg.write_text(cfg.read_text().replace("[ledger]\n", "[ledger]\nlease_ttl_s = 6\n"))
    with _worker(cfg) as proc:
        assert wait_for(lambda: _metrics_or_empty(port).get("ingest_syncs_total", 0) >= 1, 60)
        db = sqlite3.connect(tmp_path / "l.sqlite")
        with db:
            n = db.execute(
                "UPDATE leases SET holder='thief:1:ab:elsewhere', expires_at=?",
                (time.time() + 600,),
            ).rowcount
        db.close()
        assert n == 1
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err[-3000:]
    assert "lost the ledger lease" in err


def _metrics_or_empty(port: int) -> dict[str, float]:
    status, _ = _get(port, "/metrics")
    return _metrics(port) if status == 200 else {}


def test_a_worker_started_while_a_manual_sync_holds_the_lease_waits_for_it(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """Busy is not an exit (no exit 5 for systemd to restart until its start limit): the
    worker stays up, not ready, saying why, and takes the job over once the sync is done."""
    import asyncio

    from ingest import config
    from ingest.ledger import open_ledger

    seed_bucket(moto_url, bucket_name, [f"b/{i}.jpg" for i in range(6)])
    storage = emulator.storage_for(bucket_name)
    cfg, port = _worker_config(tmp_path, emulator.url, moto_url, bucket_name, storage)
    job = config.load(cfg).job
    holder = "manual-sync:1:ab:elsewhere"  # another host's `ingest sync`

    async def lease(take: bool) -> None:
        async with open_ledger(tmp_path / "l.sqlite", job) as lg:
            if take:
                assert await lg.acquire_lease(holder, 600, time.time(), lambda _h: False) is None
            else:
                await lg.release_lease(holder)

    asyncio.run(lease(True))
    with _worker(cfg) as proc:
        assert wait_for(lambda: "already running" in _get(port, "/readyz")[1], 60)
        assert _get(port, "/readyz")[0] == 503 and proc.poll() is None
        assert emulator.items() == []
        asyncio.run(lease(False))  # the manual sync ends
        assert wait_for(lambda: len(emulator.items()) == 6, 60)
        assert wait_for(lambda: _get(port, "/readyz")[0] == 200, 30)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("once", [True, False])
def test_a_config_error_in_the_worker_preflight_exits_2_at_once(
    tmp_path: Path, moto_url: str, once: bool
) -> None:
    """A malformed manifest (or an unknown AWS profile, an unusable endpoint) will not get
    better by retrying: one line, exit 2, not an outage retried for ever (nor --once's 3)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("item_name,slot_name\nfoo,0\n", encoding="utf-8")
    cfg, _ = _worker_config(
        tmp_path, "http://127.0.0.1:9", moto_url, "nobucket", "s",
        extra=f'[plan]\nslots = "manifest"\nmanifest = "{manifest}"\n',
    )  # fmt: skip
    args = ["--once"] if once else []
    res = run_cli("worker", "--config", str(cfg), *args, "--set", "worker.http_port=0", timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [d for d in _json_lines(res.stderr) if d.get("level") == "error"]
    assert len(errors) == 1, res.stderr
    assert "header must name item_name, slot_name, key (missing key)" in errors[0]["msg"]
    assert "trying again" not in res.stderr
