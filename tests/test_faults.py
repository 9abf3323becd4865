"""Faults end to end: the CLI in a subprocess against moto S3 and the V7 emulator (subprocess).

Each case keeps to a few hundred objects. What must hold every time: the run completes, every
object is registered exactly once (or skipped with a reason), and the ledger agrees with V7.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, job_config, run_cli

pytestmark = pytest.mark.timeout(180)


def _storage(emulator: Emulator, bucket: str) -> str:
    return emulator.storage_for(bucket, prefix="t")


def _setup(
    tmp_path: Path,
    moto_url: str,
    bucket: str,
    emulator: Emulator,
    keys: list[str],
    extra: str,
) -> Path:
    seed_bucket(moto_url, bucket, keys)
    return job_config(tmp_path, emulator, moto_url, bucket, _storage(emulator, bucket), extra=extra)


def _run(cfg: Path) -> None:
    res = run_cli("run", "--config", str(cfg), timeout=150)
    assert res.returncode == 0, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])


def _report(cfg: Path) -> dict[str, dict[str, Any]]:
    res = run_cli("report", "--config", str(cfg), "--format", "jsonl")
    assert res.returncode == 0, res.stderr
    return {r["key"]: r for r in map(orjson.loads, res.stdout.splitlines())}


def _exactly_once(emulator: Emulator, cfg: Path, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Every key registered once in V7; the ledger says REGISTERED and agrees on the item."""
    stored = emulator.items()
    slot_keys = Counter(s["storage_key"] for it in stored for s in it["slots"])
    assert [k for k, n in slot_keys.items() if n > 1] == []
    assert sorted(slot_keys) == sorted(keys)
    by_key = {s["storage_key"]: it for it in stored for s in it["slots"]}
    rows = _report(cfg)
    assert sorted(rows) == sorted(keys)
    for k, row in rows.items():
        assert row["state"] == "REGISTERED", row
        assert (row["item_path"], row["item_name"]) == (by_key[k]["path"], by_key[k]["name"])
        if row["v7_id"]:  # empty only when V7's answer was lost (commit then fail)
            assert row["v7_id"] == by_key[k]["id"]
    return rows


def _keys(n: int, tag: str) -> list[str]:
    return [f"{tag}/{i % 5}/img_{i:04d}.jpg" for i in range(n)]


def test_429_storm_engine_slows_to_the_server_rate(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    n = 150
    keys = _keys(n, "storm")
    emulator.configure(rate_per_s=20.0, burst=1.0, retry_after="ceil")
    cfg = _setup(
        tmp_path,
        moto_url,
        bucket_name,
        emulator,
        keys,
        "[rate]\nrequests_per_s = 200\n[batch]\nmax_items = 1\n",  # one request per object
    )
    _run(cfg)
    _exactly_once(emulator, cfg, keys)
    st = emulator.state()
    c = st["counters"]
    assert c["items_registered"] == n
    assert c["requests"].get("POST register_existing 200", 0) == n
    timeline = [(float(t), int(s)) for t, s in st["timeline"]]
    t0 = timeline[0][0]
    per_s = sorted(Counter((int(t - t0), s) for t, s in timeline).items())
    late = [s for t, s in timeline if t - t0 >= 3.0]
    assert late, per_s
    # Without adapting, 200 req/s against 20 req/s would be ~90 % 429s throughout.
    late_429 = sum(1 for s in late if s == 429)
    assert late_429 / len(late) < 0.1, per_s
    assert c["rate_limited"] < c["register_requests"] * 0.25, per_s
    # Accepted rate: never above the server's (+ its one-token burst), and not collapsed.
    ok = [t for t, s in timeline if s == 200 and t - t0 >= 3.0]
    rate = (len(ok) - 1) / (ok[-1] - ok[0])
    assert 20 * 0.4 <= rate <= 20 * 1.1, (rate, per_s)


@pytest.mark.parametrize(
    ("fault", "setting"),
    [("5xx", {"p_5xx": 0.1}), ("reset", {"p_reset": 0.1})],
)
def test_random_transient_faults(
    tmp_path: Path,
    moto_url: str,
    bucket_name: str,
    emulator: Emulator,
    fault: str,
    setting: dict[str, float],
) -> None:
    keys = _keys(300, fault)
    emulator.configure(seed=7, **setting)  # seed 7: 6 faults in the first 30 draws
    cfg = _setup(
        tmp_path,
        moto_url,
        bucket_name,
        emulator,
        keys,
        "[rate]\nrequests_per_s = 200\nretry_base_s = 0.05\nretry_cap_s = 0.5\n",
    )
    _run(cfg)
    _exactly_once(emulator, cfg, keys)
    c = emulator.counters()
    assert c["faults"].get(fault, 0) >= 1, c  # the faults did happen
    assert c["items_registered"] == 300
    assert c["items_blocked"] == {}  # nothing was stored by a failed request


def test_stall_longer_than_the_request_timeout(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = _keys(150, "stall")
    emulator.configure(stall_s=4.0)
    emulator.queue_fault("stall", 3)
    cfg = _setup(
        tmp_path,
        moto_url,
        bucket_name,
        emulator,
        keys,
        "[rate]\nrequests_per_s = 200\nretry_base_s = 0.05\nretry_cap_s = 0.5\n",
    )
    cfg.write_text(cfg.read_text().replace("request_timeout_s = 5", "request_timeout_s = 1"))
    _run(cfg)
    _exactly_once(emulator, cfg, keys)
    assert emulator.counters()["faults"] == {"stall": 3}


def test_commit_then_fail_nothing_lost_nothing_twice_ledger_agrees(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = _keys(300, "ctf")
    emulator.configure(seed=3, p_commit_then_fail=0.25)  # 7 in the first 30 draws
    cfg = _setup(
        tmp_path,
        moto_url,
        bucket_name,
        emulator,
        keys,
        "[rate]\nrequests_per_s = 200\nretry_base_s = 0.05\nretry_cap_s = 0.5\n",
    )
    _run(cfg)
    rows = _exactly_once(emulator, cfg, keys)
    c = emulator.counters()
    assert c["faults"]["commit_then_fail"] >= 3
    # The retries of committed batches were answered ALREADY_EXISTS, and the engine knew they
    # were its own: REGISTERED, never BLOCKED.
    assert c["items_blocked"].get("ALREADY_EXISTS", 0) >= 10
    # Items whose only answer was lost got their V7 id from the items listing afterwards.
    no_id = sorted(k for k, r in rows.items() if not r["v7_id"])
    assert no_id == []
    status = orjson.loads(run_cli("status", "--config", str(cfg), "--json").stdout)
    assert status["items_by_state"] == {"REGISTERED": 300}
    # A second run sends nothing.
    before = c["register_requests"]
    _run(cfg)
    assert emulator.counters()["register_requests"] == before


def test_bad_input_keys_each_get_a_clear_outcome(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    long_key = "bad/" + "n" * 990 + ".png"
    good = ["bad/with space.jpg", "bad/ünïcødé 画像.png", long_key, "bad/UP.JPEG"]
    skipped = {
        "/bad/leading.jpg": "starts with '/'",
        "bad/file.xyz": "'.xyz'",
        "bad/noext": "no file extension",
        "bad/archive.tar.gz": "'.gz'",
    }
    seed_bucket(moto_url, bucket_name, [*good, *skipped])
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, _storage(emulator, bucket_name))
    _run(cfg)
    rows = _report(cfg)
    assert set(rows) == set(good) | set(skipped)
    for k in good:
        assert rows[k]["state"] == "REGISTERED" and rows[k]["v7_id"], rows[k]
    for k, needle in skipped.items():
        assert rows[k]["state"] == "SKIPPED", rows[k]
        assert needle in rows[k]["reason"], rows[k]
    stored = {s["storage_key"] for it in emulator.items() for s in it["slots"]}
    assert stored == set(good)
