"""Regression drills, end to end: the CLI in a subprocess, moto S3 and the V7 emulator over real
sockets. Only what an operator can observe is checked: exit codes, ``ingest report`` (JSONL)
and the emulator's admin API. No engine class is imported, so the same file runs against any
engine that keeps the CLI, the report and the README's guarantees.

1. Items that were in the dataset before us are never reported as ours, even when a throttled
   run is stopped (SIGTERM) while its batches wait for a rate slot or a retry after a 429.
2. After commit-then-fail (V7 stored the batch, then answered 502), every REGISTERED object
   carries the id of the V7 item it became.
3. ``kill -9`` at randomly drawn instants of a few thousand objects, then a re-run: every object
   is in V7 exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, cli_env, job_config, run_cli, wait_for, write_config

OURS = "ALREADY_EXISTS after an earlier attempt of ours"


def _report(cfg: Path) -> dict[str, dict[str, Any]]:
    res = run_cli("report", "--config", str(cfg), "--format", "jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    return {r["key"]: r for r in map(orjson.loads, res.stdout.splitlines())}


def _answered_register(emulator: Emulator) -> Counter[int]:
    """Register requests the emulator has answered so far, by HTTP status."""
    out: Counter[int] = Counter()
    for label, n in emulator.counters()["requests"].items():
        _method, endpoint, status = label.split(" ")
        if endpoint.startswith("register_existing"):
            out[int(status)] += n
    return out


def _start(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ingest", "run", "--config", str(cfg)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stored_keys(emulator: Emulator) -> list[str]:
    return [s["storage_key"] for it in emulator.items() for s in it["slots"]]


# --- 1. pre-existing items are never counted as ours ---------------------------------------------


@pytest.mark.timeout(120)
def test_preexisting_items_stay_blocked_after_sigterm_under_throttling(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    n = 600
    keys = [f"pre/{i % 6}/img_{i:04d}.jpg" for i in range(n)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name, prefix="t")

    # Someone else registered the whole bucket already (here: another ledger, unthrottled).
    other = write_config(
        tmp_path / "other.toml",
        v7_url=emulator.url,
        s3_url=moto_url,
        bucket=bucket_name,
        ledger=tmp_path / "other.sqlite",
        storage=storage,
        extra="[rate]\nrequests_per_s = 500\n",
    )
    first = run_cli("run", "--config", str(other), timeout=90)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {(it["path"], it["name"]): it["id"] for it in emulator.items()}
    assert sorted(_stored_keys(emulator)) == sorted(keys)

    # Our job, fresh ledger, against a V7 that allows 2 requests/s with no burst: the engine
    # starts at 50/s with 8 senders, so most batches wait for a rate slot or a retry after 429.
    emulator.configure(rate_per_s=2.0, burst=1.0, retry_after="ceil")
    base = _answered_register(emulator)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 50\nmax_in_flight = 8\n[batch]\nmax_items = 10\n",
    )
    proc = _start(cfg)
    try:
        # Stop once V7 has answered some requests, both accepted ones and 429s.
        def answered() -> bool:
            now = _answered_register(emulator) - base
            return (now[200] >= 3 and now[429] >= 3) or proc.poll() is not None

        assert wait_for(answered, 60), _answered_register(emulator) - base
        assert proc.poll() is None, ("the throttled run ended before SIGTERM", proc.returncode)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, (proc.returncode, out[-2000:], err[-3000:])
    throttled = _answered_register(emulator) - base
    assert throttled[429] >= 3, throttled

    # Then V7 is fast again and the job runs to the end.
    emulator.configure(rate_per_s=0.0)
    final = run_cli("run", "--config", str(cfg), timeout=90)
    # Every object was blocked: the run is not green (README: 3 = some items blocked).
    assert final.returncode == 3, (final.returncode, final.stdout[-2000:], final.stderr[-3000:])

    rows = _report(cfg)
    assert sorted(rows) == sorted(keys)
    outcome = Counter((r["state"], r["reason"]) for r in rows.values())
    wrongly_ours = sorted(k for k, r in rows.items() if r["state"] == "REGISTERED")
    assert not wrongly_ours, (
        f"{len(wrongly_ours)} of {n} pre-existing objects reported REGISTERED (ours) after a "
        f"SIGTERM under throttling; outcomes {dict(outcome)}; e.g. {wrongly_ours[:3]}"
    )
    assert outcome == Counter({("BLOCKED", "ALREADY_EXISTS"): n}), dict(outcome)
    # And V7 was not changed by us: same items, same ids, nothing added.
    assert {(it["path"], it["name"]): it["id"] for it in emulator.items()} == before


# --- 2. every REGISTERED row has its V7 id after commit-then-fail --------------------------------


@pytest.mark.timeout(120)
def test_commit_then_fail_every_registered_row_has_its_v7_id(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    n = 300
    keys = [f"ctf/{i % 5}/img_{i:04d}.jpg" for i in range(n)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name, prefix="t")
    emulator.configure(seed=3, p_commit_then_fail=0.25)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 200\nretry_base_s = 0.05\nretry_cap_s = 0.5\n",
    )
    res = run_cli("run", "--config", str(cfg), timeout=90)
    # README: 0 = all done (every object registered, nothing failed or blocked).
    assert res.returncode == 0, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    c = emulator.counters()
    assert c["faults"].get("commit_then_fail", 0) >= 3, c  # the drill did happen

    stored = emulator.items()
    ids = {(it["path"], it["name"]): it["id"] for it in stored}
    assert len(ids) == len(stored) == n
    rows = _report(cfg)
    assert sorted(rows) == sorted(keys)
    assert Counter(r["state"] for r in rows.values()) == {"REGISTERED": n}
    no_id = sorted(k for k, r in rows.items() if not r["v7_id"])
    assert not no_id, (
        f"{len(no_id)} of {n} REGISTERED rows have no V7 id after commit-then-fail; "
        f"e.g. {[(k, rows[k]['reason']) for k in no_id[:3]]}"
    )
    wrong = {
        k: (r["v7_id"], ids.get((r["item_path"], r["item_name"])))
        for k, r in rows.items()
        if r["v7_id"] != ids.get((r["item_path"], r["item_name"]))
    }
    assert not wrong, f"{len(wrong)} rows disagree with V7's item id: {list(wrong.items())[:3]}"


# --- 3. kill -9 at random instants, then exactly once ---------------------------------------------


@pytest.mark.timeout(90)
def test_kill_dash_nine_at_random_instants_then_exactly_once(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    seed = int(os.environ.get("INGEST_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    why = f"seed {seed} (INGEST_TEST_SEED={seed} to replay)"
    n = 2500
    keys = [f"k9/{i % 9}/obj_{i:05d}.png" for i in range(n)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name, prefix="t")
    emulator.configure(latency_ms=15, jitter_ms=15)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 80\nmax_in_flight = 6\n",
    )

    # Random instants, all driven by the emulator's counters: after a random number of register
    # requests arrived (the request may be on the wire), of answers sent (the engine is reading
    # one or writing the ledger), or of items stored; before some kills a commit-then-fail.
    def gauges() -> dict[str, int]:
        c = emulator.counters()
        answered = sum(m for label, m in c["requests"].items() if "register_existing" in label)
        return {
            "arrived": c["register_requests"],
            "answered": answered,
            "stored": c["items_stored"],
        }

    kills = 0
    plan: list[tuple[str, int, bool]] = []
    for _ in range(5):
        gauge = rng.choice(["arrived", "answered", "stored"])
        step = rng.randint(1, 30) * (10 if gauge == "stored" else 1)
        plan.append((gauge, step, rng.random() < 0.5))
    why = f"{why}; kills {plan}"
    for gauge, step, fault in plan:
        if fault:
            emulator.queue_fault("commit_then_fail", 1)
        target = gauges()[gauge] + step
        proc = _start(cfg)
        try:

            def reached(g: str = gauge, t: int = target, p: subprocess.Popen[str] = proc) -> bool:
                return gauges()[g] >= t or p.poll() is not None

            assert wait_for(reached, 30), why
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert kills >= 4, why
    final = run_cli("run", "--config", str(cfg), timeout=60)
    assert final.returncode == 0, (why, final.returncode, final.stderr[-3000:])

    stored = _stored_keys(emulator)
    doubled = sorted(k for k, m in Counter(stored).items() if m > 1)
    missing = sorted(set(keys) - set(stored))
    assert not doubled, (why, len(doubled), doubled[:5])
    assert not missing, (why, len(missing), missing[:5])
    assert len(stored) == n, why
    rows = _report(cfg)
    assert sorted(rows) == sorted(keys), why
    assert Counter(r["state"] for r in rows.values()) == {"REGISTERED": n}, why


# --- 4. a second signal ends `ingest run` at once: exit 130, one line, no traceback -------------


@pytest.mark.timeout(120)
def test_a_second_sigterm_exits_130_without_a_traceback(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = [f"two/{i % 4}/img_{i:04d}.jpg" for i in range(300)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name, prefix="t")
    # Slow answers keep requests in flight, so the first SIGTERM leaves work to wait for.
    emulator.configure(latency_ms=2000)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[rate]\nrequests_per_s = 50\nmax_in_flight = 4\n",
    )
    proc = _start(cfg)
    try:
        assert wait_for(
            lambda: emulator.counters().get("register_requests", 0) >= 2 or proc.poll() is not None,
            60,
        )
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        # The second signal only once the first was handled (two pending ones merge into one).
        assert proc.stderr is not None
        seen = []
        while "finishing in-flight work" not in (line := proc.stderr.readline()):
            assert line, "the run ended before handling the first SIGTERM"
            seen.append(line)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        err = "".join(seen) + line + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert "second SIGTERM" in err, err[-3000:]
    # The next start resumes and ends with every object registered once.
    emulator.configure(latency_ms=0)
    final = run_cli("run", "--config", str(cfg), timeout=90)
    assert final.returncode == 0, final.stderr[-3000:]
    assert sorted(_stored_keys(emulator)) == sorted(keys)
