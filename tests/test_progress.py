"""The progress display: its figures (pure), and the CLI under a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from ingest.progress import RateWindow, View, clock_text, lines, view
from ingest.stats import Stats
from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, cli_env, job_config, wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]")
COLUMNS = 80


def _stats(**counts: int) -> Stats:
    s = Stats(started_at=0.0, listing=False)
    for k, v in counts.items():
        setattr(s, k, v)
    return s


def test_settled_counts_every_outcome_and_the_total_includes_recovered_items() -> None:
    s = _stats(planned=70, recovered=30, skipped=10, registered=50, blocked=5, failed=5)
    v = view(s, RateWindow(), 10.0)
    assert (v.settled, v.total) == (70, 110)
    assert v.fraction == pytest.approx(70 / 110)


def test_rate_and_eta_from_the_recent_window() -> None:
    s = _stats(planned=1000)
    w = RateWindow(window_s=20.0)
    view(s, w, 0.0)
    s.registered, s.blocked, s.skipped, s.requests = 80, 10, 10, 10
    v = view(s, w, 10.0)
    assert v.settled_per_s == pytest.approx(10.0)  # blocked and skipped count too
    assert v.requests_per_s == pytest.approx(1.0)
    assert v.eta_s == pytest.approx((1010 - 100) / 10.0)
    assert "ETA 0:01:31" in lines(v)[1]


def test_while_listing_there_is_no_percentage_or_eta() -> None:
    s = _stats(planned=100, registered=10)
    s.listing = True
    w = RateWindow()
    view(s, w, 0.0)
    v = view(s, w, 1.0)
    assert v.fraction is None and v.eta_s is None
    head, timing, *_ = lines(v)
    assert head.startswith("listing…") and "100+" in head and "%" not in head
    assert "ETA …" in timing


def test_a_stalled_run_has_an_unknown_eta_and_a_finished_one_zero() -> None:
    w = RateWindow()
    s = _stats(planned=10)
    view(s, w, 0.0)
    assert view(s, w, 5.0).eta_s == float("inf")
    assert clock_text(float("inf")) == "-:--:--"
    s.registered = 10
    assert view(s, w, 6.0).eta_s == 0.0


def test_lines_fit_80_columns_with_the_bar_for_millions() -> None:
    v = View(
        settled=9_876_543, total=9_999_999, listing=False, registered=9_000_000,
        registered_objects=9_500_000, blocked=876_543, failed=999_999, skipped=999_999,
        elapsed_s=98_765.0, settled_per_s=12_345.6, requests_per_s=1_234.5,
        allowed_per_s=1_250.0, rate_limited=999_999, in_flight=64, processing=999,
    )  # fmt: skip
    from ingest.progress import BAR_COLUMNS

    head, *rest = lines(v)
    assert BAR_COLUMNS + 1 + len(head) <= COLUMNS
    assert all(len(line) <= COLUMNS for line in rest)


# --- the CLI under a pseudo-terminal --------------------------------------------------------


def _read_until_exit(fd: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every slave end is closed, the child is gone
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return bytes(out)


def test_live_display_fits_80_columns_and_shows_total_percentage_and_eta(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = [f"p/{i:04d}.jpg" for i in range(150)] + ["p/readme.txt"]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(
        tmp_path, emulator, moto_url, bucket_name, storage,
        extra="[rate]\nrequests_per_s = 5\nburst = 1\nadaptive = false\n"
        "[batch]\nmax_items = 10\n",
    )  # fmt: skip
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    env = {k: v for k, v in cli_env().items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "run", "--config", str(cfg),
         "--set", "output.progress=true", "--set", "output.log_format=auto",
         "--set", "output.progress_interval_s=0.1"],
        stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    try:
        raw = _read_until_exit(master, proc, 120)
        assert proc.stdout is not None
        summary = proc.stdout.read().decode()
        assert proc.wait(30) == 0, raw.decode(errors="replace")[-3000:]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = raw.decode()
    # Every piece between cursor moves, carriage returns and newlines fits the terminal.
    pieces = re.split(r"[\r\n]", ANSI.sub("\n", text))
    widest = max(pieces, key=len)
    assert len(widest) <= COLUMNS, widest
    # Redraws overwrite: the cursor goes back up over the last frame every time.
    frames = text.count("settled (this run)")
    assert frames >= 10
    net_lines = text.count("\n") - len(re.findall(r"\x1b\[(\d*)A", text))
    assert net_lines < 30, net_lines  # the final frame and a few log lines, not one per frame
    plain = ANSI.sub("", text)
    final = re.findall(r"(\d+\.\d)%  ([\d,]+) / ([\d,]+) settled", plain)
    assert final and final[-1] == ("100.0", "151", "151")
    assert re.search(r"settled/s  elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d", plain)
    mid = [f for f in final if f[0] != "100.0"]
    assert mid and all(t == "151" for _p, _d, t in mid)  # the total is final once listed
    # stdout was a pipe: the summary went there, as text, with its units.
    assert "registered 150 items (150 objects)" in summary
    assert "skipped 1 object;" in summary
    assert "settled (this run)" not in summary
    assert plain.index("listing…") < plain.index("%  ")  # it said so until the listing ended


def test_a_resumed_run_counts_only_its_own_work(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """Once read "listed 2,000  registered 2,610": the resumed run's figures are its own (the
    items left queued by the first run are "recovered", part of its total), and the ledger's
    totals over both runs come on their own line."""
    import signal

    keys = [f"r/{i // 100}/{i:04d}.jpg" for i in range(400)]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(
        tmp_path, emulator, moto_url, bucket_name, storage,
        extra="[rate]\nrequests_per_s = 4\nburst = 1\nadaptive = false\n"
        "[batch]\nmax_items = 10\n",
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "run", "--config", str(cfg),
         "--set", "source.page_size=100"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert wait_for(lambda: len(emulator.items()) >= 30 or proc.poll() is not None, 60)
    proc.send_signal(signal.SIGINT)
    _out, first_err = proc.communicate(timeout=60)
    assert proc.returncode == 130, first_err[-3000:]
    first = len(emulator.items())
    assert 0 < first < 400

    second = subprocess.run(
        [sys.executable, "-m", "ingest", "run", "--config", str(cfg), "--rate", "500"],
        env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(emulator.items()) == 400
    head = second.stdout.splitlines()[0]
    m = re.search(
        r"registered (\d+) items \((\d+) objects\).*listed (\d+) objects, recovered (\d+) items",
        head,
    )
    assert m, second.stdout
    registered, objects, listed, recovered = map(int, m.groups())
    assert registered == objects == 400 - first  # this run's, not the ledger's
    assert recovered > 0 and registered <= recovered + listed
    assert "ledger totals (every run), objects: REGISTERED 400" in second.stdout


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_a_frame_is_cut_to_any_terminal_width_never_wrapped(width: int) -> None:
    import io

    from rich.console import Console

    from ingest.progress import renderable

    s = _stats(planned=9_999_999, registered=1_234_567, blocked=99_999, failed=9_999, skipped=7)
    s.requests, s.processing, s.in_flight = 99_999, 12, 8
    w = RateWindow()
    view(s, w, 0.0)
    s.registered += 1000
    for listing in (True, False):
        s.listing = listing
        out = io.StringIO()
        Console(file=out, width=width, force_terminal=True, color_system=None).print(
            renderable(view(s, w, 2.0))
        )
        rows = out.getvalue().splitlines()
        assert len(rows) == 4  # one row per line: nothing wrapped
        assert all(len(r) <= width for r in rows), rows
        assert ("listing…" in rows[0]) is listing
