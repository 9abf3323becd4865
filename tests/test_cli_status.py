"""`ingest status` (text and JSON), a no-op `retry`, and each subcommand's own flags."""

from __future__ import annotations

import calendar
import re
from pathlib import Path

import orjson
import pytest

from ingest.cli import build_parser
from ingest.ledger import Status
from ingest.status_view import run_figures, status_lines, table
from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, job_config, run_cli

NOW = 1_800_000_000.0


def _status() -> Status:
    return Status(
        job="ds:s3-rw:aws:b:p",
        objects_by_state={"REGISTERED": 90, "SKIPPED": 10},
        items_by_state={"REGISTERED": 85, "FAILED": 5},
        failures_by_reason=[("FAILED: HTTP 422 bad slot", 5), ("SKIPPED: not a media file", 10)],
        last_runs=[
            {
                "id": 2, "kind": "retry", "started_at": "2027-01-15T08:00:00Z",
                "finished_at": None, "status": "running", "counts": {"registered": 3},
            },
            {
                "id": 1, "kind": "run", "started_at": "2027-01-15T07:00:00Z",
                "finished_at": "2027-01-15T07:01:40Z", "status": "completed",
                "counts": {"registered": 80, "blocked": 2, "failed": 8, "skipped": 10},
            },
        ],
    )  # fmt: skip


def test_table_aligns_columns() -> None:
    assert table(["a", "n"], [["xyz", "1"], ["b", "1,000"]], [False, True]) == [
        "a        n",
        "xyz      1",
        "b    1,000",
    ]


def test_run_figures_duration_and_settled_rate() -> None:
    done = run_figures(_status().last_runs[1], NOW)
    assert done["duration_s"] == 100.0 and done["settled"] == 100
    assert done["settled_per_s"] == pytest.approx(1.0)
    started = calendar.timegm((2027, 1, 15, 8, 0, 0, 0, 0, 0))
    running = run_figures(_status().last_runs[0], started + 30.0)  # to now while it runs
    assert running["duration_s"] == 30.0 and running["settled_per_s"] == pytest.approx(0.1)


def test_status_lines_show_percentages_runs_and_reasons() -> None:
    text = "\n".join(status_lines(_status(), "/data/l.sqlite", NOW))
    assert re.search(r"REGISTERED\s+90\s+90\.0%", text)
    assert re.search(r"SKIPPED\s+10\s+10\.0%", text)
    assert re.search(r"FAILED\s+5\s+5\.6%", text)  # of 90 items
    run1 = next(line for line in text.splitlines() if line.startswith("  1 "))
    assert re.search(r"run\s+2027-01-15 07:00\s+0:01:40\s+1\.0\s+80\s+10\s+completed", run1)
    assert re.search(r"5\s+FAILED: HTTP 422 bad slot", text)
    assert "{" not in text  # no Python dicts
    # The most frequent reason first, whatever its state (the ledger lists FAILED first).
    reasons = text[text.index("top reasons") :].splitlines()[1:3]
    assert "SKIPPED: not a media file" in reasons[0] and "FAILED" in reasons[1], reasons


def test_durations_come_from_the_ledgers_float_seconds() -> None:
    """A 0.4 s run is not 0 s (no rate) nor 1 s: the ISO text is to the second, the ledger's
    float seconds are not."""
    run = {
        "id": 3, "kind": "sync", "status": "completed", "counts": {"registered": 20},
        "started_at": "2027-01-15T07:00:00Z", "finished_at": "2027-01-15T07:00:00Z",
        "started_at_s": 1_800_000_000.25, "finished_at_s": 1_800_000_000.65,
    }  # fmt: skip
    figures = run_figures(run, NOW)
    assert figures["duration_s"] == pytest.approx(0.4)
    assert figures["settled_per_s"] == pytest.approx(50.0)
    running = run_figures({**run, "finished_at": None, "finished_at_s": None}, 1_800_000_002.25)
    assert running["duration_s"] == pytest.approx(2.0)


def test_each_subcommand_shows_only_its_flags() -> None:
    parser = build_parser()
    helps = {
        name: sub.format_help()
        for name, sub in parser._subparsers._group_actions[0].choices.items()  # type: ignore[union-attr]
    }
    for cmd in ("status", "report"):
        for flag in ("--rate", "--no-progress", "--endpoint-url", "--batch-size", "--log-format"):
            assert flag not in helps[cmd], (cmd, flag)
        assert "--ledger" in helps[cmd]
    assert "--rate" not in helps["plan"] and "--no-progress" not in helps["plan"]
    assert "--no-progress" not in helps["worker"] and "--rate" in helps["worker"]
    assert "--json" not in helps["status"]  # kept as a hidden alias of --format json
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--rate", "5"])


def test_status_table_json_unknown_job_and_noop_retry(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    seed_bucket(moto_url, bucket_name, [f"s/{i}.jpg" for i in range(12)] + ["s/notes.txt"])
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, storage)
    first = run_cli("run", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "registered 12 items (12 objects)" in first.stdout

    text = run_cli("status", "--config", str(cfg))
    assert text.returncode == 0, text.stderr
    assert re.search(r"REGISTERED\s+12\s+92\.3%", text.stdout)
    assert re.search(r"SKIPPED\s+1\s+7\.7%", text.stdout)
    # A run of a second or less still has a rate (the ledger's float seconds).
    run_row = r"^  1\s+run\s+\S+ \S+\s+\d:\d\d:\d\d\s+[\d.,]+\s+12\s+0\s+completed$"
    assert re.search(run_row, text.stdout, re.M), text.stdout
    assert "SKIPPED: " in text.stdout

    doc = orjson.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)
    assert doc["objects_by_state"] == {"REGISTERED": 12, "SKIPPED": 1}
    assert doc["job_in_ledger"] is True and doc["ledger_jobs"] == [doc["job"]]
    (run,) = doc["last_runs"]
    assert run["status"] == "completed" and run["counts"]["registered"] == 12
    assert run["duration_s"] > 0 and run["settled"] == 13
    assert run["settled_per_s"] == pytest.approx(13 / run["duration_s"])
    assert isinstance(run["started_at_s"], float)

    # A job the ledger does not hold: exit 2 and one line naming the jobs it holds, so a
    # script can tell (status text and JSON, and report).
    ledger = tmp_path / "l.sqlite"
    for args in (("status",), ("status", "--format", "json"), ("report",)):
        other = run_cli(*args, "--config", str(cfg), "--prefix", "elsewhere/")
        assert other.returncode == 2, (args, other.stdout, other.stderr)
        (line,) = other.stderr.splitlines()
        assert f"not in the ledger at {ledger}, which holds: {doc['job']} (" in line
        assert "Traceback" not in other.stderr
    odd = run_cli("status", "--config", str(cfg), "--prefix", "elsewhere/", "--format", "json")
    assert orjson.loads(odd.stdout)["job_in_ledger"] is False

    retry = run_cli("retry", "--config", str(cfg))
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert "nothing to retry" in retry.stdout and "no run recorded" in retry.stdout
    after = orjson.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)
    assert [r["id"] for r in after["last_runs"]] == [1]
