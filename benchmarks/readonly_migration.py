"""Read-only migration end to end: Azurite and fake-gcs-server into the V7 emulator.

Run: ``.venv/bin/python -m benchmarks.readonly_migration [--images N] [--quick]`` (5,000 images
per provider, about 5 minutes on 2 cores; ``--quick``: 500 images).

For each provider, in one run:

- seeds N real JPEGs (1280x720, gradients + noise, ~100-200 KB; a few dozen distinct images
  whose bytes are reused across keys) under ``images/`` with bounded concurrency
  (tests/support/emulators.py helpers);
- **read-write baseline**: the real CLI (``python -m ingest run``) registers them through a
  read-write storage configuration on the same bucket (no media work at all);
- **read-only**: the CLI again through a read-only configuration: every image is read,
  measured, thumbnailed in the process pool and its thumbnail uploaded under ``v7-thumbs/``;
- **re-run**: the read-only run once more: it must send 0 register requests and re-make no
  thumbnail (the thumbnails' etags / generations must not change);
- **naive baseline**: a sequential in-process loop over the first 200 images (download with the
  provider SDK -> Pillow open / thumbnail / save q50 -> upload), extrapolated to images/s.

After each run the emulator must hold N items (GET /_emulator/items), each read-only slot with
width, height and a storage_thumbnail_key that exists in the bucket.

Every server is its own process (V7 emulator with no rate limit, Azurite, fake-gcs-server), as is
the engine: nothing shares a GIL with the code measured, except the naive loop (in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks._common import (
    ChildRun,
    admin,
    cli_env,
    emulator,
    ingest_cmd,
    load_note,
    run_child,
    self_cpu_s,
    table,
    workdir,
)
from ingest.emulator import API_KEY
from tests.support import emulators as storage_emulators
from tests.support.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_BIN,
    AzuriteServer,
    azure_create_container,
    azure_seed,
    gcs_create_bucket,
    gcs_seed,
)

DISTINCT_IMAGES = 32
IMAGE_SIZE = (1280, 720)
FOLDERS = 50
PREFIX = "images/"
THUMBS = "v7-thumbs"
NAIVE_THUMBS = "naive-thumbs"
NAIVE_IMAGES = 200
BOX = (356, 200)
BUCKET = "bench-readonly"
CONN_ENV = "BENCH_AZURE_CONNECTION_STRING"
RATE = 1000.0  # the emulator is unlimited: the engine's own ceiling, not V7's, is measured
IN_FLIGHT = 16


# --- images ----------------------------------------------------------------------------------


def make_images(n: int = DISTINCT_IMAGES) -> list[bytes]:
    """Distinct 1280x720 JPEGs at quality 90: gradients + noise, ~100-200 KB each."""
    out = []
    for seed in range(n):
        gx = Image.linear_gradient("L").rotate(90 + 11 * seed).resize(IMAGE_SIZE)
        gy = Image.linear_gradient("L").resize(IMAGE_SIZE)
        noise = Image.effect_noise(IMAGE_SIZE, 10 + seed % 12)
        im = Image.merge("RGB", (gx, Image.blend(gy, noise, 0.3), Image.blend(gx, noise, 0.15)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def image_keys(n: int) -> list[str]:
    return [f"{PREFIX}d{i % FOLDERS:02d}/img_{i:05d}.jpg" for i in range(n)]


def naive_thumbnail(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.thumbnail(BOX)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=50)
        return out.getvalue()


# --- providers -------------------------------------------------------------------------------


@dataclass
class Provider:
    """One storage emulator, seen from the benchmark: configs, seeding, listing, naive loop."""

    name: str
    source_toml: str  # the [source] section's provider-specific lines
    storage_bucket: str  # what the V7 storage configuration calls the bucket
    storage_prefix: str  # the V7 storage configuration's prefix (-> our artifact prefix)
    seed: Callable[[dict[str, bytes]], None]
    versions: Callable[[str], dict[str, str]]  # blob name -> etag/generation under a prefix
    naive: Callable[[list[str]], float]  # seconds for the sequential loop over these keys
    env: dict[str, str] = field(default_factory=dict)


def azure_provider(server: AzuriteServer) -> Provider:
    from azure.storage.blob import BlobServiceClient, ContentSettings

    azure_create_container(server, BUCKET)
    cc = BlobServiceClient.from_connection_string(server.connection_string).get_container_client(
        BUCKET
    )

    def versions(prefix: str) -> dict[str, str]:
        return {b.name: str(b.etag) for b in cc.list_blobs(name_starts_with=prefix)}

    def naive(keys: list[str]) -> float:
        jpeg = ContentSettings(content_type="image/jpeg")
        t0 = time.perf_counter()
        for key in keys:
            data = cc.download_blob(key).readall()
            thumb = naive_thumbnail(data)
            cc.upload_blob(f"{NAIVE_THUMBS}/{key}", thumb, overwrite=True, content_settings=jpeg)
        return time.perf_counter() - t0

    return Provider(
        name="azure (Azurite)",
        source_toml=f'provider = "azure"\nconnection_string_env = "{CONN_ENV}"\n',
        storage_bucket=AZURITE_ACCOUNT,  # V7's Azure "bucket" is the storage account
        storage_prefix=f"{BUCKET}/{THUMBS}",  # container segment first, dropped by the engine
        seed=lambda objects: azure_seed(server, BUCKET, objects),
        versions=versions,
        naive=naive,
        env={CONN_ENV: server.connection_string},
    )


def gcs_provider(url: str) -> Provider:
    gcs_create_bucket(url, BUCKET)

    def versions(prefix: str) -> dict[str, str]:
        found: dict[str, str] = {}
        token = ""
        while True:
            q = {"prefix": prefix, "fields": "nextPageToken,items(name,generation)"}
            if token:
                q["pageToken"] = token
            with urllib.request.urlopen(
                f"{url}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(q)}", timeout=60
            ) as r:
                doc = json.loads(r.read())
            for it in doc.get("items", []):
                found[it["name"]] = str(it.get("generation", ""))
            token = doc.get("nextPageToken", "")
            if not token:
                return found

    def naive(keys: list[str]) -> float:
        from gcloud.aio.storage import Storage

        async def loop() -> float:
            async with Storage(api_root=url, api_is_dev=True) as gcs:
                t0 = time.perf_counter()
                for key in keys:
                    data = await gcs.download(BUCKET, key)
                    thumb = naive_thumbnail(data)
                    await gcs.upload(
                        BUCKET, f"{NAIVE_THUMBS}/{key}", thumb, content_type="image/jpeg"
                    )
                return time.perf_counter() - t0

        return asyncio.run(loop())

    return Provider(
        name="gcs (fake-gcs-server)",
        source_toml=f'provider = "gcp"\nendpoint_url = "{url}"\n',
        storage_bucket=BUCKET,
        storage_prefix=THUMBS,
        seed=lambda objects: gcs_seed(url, BUCKET, objects),
        versions=versions,
        naive=naive,
    )


@contextmanager
def azurite() -> Iterator[Provider]:
    if not AZURITE_BIN.exists() and shutil.which("npm"):
        import subprocess

        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"], cwd=AZURITE_BIN.parents[2], check=True
        )
    # The session fixture's body, used as a plain context manager (same process, same flags).
    fixture: Any = storage_emulators.azurite
    with contextmanager(fixture.__wrapped__)() as server:
        yield azure_provider(server)


@contextmanager
def fake_gcs() -> Iterator[Provider]:
    fixture: Any = storage_emulators.fake_gcs_url
    with contextmanager(fixture.__wrapped__)() as url:
        yield gcs_provider(url)


# --- the engine ------------------------------------------------------------------------------


def write_config(
    path: Path, prov: Provider, *, v7_url: str, dataset: str, storage: str, mode: str
) -> Path:
    ledger = path.with_suffix(".sqlite")
    for p in ledger.parent.glob(ledger.name + "*"):
        p.unlink()
    path.write_text(
        f"""# Written by benchmarks/readonly_migration.py.
[v7]
base_url = "{v7_url}"
dataset = "{dataset}"
storage = "{storage}"
mode = "{mode}"
request_timeout_s = 60

[source]
{prov.source_toml}bucket = "{BUCKET}"
prefix = "{PREFIX}"

[rate]
requests_per_s = {RATE}
max_in_flight = {IN_FLIGHT}

[ledger]
path = "{ledger}"

[output]
progress = false
log_format = "json"
""",
        encoding="utf-8",
    )
    return path


def check_items(v7_url: str, dataset: str, n: int, thumbs: set[str] | None) -> str:
    """'' when the dataset holds exactly n items (read-only: each with width, height and a
    thumbnail key that is in the bucket), else what is wrong."""
    items = admin(v7_url, f"items?dataset={dataset}")["items"]
    if len(items) != n:
        return f"{len(items)} items, expected {n}"
    if thumbs is None:
        return ""
    bad = 0
    for item in items:
        for slot in item.get("slots", []):
            key = str(slot.get("storage_thumbnail_key", ""))
            key = key.removeprefix(f"{BUCKET}/")  # Azure storage keys start with the container
            ok = slot.get("width") == IMAGE_SIZE[0] and slot.get("height") == IMAGE_SIZE[1]
            bad += not (ok and key in thumbs)
    return f"{bad} slots without exact size / an uploaded thumbnail" if bad else ""


def children_cpu_s() -> float:
    """CPU seconds of every finished child (a CLI run and its pool workers, once waited)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def servers_cpu_s() -> float:
    """CPU seconds so far of the servers still running as our children (V7 emulator, storage
    emulator)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


@dataclass
class Cpu:
    """CPU seconds spent during one step: by the engine (or this process) and by the servers."""

    engine_s: float = 0.0
    servers_s: float = 0.0


@contextmanager
def cpu_of(step: Cpu, in_process: bool = False) -> Iterator[Cpu]:
    mine = self_cpu_s if in_process else children_cpu_s
    e0, s0 = mine(), servers_cpu_s()
    try:
        yield step
    finally:
        step.engine_s, step.servers_s = mine() - e0, servers_cpu_s() - s0


def per_image(cpu: Cpu, n: int) -> str:
    return f"{1000 * cpu.engine_s / n:.1f} / {1000 * cpu.servers_s / n:.1f}"


def counters(v7_url: str) -> dict[str, Any]:
    return dict(admin(v7_url, "state").get("counters", {}))


def sampled_rss_mb(run: ChildRun) -> float:
    """The CLI's largest sampled RSS. Not ``peak_rss_mb`` (ru_maxrss): a child forked from this
    process counts the parent's pages as its own until it execs (measured: ``python -c pass``
    reports 22.6 MB from a small parent, 322.7 MB from one holding 300 MB)."""
    return max((mb for _t, mb in run.rss_samples), default=0.0)


def engine_line(run: ChildRun) -> str:
    for line in run.output.splitlines():
        if line.startswith("done in"):
            return line
    return run.output[-400:]


@dataclass
class Result:
    provider: str
    images: int
    seed_s: float
    rw_s: float
    ro_s: float
    thumbnails: int
    rerun_s: float
    rerun_requests: int
    rerun_remade: int
    naive_per_s: float
    ro_peak_mb: float
    ro_cpu: Cpu
    naive_cpu: Cpu
    problems: list[str]


def bench(
    prov: Provider, v7_url: str, n: int, images: list[bytes], out: Path, profile: bool = False
) -> Result:
    tag = prov.name.split()[0]
    problems: list[str] = []
    keys = image_keys(n)
    t0 = time.perf_counter()
    prov.seed({k: images[i % len(images)] for i, k in enumerate(keys)})
    seed_s = time.perf_counter() - t0
    print(f"[{tag}] seeded {n:,} images in {seed_s:.1f} s ({n / seed_s:,.0f}/s)", flush=True)

    ro_storage, rw_storage = f"{tag}-ro", f"{tag}-rw"
    ro_ds, rw_ds = f"{tag}-readonly", f"{tag}-readwrite"
    for name, readonly in ((ro_storage, True), (rw_storage, False)):
        admin(
            v7_url,
            "storage",
            {
                "name": name,
                "provider": "azure" if tag == "azure" else "gcp",
                "bucket": prov.storage_bucket,
                "prefix": prov.storage_prefix,
                "readonly": readonly,
            },
        )
    for ds in (ro_ds, rw_ds):
        admin(v7_url, "datasets", {"slug": ds})
    env = cli_env(**prov.env)

    def cli(cfg: Path, label: str) -> ChildRun:
        cmd = ingest_cmd(cfg)
        if profile and label == "read-only":  # py-spy over the CLI and its thumbnail workers
            spy = Path(sys.executable).with_name("py-spy")
            flame = out / f"{tag}-read-only.collapsed"
            cmd = [str(spy), "record", "--subprocesses", "--format", "raw", "-o", str(flame),
                   "--", *cmd]  # fmt: skip
        run = run_child(cmd, env, timeout_s=900, log=out / f"{tag}-{label}.log")
        print(
            f"[{tag}] {label}: exit {run.returncode}, {run.wall_s:.1f} s wall, "
            f"max RSS {sampled_rss_mb(run):.0f} MB | {engine_line(run)}",
            flush=True,
        )
        if run.returncode != 0:
            problems.append(f"{label} exited {run.returncode}")
        return run

    # Baseline 1: read-write, same bucket, no media work.
    rw_cfg = write_config(
        out / f"{tag}-rw.toml",
        prov,
        v7_url=v7_url,
        dataset=rw_ds,
        storage=rw_storage,
        mode="readwrite",
    )
    rw = cli(rw_cfg, "read-write")
    if err := check_items(v7_url, rw_ds, n, None):
        problems.append(f"read-write: {err}")

    # The measured run: read-only.
    ro_cfg = write_config(
        out / f"{tag}-ro.toml",
        prov,
        v7_url=v7_url,
        dataset=ro_ds,
        storage=ro_storage,
        mode="readonly",
    )
    with cpu_of(Cpu()) as ro_cpu:
        ro = cli(ro_cfg, "read-only")
    thumbs = prov.versions(THUMBS + "/")
    if err := check_items(v7_url, ro_ds, n, set(thumbs)):
        problems.append(f"read-only: {err}")
    if len(thumbs) != n:
        problems.append(f"{len(thumbs)} thumbnails under {THUMBS}/, expected {n}")

    # Re-run: nothing sent, nothing re-made.
    before = int(counters(v7_url).get("register_requests", 0))
    again = cli(ro_cfg, "re-run")
    sent = int(counters(v7_url).get("register_requests", 0)) - before
    after = prov.versions(THUMBS + "/")
    remade = sum(1 for k, v in after.items() if thumbs.get(k) != v)
    if sent or remade:
        problems.append(f"re-run sent {sent} register requests, re-made {remade} thumbnails")

    # Baseline 2: the naive sequential loop, in this process.
    m = min(NAIVE_IMAGES, n)
    with cpu_of(Cpu(), in_process=True) as naive_cpu:
        naive_s = prov.naive(keys[:m])
    print(f"[{tag}] naive loop: {m} images in {naive_s:.1f} s ({m / naive_s:.1f}/s)", flush=True)
    return Result(
        prov.name,
        n,
        seed_s,
        rw.wall_s,
        ro.wall_s,
        len(thumbs),
        again.wall_s,
        sent,
        remade,
        m / naive_s,
        sampled_rss_mb(ro),
        ro_cpu,
        naive_cpu,
        problems,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.readonly_migration", description=__doc__
    )
    ap.add_argument("--images", type=int, default=0, help="images per provider (default 5000)")
    ap.add_argument("--quick", action="store_true", help="500 images per provider")
    ap.add_argument(
        "--providers", default="azure,gcs", help="comma-separated: azure, gcs (default both)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run the read-only CLI under py-spy record (collapsed stacks in .bench/; slower)",
    )
    ns = ap.parse_args(argv)
    n = ns.images or (500 if ns.quick else 5000)
    out = workdir("readonly-migration")
    print(f"start: {load_note()}", flush=True)
    t0 = time.perf_counter()
    images = make_images()
    sizes = sorted(len(b) for b in images)
    print(
        f"{len(images)} distinct JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}: "
        f"{sizes[0] // 1000}-{sizes[-1] // 1000} KB (mean {sum(sizes) // len(sizes) // 1000} KB), "
        f"made in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    starters: dict[str, Callable[[], AbstractContextManager[Provider]]] = {
        "azure": azurite,
        "gcs": fake_gcs,
    }
    results: list[Result] = []
    with emulator() as v7_url:
        os.environ.setdefault("DARWIN_API_KEY", API_KEY)
        for name in ns.providers.split(","):
            with starters[name.strip()]() as prov:
                results.append(bench(prov, v7_url, n, images, out, ns.profile))
            print(f"after {prov.name}: {load_note()}", flush=True)
    rows = []
    for r in results:
        m = min(NAIVE_IMAGES, r.images)
        ro_rate, rw_rate = r.images / r.ro_s, r.images / r.rw_s
        rows.append(
            (
                r.provider,
                r.images,
                f"{r.ro_s:.1f}",
                f"{ro_rate:.1f}",
                r.thumbnails,
                f"{rw_rate:.1f}",
                f"{ro_rate / rw_rate:.2f}x",
                f"{r.naive_per_s:.1f}",
                f"{ro_rate / r.naive_per_s:.2f}x",
                f"{r.rerun_s:.1f} s, {r.rerun_requests} req, {r.rerun_remade} remade",
                per_image(r.ro_cpu, r.images),
                per_image(r.naive_cpu, m),
                f"{r.ro_peak_mb:.0f}",
            )
        )
    print()
    print(
        table(
            [
                "provider",
                "images",
                "read-only wall s",
                "read-only img/s",
                "thumbnails",
                "read-write img/s",
                "ro/rw",
                "naive img/s",
                "engine/naive",
                "re-run",
                "ro CPU ms/img engine / servers",
                "naive CPU ms/img loop / servers",
                "ro CLI RSS MB (sampled)",
            ],
            rows,
        )
    )
    print(f"\nend: {load_note()}; total {time.perf_counter() - t0:.0f} s")
    failed = [f"{r.provider}: {p}" for r in results for p in r.problems]
    for p in failed:
        print(f"PROBLEM {p}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
