"""The shared rate budget end to end: separate processes, one V7 key, one PostgreSQL row, the
V7 emulator limiting the key (its own process).

Two CLI runs on two jobs of the same key at once (one job with two processes needs the
PostgreSQL ledger; until it lands, two jobs share the key the same way), and three budget
clients driving the emulator directly (``benchmarks/shared_rate.py client``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.shared_rate import max_per_window, run_clients, share_of_ceiling
from tests.conftest import seed_bucket
from tests.support.e2e import DATASET, Emulator, cli_env, write_config

pytestmark = pytest.mark.timeout(300)

RATE = 10.0


def _timeline(emulator: Emulator) -> list[tuple[float, int]]:
    return [(float(t), int(s)) for t, s in emulator.state().get("timeline", [])]


def _assert_within_budget(timeline: list[tuple[float, int]], rate: float, burst: float) -> None:
    """The aggregate never above R x t + burst over any window (one send of jitter each way
    at the window's edges), at most 1 % answered 429 — rounded up to one 429, since these
    runs make only ~100 requests (one timer stall on a loaded machine draws one)."""
    for window in (0.5, 1.0, 3.0):
        assert max_per_window(timeline, window) <= rate * window + burst + 1, window
    _, limited, n = share_of_ceiling(timeline, rate)
    answered_429 = round(limited * n)
    assert n > 0 and answered_429 <= max(1, n // 100), f"{answered_429} of {n} answered 429"


def test_two_cli_runs_on_one_key_share_its_budget(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, postgres_url: str
) -> None:
    """Each run alone is configured for the key's whole rate: without a shared budget the two
    together would send twice what the key allows."""
    per_job = 600
    keys = {p: [f"{p}/img_{i:04d}.jpg" for i in range(per_job)] for p in ("a", "b")}
    seed_bucket(moto_url, bucket_name, keys["a"] + keys["b"])
    storage = emulator.storage_for(bucket_name)
    emulator.configure(rate_per_s=RATE, burst=2.0)
    configs = [
        write_config(
            tmp_path / f"{p}.toml",
            v7_url=emulator.url,
            s3_url=moto_url,
            bucket=bucket_name,
            ledger=tmp_path / f"{p}.sqlite",
            storage=storage,
            prefix=f"{p}/",
            extra=f'[rate]\nrequests_per_s = {RATE}\nshared_url = "{postgres_url}"\n',
        )
        for p in ("a", "b")
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ingest", "run", "--config", str(c)],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in configs
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert all("rate budget shared" in err for _, err in outs)
    registered = [s["storage_key"] for i in emulator.items(DATASET) for s in i["slots"]]
    assert sorted(registered) == sorted(keys["a"] + keys["b"])  # each exactly once
    timeline = _timeline(emulator)
    assert len([s for _, s in timeline if s == 200]) == 2 * per_job // 10
    _assert_within_budget(timeline, RATE, 1.0)


def test_three_processes_drawing_directly_stay_within_the_keys_limit(
    emulator: Emulator, postgres_url: str
) -> None:
    rate, seconds = 20.0, 6.0
    emulator.configure(rate_per_s=rate, burst=2.0)
    cmds = [
        [sys.executable, "-m", "benchmarks.shared_rate", "client", "--v7", emulator.url,
         "--pg", postgres_url, "--tag", f"p{i}", "--seconds", str(seconds), "--rate", str(rate)]
        for i in range(3)
    ]  # fmt: skip
    started = time.monotonic()
    results = run_clients(cmds, 120)
    assert time.monotonic() - started < 120
    timeline = _timeline(emulator)
    _assert_within_budget(timeline, rate, 1.0)
    share, _, _ = share_of_ceiling(timeline, rate)
    assert share > 0.2  # they did use it (figures: benchmarks/shared_rate.py)
    assert all(r["ok"] > 0 for r in results)  # each got a share
