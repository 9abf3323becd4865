"""The CLI end to end: moto S3 + the V7 emulator over real sockets, the engine as a subprocess."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.conftest import seed_bucket
from tests.support.e2e import (
    DATASET,
    Emulator,
    cli_env,
    job_config,
    run_cli,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)


def _storage(emulator: Emulator, bucket: str, *, readonly: bool = False) -> str:
    return emulator.storage_for(bucket, readonly=readonly)


def _keys_of(items: list[dict[str, object]]) -> list[str]:
    keys: list[str] = []
    for item in items:
        for slot in item["slots"]:  # type: ignore[attr-defined]
            keys.append(slot["storage_key"])
    return keys


def test_run_registers_everything_once_and_rerun_sends_nothing(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    images = [f"set/{i // 50}/img_{i:04d}.jpg" for i in range(230)]
    other = ["set/clip.MP4", "set/doc.pdf", "set/notes.txt", "set/Upper.PNG"]
    seed_bucket(moto_url, bucket_name, images + other)
    storage = _storage(emulator, bucket_name)
    cfg = job_config(
        tmp_path, emulator, moto_url, bucket_name, storage, extra="[rate]\nrequests_per_s = 200\n"
    )

    first = run_cli("run", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    registered = emulator.items()
    assert sorted(_keys_of(registered)) == sorted(
        [*images, "set/clip.MP4", "set/doc.pdf", "set/Upper.PNG"]
    )
    by_name = {i["name"]: i for i in registered}
    assert by_name["img_0077.jpg"]["path"] == "/set/1"
    requests_after_first = emulator.counters()["register_requests"]
    assert requests_after_first >= 234 // 10

    second = run_cli("run", "--config", str(cfg))
    assert second.returncode == 0, second.stderr[-3000:]
    assert emulator.counters()["register_requests"] == requests_after_first
    assert len(emulator.items()) == len(registered)

    status = run_cli("status", "--config", str(cfg), "--json")
    assert status.returncode == 0, status.stderr
    doc = orjson.loads(status.stdout)
    assert doc["objects_by_state"]["REGISTERED"] == 233
    assert doc["objects_by_state"]["SKIPPED"] == 1

    report = run_cli("report", "--config", str(cfg), "--format", "jsonl")
    rows = [orjson.loads(line) for line in report.stdout.splitlines()]
    assert len(rows) == 234
    notes = next(r for r in rows if r["key"] == "set/notes.txt")
    assert notes["state"] == "SKIPPED" and ".txt" in notes["reason"]
    img = next(r for r in rows if r["key"] == "set/1/img_0077.jpg")
    assert img["state"] == "REGISTERED" and img["v7_id"]


def test_kill_dash_nine_at_several_points_then_exactly_once(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = [f"crash/{i % 7}/obj_{i:05d}.png" for i in range(2000)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = _storage(emulator, bucket_name)
    emulator.configure(latency_ms=20)
    ledger = tmp_path / "l.sqlite"
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 60\nmax_in_flight = 4\n",
        ledger=ledger,
    )
    kills = 0
    for threshold in (1, 40, 90, 140):
        # Every other kill lands right after a commit-then-fail: items stored, 502 answered.
        if threshold in (40, 140):
            emulator.queue_fault("commit_then_fail", 1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "run", "--config", str(cfg)],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        reached = wait_for(
            lambda t=threshold, p=proc: (
                emulator.counters()["register_requests"] >= t or p.poll() is not None
            ),
            60,
        )
        assert reached
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(30)
    assert kills >= 3
    final = run_cli("run", "--config", str(cfg), timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]

    stored = _keys_of(emulator.items())
    dupes = [k for k, n in Counter(stored).items() if n > 1]
    assert not dupes
    assert sorted(stored) == sorted(keys)

    with sqlite3.connect(ledger) as db:
        states = dict(db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
    assert states == {"REGISTERED": 2000}


def test_unsupported_and_odd_keys(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    long_key = "odd/" + "l" * 990 + ".jpg"
    keys = [
        "odd/with space.jpg",
        "odd/ünïcødé 画像.png",
        long_key,
        "odd/weird+%20name.jpeg",
        "/odd/leading-slash.jpg",
        "odd/data.xyz",
        "odd/UPPER.JPG",
    ]
    seed_bucket(moto_url, bucket_name, keys)
    storage = _storage(emulator, bucket_name)
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, storage)
    res = run_cli("run", "--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    stored = set(_keys_of(emulator.items()))
    assert stored == {
        "odd/with space.jpg",
        "odd/ünïcødé 画像.png",
        long_key,
        "odd/weird+%20name.jpeg",
        "odd/UPPER.JPG",
    }
    rows = {
        r["key"]: r
        for r in map(orjson.loads, run_cli("report", "--config", str(cfg)).stdout.splitlines())
    }
    assert rows["odd/data.xyz"]["state"] == "SKIPPED"
    assert "xyz" in rows["odd/data.xyz"]["reason"]
    assert rows["/odd/leading-slash.jpg"]["state"] == "SKIPPED"
    assert rows[long_key]["state"] == "REGISTERED"


# --- bad input: one clear line, non-zero exit, before any work ---------------------------------


def _bad(
    tmp_path: Path,
    moto_url: str,
    emulator: Emulator,
    bucket: str,
    *,
    storage: str,
    dataset_override: str | None = None,
    env: dict[str, str] | None = None,
    extra: str = "",
) -> subprocess.CompletedProcess[str]:
    cfg = job_config(tmp_path, emulator, moto_url, bucket, storage, extra=extra)
    args = ["run", "--config", str(cfg)]
    if dataset_override:
        args += ["--dataset", dataset_override]
    return run_cli(*args, env=env)


def _one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def seeded(moto_url: str, bucket_name: str, emulator: Emulator) -> str:
    seed_bucket(moto_url, bucket_name, ["a/1.jpg"])
    return _storage(emulator, bucket_name)


def test_wrong_api_key(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, seeded: str
) -> None:
    res = _bad(
        tmp_path,
        moto_url,
        emulator,
        bucket_name,
        storage=seeded,
        env=cli_env(DARWIN_API_KEY="wrong-key-123456"),
    )
    _one_line_error(res, "401", "DARWIN_API_KEY")
    assert "wrong-key-123456" not in res.stderr + res.stdout
    assert emulator.counters()["register_requests"] == 0


def test_missing_api_key(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, seeded: str
) -> None:
    env = cli_env()
    del env["DARWIN_API_KEY"]
    _one_line_error(
        _bad(tmp_path, moto_url, emulator, bucket_name, storage=seeded, env=env), "DARWIN_API_KEY"
    )


def test_unknown_dataset(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, seeded: str
) -> None:
    res = _bad(
        tmp_path,
        moto_url,
        emulator,
        bucket_name,
        storage=seeded,
        dataset_override="no-such-dataset",
    )
    _one_line_error(res, "no-such-dataset", DATASET)


def test_unknown_storage(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, seeded: str
) -> None:
    _one_line_error(
        _bad(tmp_path, moto_url, emulator, bucket_name, storage="nope"),
        "storage configuration 'nope'",
    )


def test_readonly_storage_with_readwrite_mode(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, seeded: str
) -> None:
    ro = _storage(emulator, bucket_name, readonly=True)
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, ro)
    res = run_cli("run", "--config", str(cfg), "--set", "v7.mode=readwrite")
    _one_line_error(res, "read-only", "mode")


def test_missing_bucket(tmp_path: Path, moto_url: str, emulator: Emulator) -> None:
    storage = _storage(emulator, "no-such-bucket-xyz")
    _one_line_error(
        _bad(tmp_path, moto_url, emulator, "no-such-bucket-xyz", storage=storage),
        "no-such-bucket-xyz",
    )


def test_malformed_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[v7\ndataset = 'x'\n")
    _one_line_error(run_cli("run", "--config", str(bad)), "not valid TOML")
    bad.write_text("[rate]\nrequests_per_s = 'fast'\n")
    _one_line_error(run_cli("run", "--config", str(bad)), "rate.requests_per_s")
    bad.write_text("[sourcez]\nbucket = 'x'\n")
    _one_line_error(run_cli("run", "--config", str(bad)), "sourcez")
