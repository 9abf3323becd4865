"""Read-only DICOM conversion: slices/s per core against a plain pydicom loop, and a migration.

Run: ``.venv/bin/python -m benchmarks.dicom [--slices N] [--quick]`` (about two minutes on 2
shared cores; ``--quick``: fewer slices).

1. **Conversion, one core** — CT-sized slices (512x512, 16-bit signed, rescale intercept -1024,
   a soft-tissue window; noise over a body-like disc so PNGs have a realistic size), made once
   with pydicom, uncompressed and JPEG 2000 (lossless, openjpeg), measured in one run:

   - baseline: ``dcmread`` -> ``pixel_array`` -> numpy rescale + min/max to 8 bits ->
     ``Image.fromarray`` -> PNG (Pillow's default level 6) + ``thumbnail`` JPEG q50, in process;
     and the same loop with PNG level 1 (ours), so the cost of the DICOM rules shows;
   - ours, slice: ``ingest.media.dicom.convert_slice`` (header, modality LUT, VOI window,
     MONOCHROME1 rule, PNG + thumbnail), in process;
   - ours, series frame: ``convert_frame`` (the raw 8-bit frame piped to ffmpeg for a series);
   - pool: ``ThumbnailPool(workers=cpu_count).call(convert_slice, ...)`` over the same files,
     slices/s in total and per core.

2. **Read-only migration end to end** — N slices in moto S3 (in this process's threads; the
   engine is its own process), the V7 emulator with a read-only storage configuration, the real
   CLI: (a) ``plan.dicom_series = false``: every slice a PNG image item; (b) the same slices as
   series of 40 (one video item each: decode, FFV1 via ffmpeg's stdin, HLS + sections);
   (c) baseline: the same keys registered through a read-write configuration (V7 reads DICOM
   itself there: no media work); (d) with ``--big-series N``: one series of N slices, to show
   the engine's memory does not grow with the series. Wall time, slices/s, the engine's peak
   RSS (sampled; its own process; the decoder processes hold one slice each).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless

from benchmarks._common import (
    admin,
    cli_env,
    emulator,
    free_port,
    ingest_cmd,
    load_note,
    run_child,
    table,
    workdir,
)
from ingest.emulator import API_KEY
from ingest.media.dicom import convert_frame, convert_slice
from ingest.media.thumbnail import THUMBNAIL_BOX, ThumbnailPool

SIZE = 512
SERIES = 40  # slices per series in the migration
DATASET = "demo-dataset"
BUCKET = "bench-dicom"
MAX_PIXELS = 300_000_000


# --- slices ----------------------------------------------------------------------------------


def ct_slice(seed: int, *, compressed: bool = False) -> bytes:
    """A 512x512 CT slice: air around a noisy soft-tissue disc, stored as HU + 1024."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE * 0.42) ** 2
    hu = np.where(
        disc, 40 + rng.normal(0, 25, (SIZE, SIZE)), -1000 + rng.normal(0, 5, (SIZE, SIZE))
    )
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.clip(hu + 1024, -2000, 4000).astype(np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.InstanceNumber, ds.SliceLocation = seed + 1, float(seed)
    if compressed:
        ds.compress(JPEG2000Lossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def baseline(path: str, level: int = 6) -> bytes:
    """The plain loop: pydicom -> numpy -> Pillow (PNG + thumbnail), no DICOM display rules."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = arr.min(), arr.max()
    im = Image.fromarray(((arr - lo) / (hi - lo) * 255).astype(np.uint8))
    png = io.BytesIO()
    im.save(png, "PNG", compress_level=level)
    im.thumbnail(THUMBNAIL_BOX)
    jpeg = io.BytesIO()
    im.save(jpeg, "JPEG", quality=50)
    return png.getvalue()


def baseline_level1(path: str) -> bytes:
    """The same loop with the PNG level ours uses (1): what the DICOM rules cost."""
    return baseline(path, 1)


def ours_slice(path: str) -> bytes:
    return convert_slice(path, MAX_PIXELS).png


def ours_frame(path: str) -> bytes:
    return convert_frame(path, 0, False)


@dataclass
class Rate:
    """Slices per CPU-second of this process (= per core, robust to a loaded machine) and
    per wall second."""

    slices: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def per_cpu_s(self) -> float:
        return self.slices / self.cpu_s if self.cpu_s else 0.0

    @property
    def per_s(self) -> float:
        return self.slices / self.wall_s if self.wall_s else 0.0


def measure(
    fns: dict[str, Callable[[str], bytes]], paths: list[str], rounds: int
) -> dict[str, Rate]:
    """Each ``fn`` over ``paths``, ``rounds`` times, interleaved (round 1 of every fn, then
    round 2, ...) so that the machine's load falls on all of them alike."""
    rates = {name: Rate() for name in fns}
    for fn in fns.values():
        fn(paths[0])  # warm-up: imports, decoder plugins
    for _ in range(rounds):
        for name, fn in fns.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for p in paths:
                fn(p)
            r = rates[name]
            r.slices += len(paths)
            r.cpu_s += time.process_time() - cpu
            r.wall_s += time.perf_counter() - wall
    return rates


async def pool_per_second(paths: list[str], rounds: int) -> tuple[float, int]:
    workers = os.cpu_count() or 1
    async with ThumbnailPool(workers=workers) as pool:
        await asyncio.gather(*(pool.call(convert_slice, p, MAX_PIXELS) for p in paths[:workers]))
        start = time.perf_counter()
        await asyncio.gather(
            *(pool.call(convert_slice, p, MAX_PIXELS) for _ in range(rounds) for p in paths)
        )
        return rounds * len(paths) / (time.perf_counter() - start), workers


def _cell(rate: Rate, base: float) -> str:
    text = f"{rate.per_cpu_s:.1f} ({rate.per_s:.1f}/s wall)"
    return f"{text}, {rate.per_cpu_s / base:.2f}x" if base else text


def conversion(root: Path, n: int, rounds: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, compressed in (("uncompressed", False), ("JPEG 2000 lossless", True)):
        paths = []
        for i in range(n):
            p = root / f"{'j2k' if compressed else 'raw'}_{i:03d}.dcm"
            p.write_bytes(ct_slice(i, compressed=compressed))
            paths.append(str(p))
        r = measure(
            {"base": baseline, "base1": baseline_level1, "slice": ours_slice, "frame": ours_frame},
            paths,
            rounds,
        )
        pooled, workers = asyncio.run(pool_per_second(paths, rounds))
        base = r["base"].per_cpu_s

        rows.append(
            [
                label,
                _cell(r["base"], 0.0),
                _cell(r["base1"], base),
                _cell(r["slice"], base),
                _cell(r["frame"], base),
                f"{pooled:.1f}/s wall ({workers} workers)",
            ]
        )
        print(f"  {label}: done ({load_note()})", flush=True)
    return rows


# --- migration -------------------------------------------------------------------------------


def _config(
    path: Path, v7: str, s3: str, storage: str, ledger: Path, extra: str, prefix: str = "ct/"
) -> Path:
    for p in ledger.parent.glob(ledger.name + "*"):
        p.unlink()
    path.write_text(
        f"""[v7]
base_url = "{v7}"
dataset = "{DATASET}"
storage = "{storage}"
request_timeout_s = 30

[source]
provider = "aws"
bucket = "{BUCKET}"
prefix = "{prefix}"
endpoint_url = "{s3}"

[rate]
requests_per_s = 1000
max_in_flight = 16

[ledger]
path = "{ledger}"

[output]
progress = false
log_format = "json"
{extra}
""",
        encoding="utf-8",
    )
    return path


def migration(out: Path, n: int, big: int = 0) -> list[list[object]]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    s3_url = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)
        bodies = [ct_slice(i) for i in range(SERIES)]
        for i in range(n):
            s3.put_object(
                Bucket=BUCKET,
                Key=f"ct/p{i // SERIES:03d}/s{i % SERIES:03d}.dcm",
                Body=bodies[i % SERIES],
            )
        env = cli_env(DARWIN_API_KEY=API_KEY)
        rows: list[list[object]] = []
        with emulator("--rate", "0") as v7:
            for name, ro in (("ro", True), ("rw", False)):
                admin(
                    v7,
                    "storage",
                    {
                        "name": name,
                        "provider": "aws",
                        "bucket": BUCKET,
                        "prefix": "v7",
                        "readonly": ro,
                    },
                )
            runs = [
                ("read-only, slices as images", "ro", "[plan]\ndicom_series = false\n", "ct/"),
                (f"read-only, series of {SERIES} as videos", "ro", "", "ct/"),
                ("read-write baseline (no media work)", "rw", "", "ct/"),
            ]
            if big:
                for i in range(big):
                    s3.put_object(Bucket=BUCKET, Key=f"big/s{i:05d}.dcm", Body=bodies[i % SERIES])
                runs.append((f"read-only, one series of {big}", "ro", "", "big/"))
            for label, storage, extra, prefix in runs:
                count = big if prefix == "big/" else n
                admin(v7, "reset", {})
                cfg = _config(
                    out / f"{storage}.toml", v7, s3_url, storage, out / "l.sqlite", extra, prefix
                )
                run = run_child(ingest_cmd(cfg), env, timeout_s=1800, sample_every_s=0.2)
                items = len(admin(v7, f"items?dataset={DATASET}")["items"])
                rows.append(
                    [
                        label,
                        run.returncode,
                        items,
                        f"{run.wall_s:.1f}",
                        f"{count / run.wall_s:.1f}",
                        # Sampled (psutil, every 0.2 s), the engine process alone: wait4's
                        # ru_maxrss survives exec, so it would carry this process's size
                        # (moto holds the bucket in memory here).
                        f"{max((mb for _t, mb in run.rss_samples), default=0.0):.0f}",
                    ]
                )
                print(f"  {label}: {run.wall_s:.1f} s ({load_note()})", flush=True)
                if run.returncode != 0:
                    print(run.output[-2000:], file=sys.stderr)
        return rows
    finally:
        moto.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dicom", description=__doc__)
    ap.add_argument("--slices", type=int, default=0, help="slices migrated (default 320)")
    ap.add_argument("--quick", action="store_true", help="fewer slices (120 migrated)")
    ap.add_argument(
        "--big-series", type=int, default=0, help="also migrate one series of this many slices"
    )
    ns = ap.parse_args(argv)
    n = ns.slices or (120 if ns.quick else 320)
    out = workdir("dicom")
    print(f"start: {load_note()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as d:
        conv = conversion(Path(d), 12 if ns.quick else 24, 2 if ns.quick else 3)
    print(
        table(
            [
                "512x512 CT, slices per CPU-s",
                "baseline (PNG level 6)",
                "baseline, PNG level 1",
                "ours: slice -> PNG + thumb",
                "ours: series frame",
                "ours: pool",
            ],
            conv,
        )
    )
    mig = migration(out, n, ns.big_series)
    print(f"{n} slices of {SIZE}x{SIZE}, 16-bit:")
    print(table(["run", "exit", "items", "wall s", "slices/s", "engine peak RSS MB"], mig))
    print(f"end: {load_note()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
