"""Ordinary mistakes end in one line on stderr and a documented exit code, never a traceback
(issue 12 §1 and §2). Every case runs the real CLI as a subprocess."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, cli_env, emulator_process, job_config, run_cli

pytestmark = pytest.mark.timeout(300)

EXIT_CONFIG = 2
EXIT_PIPE = 141


def one_line(res: subprocess.CompletedProcess[str], code: int = EXIT_CONFIG) -> str:
    """The single stderr line of a refused command, besides JSON log lines (asserting the exit
    code and that no traceback was printed, in a log line or not)."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip() and not x.startswith("{")]
    assert len(lines) == 1, res.stderr
    assert res.returncode == code, (res.returncode, res.stderr)
    return lines[0]


def log_lines(stderr: str, level: str) -> list[str]:
    docs = [orjson.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    return [str(d["msg"]) for d in docs if d.get("level") == level]


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


# --- §1: ordinary mistakes at run time ----------------------------------------------------------

OBJECTS = 600  # a report and a plan of these are far larger than a pipe's 64 KiB buffer


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with emulator_process() as e:
        yield e


@pytest.fixture(scope="module")
def job(
    tmp_path_factory: pytest.TempPathFactory, moto_url: str, emu: Emulator
) -> tuple[Path, Path]:
    """A bucket of OBJECTS images registered once: (config, ledger) shared by the module."""
    d = tmp_path_factory.mktemp("job")
    bucket = f"errors-{d.name.lower().replace('_', '-')}"[:60]
    seed_bucket(moto_url, bucket, [f"img/{i:04d}.jpg" for i in range(OBJECTS)])
    cfg = job_config(
        d, emu, moto_url, bucket, emu.storage_for(bucket), extra="[rate]\nrequests_per_s = 500\n"
    )
    first = run_cli("run", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-2000:]
    return cfg, d / "l.sqlite"


def test_a_malformed_manifest_is_refused_before_the_run(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("item_name,slot_name\nfoo,0\n", encoding="utf-8")
    res = run_cli(
        "run", "-c", str(write(tmp_path, "")), "--set", "plan.slots=manifest",
        "--set", f"plan.manifest={manifest}",
    )  # fmt: skip
    assert "header must name item_name, slot_name, key (missing key)" in one_line(res)
    assert not (tmp_path / "l.sqlite").exists()  # refused before anything was opened


def test_a_missing_ledger_directory_is_created(job: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, _ = job
    ledger = tmp_path / "new" / "dirs" / "l.sqlite"
    # an empty prefix: a fresh ledger over the registered one would be BLOCKED (exit 3)
    res = run_cli("run", "-c", str(cfg), "--ledger", str(ledger), "--prefix", "none/")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and ledger.is_file()


@pytest.mark.parametrize("command", ["run", "status", "report"])
@pytest.mark.parametrize(
    ("ledger", "expected"),
    [
        ("dir", "is a directory: point the ledger at a file"),
        ("junk", "is not an ingest ledger (file is not a database)"),
        ("other", "is an SQLite database of another application"),
    ],
)
def test_a_ledger_that_is_not_one_is_named(
    job: tuple[Path, Path], tmp_path: Path, command: str, ledger: str, expected: str
) -> None:
    cfg, _ = job
    path = tmp_path / ledger
    if ledger == "dir":
        path.mkdir()
    elif ledger == "junk":
        path.write_bytes(bytes(range(256)) * 20)
    else:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE objects (a, b)")
    res = run_cli(command, "-c", str(cfg), "--ledger", str(path))
    assert expected in one_line(res)


def test_a_ledger_in_a_directory_that_cannot_be_written(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    # The tests run as root, who writes anywhere but in /proc.
    res = run_cli("run", "-c", str(cfg), "--ledger", "/proc/l.sqlite")
    line = one_line(res)
    assert "cannot open ledger /proc/l.sqlite" in line
    assert "check that the path is a file in a writable directory" in line


def test_status_and_report_of_a_ledger_that_does_not_exist(
    job: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, _ = job
    missing = tmp_path / "none.sqlite"
    status = run_cli("status", "-c", str(cfg), "--ledger", str(missing))
    assert status.returncode == 0 and "no ledger at" in status.stdout
    report = run_cli("report", "-c", str(cfg), "--ledger", str(missing))
    assert "no ledger at" in one_line(report)


def test_a_worker_port_in_use_is_one_line(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_cli(
            "worker", "--once", "-c", str(cfg), "--set", "worker.http_host=127.0.0.1",
            "--set", f"worker.http_port={port}",
        )  # fmt: skip
    line = one_line(res)
    assert f"worker.http_port {port} on '127.0.0.1' cannot be used" in line
    assert "in use" in line


def _head(args: list[str], lines: int = 1) -> tuple[int, list[bytes], str]:
    """``ingest … | head -n lines``: read ``lines`` lines, close the pipe, wait."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    got = [proc.stdout.readline() for _ in range(lines)]
    proc.stdout.close()  # the reader goes away, as `head` does
    err = proc.stderr.read().decode()
    return proc.wait(60), got, err


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_report_into_a_closed_pipe_exits_quietly(job: tuple[Path, Path], fmt: str) -> None:
    cfg, _ = job
    code, got, err = _head(["report", "-c", str(cfg), "--format", fmt], lines=2)
    assert code == EXIT_PIPE, err
    assert all(got) and "Traceback" not in err and "BrokenPipe" not in err
    assert not [x for x in err.splitlines() if not x.startswith("{")], err


def test_plan_to_stdout_into_a_closed_pipe_exits_quietly(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    # a scratch plan of every object: the user's ledger is set aside so nothing is "done"
    code, got, err = _head(["plan", "-c", str(cfg), "-o", "-", "--ledger", "/nonexistent.sqlite"])
    assert code == EXIT_PIPE, err
    assert orjson.loads(got[0])["body"]["items"]
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert not [x for x in err.splitlines() if not x.startswith("{")], err


def test_an_output_file_that_cannot_be_written_is_one_line(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    res = run_cli("report", "-c", str(cfg), "-o", "/nonexistent/dir/r.jsonl")
    assert "cannot write /nonexistent/dir/r.jsonl: No such file or directory" in one_line(res)


# --- §2: filters with a typo, runs that do nothing ---------------------------------------------


def test_report_with_an_unknown_state_lists_the_states(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    line = one_line(run_cli("report", "-c", str(cfg), "--state", "registerd"))
    assert "report --state 'registerd' is not a state (did you mean REGISTERED?)" in line
    assert "one of: DISCOVERED, PLANNED" in line
    ok = run_cli("report", "-c", str(cfg), "--state", "registered")
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == OBJECTS


def test_retry_with_an_unknown_blocked_reason_lists_the_reasons(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    line = one_line(run_cli("retry", "-c", str(cfg), "--blocked", "ALREDY_EXISTS"))
    assert "retry --blocked 'ALREDY_EXISTS': no item is blocked for it" in line
    assert "(did you mean ALREADY_EXISTS?)" in line and "blocked in this job: none" in line


def test_retry_blocked_takes_the_reasons_the_ledger_holds() -> None:
    from ingest.cli import check_blocked_reason
    from ingest.errors import ConfigError

    stored = ["ALREADY_EXISTS,FILE_UPLOAD_FAILED", "NEW_V7_REASON", "UNKNOWN"]
    assert check_blocked_reason("new_v7_reason ", stored) == "NEW_V7_REASON"  # not in V7's list
    # the parts of a combined reason trimmed, in any order: the value as stored
    got = check_blocked_reason(" file_upload_failed , already_exists", stored)
    assert got == "ALREADY_EXISTS,FILE_UPLOAD_FAILED"
    assert check_blocked_reason("unknown", []) == "UNKNOWN"  # what the registrar stores
    assert check_blocked_reason("file_upload_timeout", stored) == "FILE_UPLOAD_TIMEOUT"
    with pytest.raises(ConfigError, match=r"did you mean NEW_V7_REASON\?"):
        check_blocked_reason("NEW_V7_RAESON", stored)
    with pytest.raises(ConfigError, match="needs a reason"):
        check_blocked_reason(" , ", stored)


def test_a_prefix_that_lists_nothing_warns_and_exits_0(
    job: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, _ = job
    res = run_cli(
        "run", "-c", str(cfg), "--prefix", "nothing-here/", "--ledger", str(tmp_path / "l")
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (warning,) = log_lines(res.stderr, "warning")
    assert "the listing of prefix 'nothing-here/' found no objects" in warning
    assert "source.include = []" in warning


def test_patterns_that_match_nothing_warn_and_exit_0(
    job: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, _ = job
    res = run_cli(
        "run", "-c", str(cfg), "--ledger", str(tmp_path / "l"),
        "--set", 'source.include=["*.png", "*.tif"]',
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    (warning,) = log_lines(res.stderr, "warning")
    assert f"none of the {OBJECTS} objects listed under prefix ''" in warning
    assert "source.include = ['*.png', '*.tif']" in warning


async def test_an_endpoint_botocore_refuses_leaves_nothing_to_clean_up() -> None:
    """The config refuses a scheme-less endpoint; one botocore refuses anyway (a bare
    "http://") is a ConfigError, and closing the adapter afterwards is a no-op, not an
    AttributeError on a client that never opened."""
    from ingest.config import SourceConfig
    from ingest.errors import ConfigError
    from ingest.providers.aws.s3 import S3Source

    source = S3Source(SourceConfig(bucket="b", endpoint_url="http://"))
    with pytest.raises(ConfigError, match="s3 endpoint_url 'http://' is not usable"):
        await source.check_access()
    await source.close()
    await source.close()


# --- §5: credentials -----------------------------------------------------------------------------


def _no_aws_credentials(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in cli_env(**extra).items() if not k.startswith("AWS_")}
    # No file, no instance metadata: nothing of the default chain is left.
    env.update(
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return env


def test_missing_aws_credentials_name_the_fix(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    line = one_line(run_cli("run", "-c", str(cfg), env=_no_aws_credentials()))
    assert "no AWS credentials found" in line and "NoCredentialsError" not in line
    assert "source.profile (or AWS_PROFILE)" in line and "AWS_ACCESS_KEY_ID" in line
    assert "instance, task or pod role" in line


def test_an_unknown_aws_profile_is_named(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    res = run_cli("run", "-c", str(cfg), "--set", "source.profile=nope", env=_no_aws_credentials())
    assert "AWS profile 'nope' (source.profile or AWS_PROFILE) is not in" in one_line(res)


def _gcs_job(tmp_path: Path, emu: Emulator) -> Path:
    emu.add_storage(name="gcs-rw", provider="gcp", bucket="gcs-bucket", prefix="t")
    path = tmp_path / "gcs.toml"
    path.write_text(
        f'[v7]\nbase_url = "{emu.url}"\ndataset = "demo-dataset"\nstorage = "gcs-rw"\n'
        '[source]\nprovider = "gcp"\nbucket = "gcs-bucket"\n'
        f'[ledger]\npath = "{tmp_path / "l.sqlite"}"\n'
        '[output]\nprogress = false\nlog_format = "json"\n',
        encoding="utf-8",
    )
    return path


def _no_gcp_credentials(home: Path, **extra: str) -> dict[str, str]:
    env = cli_env()
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    env.pop("STORAGE_EMULATOR_HOST", None)
    env.pop("CLOUDSDK_CONFIG", None)
    # No gcloud login in this HOME; the metadata server is a port nobody listens on.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env.update(HOME=str(home), GCE_METADATA_HOST=f"127.0.0.1:{closed}", **extra)
    return env


def test_gcs_without_credentials_fails_at_once_naming_the_fix(
    tmp_path: Path, emu: Emulator
) -> None:
    res = run_cli("run", "-c", str(_gcs_job(tmp_path, emu)), env=_no_gcp_credentials(tmp_path))
    line = one_line(res)
    assert "no Google Cloud credentials for GCS bucket 'gcs-bucket'" in line
    assert "GOOGLE_APPLICATION_CREDENTIALS" in line and "workload identity" in line
    assert "did not answer" in line


def test_a_gcs_key_file_that_is_not_there_is_named(tmp_path: Path, emu: Emulator) -> None:
    env = _no_gcp_credentials(tmp_path, GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "k.json"))
    res = run_cli("run", "-c", str(_gcs_job(tmp_path, emu)), env=env)
    line = one_line(res)
    assert "GOOGLE_APPLICATION_CREDENTIALS: the file it names does not exist" in line
    assert "k.json" not in line  # the value is never shown (it may be the key itself)


def test_a_gcs_key_pasted_into_the_variable_is_never_shown(tmp_path: Path, emu: Emulator) -> None:
    key = '{"type": "service_account", "private_key": "-----BEGIN S3CRET-----"}'
    env = _no_gcp_credentials(tmp_path, GOOGLE_APPLICATION_CREDENTIALS=key)
    res = run_cli("run", "-c", str(_gcs_job(tmp_path, emu)), env=env)
    line = one_line(res)
    assert "GOOGLE_APPLICATION_CREDENTIALS holds JSON, not a path" in line
    assert "S3CRET" not in res.stderr + res.stdout


# --- §5: the emulator's own storage configurations ---------------------------------------------


def test_emulator_storage_flag_adds_configurations(tmp_path: Path) -> None:
    gcs = "name=gcs-ro,provider=gcp,bucket=gb,prefix=thumbs,readonly=true"
    with emulator_process("--storage", gcs, "--storage", "name=az,provider=azure,bucket=acct") as e:
        import urllib.request

        req = urllib.request.Request(
            f"{e.url}/api/teams/emulator-team/storage",
            headers={"Authorization": "ApiKey emulator-key"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            doc = orjson.loads(r.read())
    found = {s["name"]: s for s in (doc if isinstance(doc, list) else doc.get("items", doc))}
    assert {"s3-rw", "s3-ro", "gcs-ro", "az"} <= set(found)
    assert found["gcs-ro"]["provider"] == "gcp" and found["gcs-ro"]["readonly"] is True
    assert found["gcs-ro"]["bucket"] == "gb" and found["gcs-ro"]["prefix"] == "thumbs"
    assert found["az"]["provider"] == "azure" and found["az"]["readonly"] is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("provider=gcp,bucket=b", "name= is required"),
        ("name=x,provider=gcs", "provider must be one of aws, gcp, azure"),
        ("name=x,readonly=yes", "readonly='yes': expected true or false"),
        ("name=x,colour=red", "'colour=red': expected key=value with key one of name"),
    ],
)
def test_emulator_storage_flag_refuses_a_typo(value: str, expected: str) -> None:
    """Refused while the arguments are parsed. The port is one this test holds: were the value
    accepted, the emulator could not listen there and would end at once (never serve on)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        res = run_cli("emulator", "--host", "127.0.0.1", "--port", port, "--storage", value)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert expected in res.stderr.splitlines()[-1]


def test_emulator_help_points_at_a_document_that_exists() -> None:
    res = run_cli("emulator", "--help")
    assert res.returncode == 0 and "docs/v7-contract.md" in res.stdout
    root = Path(__file__).resolve().parent.parent
    assert (root / "docs" / "v7-contract.md").is_file()


def test_the_demo_says_what_to_install_without_moto() -> None:
    # The demo as after a plain `pip install -e .`: moto cannot be imported.
    code = (
        "import runpy, sys; sys.modules['moto'] = None; sys.modules['moto.server'] = None; "
        "sys.argv = ['demo']; sys.exit(runpy.run_module('ingest.demo', run_name='__main__'))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    line = one_line(res)
    assert "the demo needs moto and boto3" in line and "pip install -e '.[demo]'" in line


def test_a_plan_of_an_empty_prefix_warns_too(job: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, _ = job
    out = tmp_path / "plan.jsonl"
    res = run_cli("plan", "-c", str(cfg), "--prefix", "nothing-here/", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    (warning,) = log_lines(res.stderr, "warning")
    assert "the listing of prefix 'nothing-here/' found no objects" in warning
    assert out.read_bytes() == b""


# --- output that cannot be written, a reader that is gone ----------------------------------------


def test_report_to_a_full_disk_is_one_line(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    res = run_cli("report", "-c", str(cfg), "-o", "/dev/full")
    assert "cannot write /dev/full: No space left on device" in one_line(res, code=4)


def test_plan_to_a_full_disk_is_one_line(job: tuple[Path, Path]) -> None:
    cfg, _ = job
    res = run_cli("plan", "-c", str(cfg), "-o", "/dev/full", "--ledger", "/nonexistent.sqlite")
    assert "cannot write /dev/full: No space left on device" in one_line(res, code=4)


def test_a_refusal_with_stderr_gone_still_exits_2(job: tuple[Path, Path]) -> None:
    """The one line cannot be written (stderr's reader went away): the exit code still says
    what happened, not 1 from an error in the handler."""
    cfg, _ = job
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read stderr
    try:
        res = subprocess.run(
            [sys.executable, "-m", "ingest", "report", "-c", str(cfg), "--state", "bogus"],
            env=cli_env(), stdout=subprocess.PIPE, stderr=write_end, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert res.returncode == EXIT_CONFIG


def test_only_a_broken_stdout_exits_quietly_with_141() -> None:
    from ingest.cli import _exit_for
    from ingest.output import OutputGone

    assert _exit_for(OutputGone()) == ("", EXIT_PIPE)
    with pytest.raises(BrokenPipeError):  # from stderr or a socket: not stdout's reader
        _exit_for(BrokenPipeError())


@pytest.mark.parametrize("kind", ["not-a-directory", "symlink-loop"])
def test_a_config_path_that_cannot_be_read_is_one_line(tmp_path: Path, kind: str) -> None:
    if kind == "not-a-directory":
        (tmp_path / "f").write_text("", encoding="utf-8")
        path, why = tmp_path / "f" / "c.toml", "Not a directory"
    else:
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        path, why = tmp_path / "a", "Too many levels of symbolic links"
    assert f"config: cannot read {path}: {why}" in one_line(run_cli("plan", "-c", str(path)))


def test_an_exception_group_keeps_a_bug_and_an_interruption() -> None:
    from ingest.cli import _exit_for, _first_leaf
    from ingest.errors import Aborted, LedgerError, V7Error

    bug = TypeError("a bug")
    mixed = ExceptionGroup("g", [LedgerError("locked"), ExceptionGroup("h", [bug])])
    assert _first_leaf(mixed) is mixed  # re-raised whole: the bug's traceback is kept
    ctrl_c = BaseExceptionGroup("g", [V7Error("cancelled mid-request"), KeyboardInterrupt()])
    assert _exit_for(_first_leaf(ctrl_c))[1] == 130
    aborted = ExceptionGroup("g", [V7Error("x"), Aborted("stopped")])
    assert _exit_for(_first_leaf(aborted))[1] == 130
    ours = ExceptionGroup("g", [ExceptionGroup("h", [LedgerError("locked")]), V7Error("x")])
    assert isinstance(_first_leaf(ours), LedgerError)
