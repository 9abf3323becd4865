"""The deployment examples under config/deploy/ agree with the code: probe paths are routes of
the health server, ports are worker.http_port, commands parse with the CLI's own parser and
name a config that exists where it is mounted, stop timeouts exceed the worker's grace period,
one ledger writer everywhere. systemd-analyze checks the units when it is installed."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from ingest import config
from ingest.cli import EXIT_BUSY, EXIT_CONFIG, EXIT_FATAL, EXIT_INCOMPLETE, build_parser
from ingest.config import API_KEY_ENV, SyncConfig, WorkerConfig
from ingest.stats import Stats
from ingest.worker.observe import HEALTHZ, METRICS, READYZ, Health, make_app
from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, job_config, run_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "config" / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
GRACE_S = WorkerConfig().grace_period_s
HTTP_PORT = WorkerConfig().http_port


def script_name() -> str:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (name,) = [k for k, v in scripts.items() if v == "ingest.cli:main"]
    return str(name)


def routes() -> set[str]:
    app = make_app(Stats(), Health())
    return {r.canonical for r in app.router.resources()}


# --- Kubernetes ----------------------------------------------------------------------------


def docs(name: str) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all((K8S / name).read_text()):
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), name
        assert doc["metadata"]["name"]
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def only(by_kind: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind[kind]
    return doc


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
    return int(found)


def mount_for(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume whose mount holds `path` (the deepest mount wins)."""
    mounts = sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"]))
    for m in mounts:
        if PurePosixPath(path).is_relative_to(m["mountPath"]):
            (volume,) = [v for v in pod["volumes"] if v["name"] == m["name"]]
            return {"mount": m, "volume": volume}
    raise AssertionError(f"{path} is on no mounted volume")


def check_pod(
    by_kind: dict[str, list[dict[str, Any]]], pod: dict[str, Any], command: str, tmp: Path
) -> config.Config:
    """Checks common to the CronJob's and the Deployment's pod; returns the mounted config."""
    (c,) = pod["containers"]
    argv = c["command"] + c.get("args", [])
    assert argv[0] == script_name()
    ns = build_parser().parse_args(argv[1:])
    assert ns.command == command and ns.config
    # The config file is a key of the ConfigMap mounted at its directory.
    where = mount_for(pod, c, ns.config)
    assert where["mount"]["mountPath"] == str(PurePosixPath(ns.config).parent)
    cm_name = where["volume"]["configMap"]["name"]
    (cm,) = [d for d in by_kind["ConfigMap"] if d["metadata"]["name"] == cm_name]
    text = cm["data"][PurePosixPath(ns.config).name]
    (tmp / "cfg.toml").write_text(text)
    cfg = config.load(tmp / "cfg.toml")
    # The ledger is on the PersistentVolumeClaim of this file, writable.
    ledger = mount_for(pod, c, cfg.ledger.path)
    claim = ledger["volume"]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for d in by_kind["PersistentVolumeClaim"] if d["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not ledger["mount"].get("readOnly")
    # The key from a Secret, never a literal.
    (key,) = [e for e in c["env"] if e["name"] == API_KEY_ENV]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["key"]
    # Non-root, bounded.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), part
    # A read-only root file system needs a writable /tmp (video work, temp files).
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert "emptyDir" in mount_for(pod, c, "/tmp/x")["volume"]
    # The disk /tmp may fill (videos) is requested, so the pod lands where it fits.
    tmp_dir = mount_for(pod, c, "/tmp/x")["volume"].get("emptyDir", {})
    if "sizeLimit" in tmp_dir:
        request = quantity(c["resources"]["requests"]["ephemeral-storage"])
        assert request >= quantity(tmp_dir["sizeLimit"])
        assert quantity(c["resources"]["limits"]["ephemeral-storage"]) >= request
    return cfg


_SUFFIX = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_SUFFIX |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity in bytes ("10Gi", "512Mi", "1G")."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?|Ki)?", str(text))
    assert m, text
    return float(m.group(1)) * _SUFFIX[m.group(2) or ""]


def test_quantity() -> None:
    assert quantity("10Gi") == 10 * 2**30 and quantity("1G") == 1e9 and quantity(512) == 512


def test_worker_deployment(tmp_path: Path) -> None:
    by_kind = docs("worker-deployment.yaml")
    dep = only(by_kind, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"  # one ledger writer, even during a rollout
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    cfg = check_pod(by_kind, pod, "worker", tmp_path)
    assert pod["terminationGracePeriodSeconds"] > GRACE_S
    assert pod["terminationGracePeriodSeconds"] > cfg.worker.grace_period_s

    (c,) = pod["containers"]
    known = routes()
    probes = {"livenessProbe": HEALTHZ, "readinessProbe": READYZ}
    for probe, path in probes.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["path"] in known, probe
        assert container_port(c, get["port"]) == HTTP_PORT == cfg.worker.http_port, probe

    notes = spec["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == HTTP_PORT
    assert notes["prometheus.io/path"] == METRICS and METRICS in known

    svc = only(by_kind, "Service")
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert container_port(c, port["targetPort"]) == HTTP_PORT


def test_sync_cronjob(tmp_path: Path) -> None:
    by_kind = docs("cronjob-sync.yaml")
    cron = only(by_kind, "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
    check_pod(by_kind, pod, "sync", tmp_path)
    # Config error, failed items, fatal: a rerun would not help, fail the Job at once.
    (fail,) = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    codes = fail["onExitCodes"]
    assert codes["operator"] == "In"
    assert codes["containerName"] == pod["containers"][0]["name"]
    assert set(codes["values"]) == {EXIT_CONFIG, EXIT_INCOMPLETE, EXIT_FATAL}
    # Busy is a success, as for the systemd unit (SuccessExitStatus=5): never counted toward
    # backoffLimit nor retried at once.
    ns = build_parser().parse_args(pod["containers"][0]["command"][1:])
    assert ns.command == "sync" and ns.busy_ok
    # A hung sync ends before the next night: with Forbid, a Job still running would make the
    # CronJob skip every later night.
    assert spec["schedule"].split()[2:] == ["*", "*", "*"]  # daily
    assert 0 < job["activeDeadlineSeconds"] + spec["startingDeadlineSeconds"] < 24 * 3600
    assert pod["terminationGracePeriodSeconds"] > 0


def test_every_schedule_is_the_same_hour_in_utc() -> None:
    cron = only(docs("cronjob-sync.yaml"), "CronJob")["spec"]
    assert cron["timeZone"] in ("Etc/UTC", "UTC")
    minute, hour, *_ = cron["schedule"].split()
    timer = unit("ingest-sync.timer")["Timer"]["OnCalendar"]
    assert timer == f"*-*-* {int(hour):02d}:{int(minute):02d}:00 UTC"  # not the host's zone
    # The worker's cron is evaluated in UTC, and its example says so.
    from ingest.worker.schedule import parse_schedule

    nightly = parse_schedule(f"{minute} {hour} * * *").next_after(0.0)  # from 1970-01-01 UTC
    assert nightly == int(hour) * 3600 + int(minute) * 60
    assert "UTC" in (DEPLOY / "worker.toml").read_text()


# --- systemd -------------------------------------------------------------------------------


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h|hr|d)?")
_UNIT_S = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "min": 60.0, "m": 60.0}
_UNIT_S |= {"h": 3600.0, "hr": 3600.0, "d": 86400.0}


def timespan_s(text: str) -> float:
    """systemd.time(7) time span: "60", "90s", "1min 30s", "2h"."""
    parts = _SPAN.findall(text)
    assert parts and _SPAN.sub("", text).strip() == "", text
    return sum(float(n) * _UNIT_S[u or None] for n, u in parts)


def test_timespan_parser() -> None:
    assert timespan_s("60") == 60 and timespan_s("1min 30s") == 90 and timespan_s("20h") == 72000
    with pytest.raises(AssertionError):
        timespan_s("soon")


def exec_start(svc: configparser.RawConfigParser, command: str) -> Any:
    argv = shlex.split(svc["Service"]["ExecStart"])
    assert PurePosixPath(argv[0]).is_absolute() and PurePosixPath(argv[0]).name == script_name()
    ns = build_parser().parse_args(argv[1:])
    assert ns.command == command
    # The ledger is in the unit's StateDirectory, and the unit runs there.
    state = PurePosixPath("/var/lib") / svc["Service"]["StateDirectory"]
    assert ns.ledger and PurePosixPath(ns.ledger).parent == state
    assert svc["Service"]["WorkingDirectory"] == str(state)
    # A dedicated user; the key from a root-only environment file.
    assert svc["Service"]["User"] not in ("", "root")
    assert svc["Service"]["EnvironmentFile"] == "/etc/ingest/ingest.env"
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert svc["Service"][hardening] == "yes", hardening
    assert svc["Service"]["ProtectSystem"] == "strict"
    return ns


def test_sync_service_and_timer() -> None:
    svc = unit("ingest-sync.service")
    assert svc["Service"]["Type"] == "oneshot"
    ns = exec_start(svc, "sync")
    assert ns.config == "/etc/ingest/job.toml"
    # Exit 3 (finished with failed items) stays a failure: documented in the unit's comments.
    success = svc["Service"].get("SuccessExitStatus", "").split()
    assert str(EXIT_INCOMPLETE) not in success
    assert "# SuccessExitStatus=3" in (SYSTEMD / "ingest-sync.service").read_text()
    assert str(EXIT_BUSY) in success  # a manual sync is doing tonight's work

    timer = unit("ingest-sync.timer")["Timer"]
    assert timer["OnCalendar"] and timer["Persistent"] == "true"
    assert timespan_s(timer["RandomizedDelaySec"]) > 0
    assert timer["Unit"] == "ingest-sync.service" and (SYSTEMD / timer["Unit"]).is_file()
    assert unit("ingest-sync.timer")["Install"]["WantedBy"] == "timers.target"


def test_worker_service() -> None:
    svc = unit("ingest-worker.service")
    s = svc["Service"]
    assert s["Type"] == "simple"
    ns = exec_start(svc, "worker")
    assert PurePosixPath(ns.config).name == "worker.toml"
    assert s["Restart"] == "on-failure"
    assert s["KillSignal"] == "SIGTERM"
    assert timespan_s(s["TimeoutStopSec"]) > GRACE_S
    example = config.load(DEPLOY / "worker.toml")
    assert timespan_s(s["TimeoutStopSec"]) > example.worker.grace_period_s
    assert str(EXIT_CONFIG) in s["RestartPreventExitStatus"].split()  # a bad config: no loop
    assert str(EXIT_BUSY) not in s["RestartPreventExitStatus"].split()
    # Restarts alone never reach the start limit (the unit never ends up "failed" for it).
    u = svc["Unit"]
    restarts_in_window = timespan_s(u["StartLimitIntervalSec"]) / timespan_s(s["RestartSec"])
    assert restarts_in_window < int(u["StartLimitBurst"])


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # verify insists that ExecStart's binary exists: point it at this venv's script.
    script = Path(sys.executable).parent / script_name()
    assert script.is_file()
    names = sorted(p.name for p in SYSTEMD.iterdir())
    for name in names:
        text = (SYSTEMD / name).read_text().replace("/opt/ingest/bin/ingest", str(script))
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not [line for line in out.splitlines() if "ingest-" in line], out

    # A broken unit is caught (this test can fail).
    (tmp_path / "ingest-broken.service").write_text("[Service]\nType=oneshott\nExecStart=x\n")
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "ingest-broken.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ingest-broken.service" in proc.stdout + proc.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["ingest-sync.service", "ingest-worker.service"])
def test_systemd_exposure_is_low(tmp_path: Path, name: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    (tmp_path / name).write_text((SYSTEMD / name).read_text())
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in proc.stderr:  # systemd < 250
        pytest.skip("systemd-analyze security --offline is not supported")
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) < 2.5, proc.stdout


# --- the example worker config -------------------------------------------------------------


def test_worker_toml_documents_every_worker_and_sync_field() -> None:
    path = DEPLOY / "worker.toml"
    cfg = config.load(path)
    assert cfg.v7.dataset and cfg.v7.storage
    data = tomllib.loads(path.read_text())
    for section, cls in (("worker", WorkerConfig), ("sync", SyncConfig)):
        fields = set(cls.__dataclass_fields__)
        assert set(data[section]) == fields, section
    assert set(data["ledger"]) == set(config.LedgerConfig.__dataclass_fields__)
    # Every documented field carries a comment (a line starting with '#') above it or its group.
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line) and line.split()[0] in WorkerConfig.__dataclass_fields__:
            above = lines[max(i - 3, 0) : i]
            assert any(a.startswith("#") for a in above), line
    # The defaults the deployment files rely on are the ones shown.
    assert cfg.worker.http_port == HTTP_PORT and cfg.worker.grace_period_s == GRACE_S


def test_deploy_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.name in readme, path


def test_a_busy_sync_with_busy_ok_exits_0(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """What the CronJob relies on: with --busy-ok, "busy" is exit 0 and says so; without, 5."""
    import asyncio
    import time

    from ingest.ledger import open_ledger

    seed_bucket(moto_url, bucket_name, ["b/1.jpg"])
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, emulator.storage_for(bucket_name))
    assert run_cli("sync", "--config", str(cfg)).returncode == 0
    job = config.load(cfg).job

    async def hold() -> None:
        async with open_ledger(tmp_path / "l.sqlite", job) as lg:
            held = await lg.acquire_lease(
                "manual:1:ab:elsewhere", 600, time.time(), lambda _: False
            )
            assert held is None

    asyncio.run(hold())
    busy = run_cli("sync", "--config", str(cfg))
    assert busy.returncode == EXIT_BUSY, busy.stderr[-2000:]
    ok = run_cli("sync", "--config", str(cfg), "--busy-ok")
    assert ok.returncode == 0 and "busy: " in ok.stderr, ok.stderr[-2000:]


def test_worker_replicas_on_a_postgresql_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_kind = docs("worker-postgres-deployment.yaml")
    dep = only(by_kind, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] > 1  # they cooperate through the shared ledger
    assert "PersistentVolumeClaim" not in by_kind  # the state is in PostgreSQL
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    ns = build_parser().parse_args(c["command"][1:])
    assert ns.command == "worker"
    # The ledger URL and its password come from a Secret, never a literal.
    env = {e["name"]: e for e in c["env"]}
    for name in (API_KEY_ENV, "INGEST_LEDGER", "PGPASSWORD"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"], name
    (cm,) = by_kind["ConfigMap"]
    (tmp_path / "cfg.toml").write_text(cm["data"][PurePosixPath(ns.config).name])
    monkeypatch.setenv("INGEST_LEDGER", "postgresql://ingest@db:5432/ingest")
    cfg = config.load(tmp_path / "cfg.toml")
    assert cfg.ledger.url.startswith("postgresql://")
    assert set(cfg.worker.roles) == {"list", "media", "send"}
    # Sizing: every replica's pool fits PostgreSQL's default max_connections (100).
    assert spec["replicas"] * cfg.ledger.pool_max_size < 100
    assert pod["terminationGracePeriodSeconds"] > cfg.worker.grace_period_s
    assert pod["securityContext"]["runAsNonRoot"] is True
