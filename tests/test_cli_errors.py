"""Ordinary mistakes end in one line on stderr and a documented exit code, never a traceback
(issue 12 §1 and §2). Every case runs the real CLI as a subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.e2e import run_cli

EXIT_CONFIG = 2


def one_line(res: subprocess.CompletedProcess[str], code: int = EXIT_CONFIG) -> str:
    """The single stderr line of a refused command (asserting the exit code, no traceback)."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert res.returncode == code, (res.returncode, res.stderr)
    return lines[0]


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        '[v7]\ndataset = "d"\nstorage = "s"\n[source]\nbucket = "b"\n'
        f'[ledger]\npath = "{tmp_path / "l.sqlite"}"\n[output]\nprogress = false\n{body}',
        encoding="utf-8",
    )
    return path


# --- §2: wrong values are refused -------------------------------------------------------------

FILE_CASES = [
    ("[batch]\nmax_items = 10.7\n", "batch.max_items = 10.7: must be an integer"),
    ("[batch]\nmax_items = 10000\n", "batch.max_items = 10000: must be <= 500 (V7's documented"),
    ("[batch]\nmax_items = 0\n", "batch.max_items = 0: must be >= 1"),
    ('[source2]\nprefix = "x"\n', "unknown section [source2] (did you mean `source`?)"),
    ("[rate]\nrequests_per_s = nan\n", "rate.requests_per_s = nan: must be a finite number"),
    ("[rate]\nrequests_per_s = -1\n", "rate.requests_per_s = -1: must be > 0"),
    ("[rate]\nmin_requests_per_s = inf\n", "rate.min_requests_per_s = inf: must be a finite"),
    ("[worker]\nhttp_port = 70000\n", "worker.http_port = 70000: must be <= 65535"),
    ('[sync]\non_change = "regster"\n', "sync.on_change = 'regster': must be one of"),
    ('[media]\nthumbnail_concurrency = "4"\n', "media.thumbnail_concurrency = '4': must be an"),
]


@pytest.mark.parametrize(("body", "expected"), FILE_CASES, ids=[c[1][:30] for c in FILE_CASES])
def test_a_wrong_value_in_the_file_is_refused(tmp_path: Path, body: str, expected: str) -> None:
    res = run_cli("run", "--config", str(write(tmp_path, body)))
    assert expected in one_line(res)


def test_a_string_field_refuses_a_number_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[v7]\ndataset = "d"\n[source]\nprefix = 5\n', encoding="utf-8")
    assert "source.prefix = 5: must be a string" in one_line(run_cli("plan", "-c", str(path)))


def test_an_unknown_field_suggests_the_nearest(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[v7]\ndatset = "d"\n', encoding="utf-8")
    line = one_line(run_cli("run", "-c", str(path)))
    assert "unknown field v7.datset (did you mean `dataset`?)" in line


SET_CASES = [
    ("rate.requests_per_s=nan", "rate.requests_per_s = nan: must be a finite number"),
    ("batch.max_items=10.7", "batch.max_items = 10.7: must be an integer"),
    ("output.progress=maybe", "output.progress = 'maybe': must be true or false"),
    ("v7.datset=x", "unknown field v7.datset (did you mean `dataset`?)"),
    ("source.include=[1]", "source.include.0 = 1: must be a string"),
    ("v7.base_url=localhost:8080", "v7.base_url = 'localhost:8080' must start with http://"),
    ("source.endpoint_url=localhost:9000", "source.endpoint_url = 'localhost:9000' must start"),
]


@pytest.mark.parametrize(("override", "expected"), SET_CASES, ids=[c[0] for c in SET_CASES])
def test_a_wrong_override_is_refused(tmp_path: Path, override: str, expected: str) -> None:
    res = run_cli("run", "--config", str(write(tmp_path, "")), "--set", override)
    assert expected in one_line(res)


def test_base_url_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    from tests.support.e2e import cli_env

    res = run_cli("run", "-c", str(write(tmp_path, "")), env=cli_env(DARWIN_BASE_URL="v7.local"))
    assert "$DARWIN_BASE_URL = 'v7.local' must start with http://" in one_line(res)
