"""The progress display: its figures (pure), and the CLI under a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest.progress import (
    LINES_QUEUED,
    Display,
    RateWindow,
    View,
    ascii_only,
    clock_text,
    lines,
    make_console,
    renderable,
    run_progress,
    view,
)
from ingest.stats import Stats
from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, cli_env, job_config, run_cli, wait_for

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


def test_rate_and_eta_count_item_outcomes_only() -> None:
    """Skipped objects settle at listing speed: counted in the rate they would make the ETA a
    guess at the listing's speed. The rate is items (registered, blocked, failed) per second,
    and what is left once the listing is over is items."""
    s = _stats(planned=1000)
    s.listing = True
    w = RateWindow(window_s=20.0)
    view(s, w, 0.0)
    s.skipped = 5000  # the listing skips thousands in a second or two...
    s.registered, s.blocked, s.failed, s.requests = 80, 15, 5, 10
    s.listing = False
    v = view(s, w, 10.0)
    assert v.items_per_s == pytest.approx(10.0)  # ...which is not the rate items settle at
    assert v.requests_per_s == pytest.approx(1.0)
    assert (v.total - v.settled) == 900  # every skip is settled: what is left are items
    assert v.eta_s == pytest.approx(900 / 10.0)
    timing = lines(v)[1]
    assert "10.0 items/s" in timing and "ETA 0:01:30" in timing


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
        elapsed_s=98_765.0, items_per_s=12_345.6, requests_per_s=1_234.5,
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


def _under_pty(
    command: str,
    cfg: Path,
    *,
    term: str = "xterm-256color",
    meanwhile: Callable[[subprocess.Popen[bytes], int], bytes] | None = None,
) -> tuple[int, bytes, str]:
    """The CLI with stderr on a pseudo-terminal of 80 columns (stdout a pipe), the display on:
    (exit code, what the terminal got, stdout). ``meanwhile(proc, fd)`` runs first and returns
    what it read."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    env = {k: v for k, v in cli_env().items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    env["TERM"] = term
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", command, "--config", str(cfg),
         "--set", "output.progress=true", "--set", "output.log_format=auto",
         "--set", "output.progress_interval_s=0.1"],
        stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    try:
        raw = meanwhile(proc, master) if meanwhile else b""
        raw += _read_until_exit(master, proc, 120)
        assert proc.stdout is not None
        summary = proc.stdout.read().decode()
        rc = proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return rc, raw, summary


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
    rc, raw, summary = _under_pty("run", cfg)
    assert rc == 0, raw.decode(errors="replace")[-3000:]
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
    assert re.search(r"items/s  elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d", plain)
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


def test_a_terminal_that_is_not_utf8_gets_ascii_cut_to_its_width() -> None:
    """A "…" on a Latin-1 or ASCII terminal reaches it as "\\u2026" (six columns): the line
    wraps and every redraw scrolls. There the frame is ASCII, cropped."""
    s = _stats(planned=9_999_999, registered=1_234_567, blocked=99_999, failed=9_999)
    w = RateWindow()
    view(s, w, 0.0)
    for encoding in ("ascii", "latin-1"):
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding=encoding, errors="backslashreplace")
        console = make_console(stream)
        console.width = 60
        assert ascii_only(console)
        for listing in (True, False):
            s.listing = listing
            console.print(renderable(view(s, w, 2.0), ascii_only=ascii_only(console)))
        stream.flush()
        rows = raw.getvalue().decode(encoding).splitlines()
        assert len(rows) == 8 and all(len(r) <= 60 for r in rows), rows
        assert not any("\\u" in r or "\\x" in r for r in rows), rows
        assert "listing...  1,344,565 / 9,999,999+ settled (" in rows[0]  # cropped at 60
    assert not ascii_only(make_console(io.TextIOWrapper(io.BytesIO(), encoding="utf-8")))


# --- the display's thread, on a terminal that misbehaves --------------------------------------


class _Terminal(io.TextIOBase):
    """A terminal as rich sees one (isatty), recording which thread wrote what. ``fail``: every
    write raises it (a terminal gone: EIO; non-blocking and full: EAGAIN). ``paused``: cleared,
    writes wait for it (Ctrl-S, a stalled ssh link)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, str]] = []
        self.fail: OSError | None = None
        self.paused = threading.Event()
        self.paused.set()
        self.waiting = threading.Event()

    @property
    def encoding(self) -> str:
        return "utf-8"

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not self.paused.is_set():
            self.waiting.set()
            self.paused.wait(30)
        if self.fail is not None:
            raise self.fail
        self.writes.append((threading.get_ident(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(t for _, t in list(self.writes))


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> _Terminal:
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    return _Terminal()


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a fact with a deadline (the display thread changes it)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_write_error_ends_the_display_not_the_run(
    terminal: _Terminal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ingest.progress")
    s = _stats(planned=10)
    task = asyncio.create_task(run_progress(s, interval_s=0.01, out=terminal))
    await _until(lambda: "settled (this run)" in terminal.text())
    terminal.fail = OSError(errno.EIO, "Input/output error")
    await _until(lambda: "progress display stopped" in caplog.text)
    assert not task.done()  # it goes on as log lines
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = caplog.records[-1]
    assert last.getMessage() == "progress" and last.__dict__["total"] == 10


async def test_a_failed_display_is_logged_once_and_never_replaces_the_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ingest.engine import end_progress

    async def broken() -> None:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    task = asyncio.create_task(broken())
    await asyncio.wait([task])
    await end_progress(task)  # no exception
    (record,) = [r for r in caplog.records if "progress display failed" in r.getMessage()]
    assert "EAGAIN" in record.__dict__["error"] or "temporarily" in record.__dict__["error"]


async def test_the_event_loop_never_writes_to_the_terminal_even_paused(
    terminal: _Terminal,
) -> None:
    """A paused terminal (Ctrl-S) blocks whoever writes to it: only the display's thread
    does; log lines queue up (bounded) meanwhile, and the loop goes on."""
    loop_thread = threading.get_ident()
    display = Display(make_console(terminal), lambda: view(_stats(planned=5), RateWindow(), 1.0),
                      0.01)  # fmt: skip
    with display.running():
        await _until(lambda: "settled (this run)" in terminal.text())
        terminal.paused.clear()
        await _until(terminal.waiting.is_set)  # the display thread is stuck in a write
        for i in range(LINES_QUEUED + 5):
            display.write(f"line {i} :cat: [bold]x[/bold]\n")  # returns at once
        terminal.paused.set()
        await _until(lambda: "5 log lines dropped" in terminal.text())
    text = terminal.text()
    assert {t for t, _ in terminal.writes} and loop_thread not in {t for t, _ in terminal.writes}
    assert f"line {LINES_QUEUED - 1} :cat: [bold]x[/bold]" in text  # as written: no emoji,
    assert "\N{CAT FACE}" not in text and f"line {LINES_QUEUED} " not in text  # no markup
    assert text.rstrip().endswith("\x1b[?25h")  # the cursor is shown again at the end


async def test_stdout_stays_the_summarys_stderr_goes_above_the_display(
    terminal: _Terminal,
) -> None:
    from rich.file_proxy import FileProxy

    before = sys.stdout, sys.stderr
    display = Display(make_console(terminal), lambda: view(_stats(), RateWindow(), 1.0), 0.01)
    with display.running():
        await _until(lambda: isinstance(sys.stderr, FileProxy))
        assert not isinstance(sys.stdout, FileProxy)
        print("stray", file=sys.stderr)
        await _until(lambda: "stray" in terminal.text())
    assert (sys.stdout, sys.stderr) == before


def test_a_dumb_terminal_gets_log_lines_not_a_display(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """rich draws no live display on TERM=dumb (only a frame at its end): the progress log
    lines are what such a terminal gets."""
    seed_bucket(moto_url, bucket_name, [f"d/{i}.jpg" for i in range(20)])
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, emulator.storage_for(bucket_name))
    rc, raw, summary = _under_pty("run", cfg, term="dumb")
    text = raw.decode()
    assert rc == 0, text[-3000:]
    assert "settled (this run)" not in text and "\x1b[?25l" not in text
    assert re.search(r"progress .*settled=20 total=20", text), text[-3000:]
    assert "registered 20 items" in summary


def test_nothing_to_retry_draws_nothing(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """The display starts once the lease is held and there is work: a no-op retry (like a
    busy job) leaves no "listing… 0 / 0+" frame and no hidden cursor behind."""
    seed_bucket(moto_url, bucket_name, ["n/1.jpg"])
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, emulator.storage_for(bucket_name))
    assert run_cli("run", "--config", str(cfg)).returncode == 0
    rc, raw, summary = _under_pty("retry", cfg)
    assert rc == 0, raw.decode(errors="replace")[-3000:]
    assert "nothing to retry" in summary
    assert b"settled (this run)" not in raw and b"\x1b[?25l" not in raw


def test_a_forced_stop_gives_the_cursor_back(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """Two SIGINTs (stop at once, exit 130) while the display runs: the display ends before the
    signal handlers go, with its last frame and the cursor shown again."""
    import signal

    seed_bucket(moto_url, bucket_name, [f"f/{i:03d}.jpg" for i in range(200)])
    cfg = job_config(
        tmp_path, emulator, moto_url, bucket_name, emulator.storage_for(bucket_name),
        extra="[rate]\nrequests_per_s = 2\nburst = 1\nadaptive = false\n"
        "[batch]\nmax_items = 5\n",
    )  # fmt: skip

    def interrupt(proc: subprocess.Popen[bytes], fd: int) -> bytes:
        seen = bytearray()
        deadline = time.monotonic() + 60
        while b"settled (this run)" not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 65536)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        return bytes(seen)

    rc, raw, _summary = _under_pty("run", cfg, meanwhile=interrupt)
    assert rc == 130, raw.decode(errors="replace")[-3000:]
    assert b"\x1b[?25l" in raw  # the display hid the cursor...
    assert raw.rindex(b"\x1b[?25h") > raw.rindex(b"\x1b[?25l")  # ...and showed it again
    assert len(emulator.items()) < 200  # it stopped before the end
