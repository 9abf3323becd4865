"""Thumbnail throughput: ingest.media.thumbnail vs a plain Pillow baseline, and the pool.

Run: ``.venv/bin/python -m benchmarks.thumbnails`` (about a minute on 2 cores).

Generates real-sized images once into a temp dir (12 MP JPEGs 4000x3000 at quality 90 and 4K
3840x2160 PNGs, gradients + noise so encoded sizes are realistic), then measures in one run:

- baseline: ``Image.open`` -> ``thumbnail((356, 200))`` -> ``save(JPEG, quality=50)`` (RGB files,
  so no mode conversion is needed; no EXIF handling), single process;
- ours: ``make_thumbnail_from_path`` (exact size, EXIF rule, draft, mode handling), single process;
- pool: ``ThumbnailPool(workers=os.cpu_count()).make_from_path`` over the same files.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ingest.media.thumbnail import THUMBNAIL_BOX, ThumbnailPool, make_thumbnail_from_path

JPEGS = 6
PNGS = 3
ROUNDS = 3  # each file is processed this many times per measurement


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    gx = Image.linear_gradient("L").rotate(90 + seed).resize(size)
    gy = Image.linear_gradient("L").resize(size)
    noise = Image.effect_noise(size, 24 + 4 * seed)
    mixed = Image.blend(gy, noise, 0.35)
    return Image.merge("RGB", (gx, mixed, Image.blend(gx, noise, 0.2)))


def generate(root: Path) -> tuple[list[Path], list[Path]]:
    jpegs, pngs = [], []
    for i in range(JPEGS):
        path = root / f"photo_{i}.jpg"
        _photo((4000, 3000), i).save(path, "JPEG", quality=90)
        jpegs.append(path)
    for i in range(PNGS):
        path = root / f"screen_{i}.png"
        _photo((3840, 2160), i).save(path, "PNG", compress_level=6)
        pngs.append(path)
    return jpegs, pngs


def baseline(path: Path) -> bytes:
    with Image.open(path) as im:
        im.thumbnail(THUMBNAIL_BOX)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=50)
        return out.getvalue()


def ours(path: Path) -> bytes:
    return make_thumbnail_from_path(path).jpeg


def per_second(fn: Callable[[Path], bytes], paths: list[Path]) -> float:
    fn(paths[0])  # warm-up (imports, caches)
    start = time.perf_counter()
    for _ in range(ROUNDS):
        for path in paths:
            fn(path)
    return ROUNDS * len(paths) / (time.perf_counter() - start)


async def pool_per_second(paths: list[Path], workers: int) -> float:
    async with ThumbnailPool(workers=workers) as pool:
        await asyncio.gather(*(pool.make_from_path(p) for p in paths[:workers]))  # start workers
        start = time.perf_counter()
        await asyncio.gather(*(pool.make_from_path(p) for _ in range(ROUNDS) for p in paths))
        return ROUNDS * len(paths) / (time.perf_counter() - start)


def main() -> None:
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="thumbbench-") as tmp:
        t0 = time.perf_counter()
        jpegs, pngs = generate(Path(tmp))
        mb_jpeg = sum(p.stat().st_size for p in jpegs) / len(jpegs) / 1e6
        mb_png = sum(p.stat().st_size for p in pngs) / len(pngs) / 1e6
        print(
            f"generated {JPEGS} JPEG 4000x3000 (avg {mb_jpeg:.1f} MB) and {PNGS} PNG 3840x2160 "
            f"(avg {mb_png:.1f} MB) in {time.perf_counter() - t0:.1f} s; cpu_count={workers}"
        )
        rows = []
        for label, paths in (("JPEG 12 MP", jpegs), ("PNG 4K", pngs)):
            base = per_second(baseline, paths)
            mine = per_second(ours, paths)
            pooled = asyncio.run(pool_per_second(paths, workers))
            rows.append((label, base, mine, pooled))
    print()
    print(
        f"{'images':<11} {'baseline/s':>10} {'ours/s':>8} {'ours/base':>9} "
        f"{'pool/s':>8} {'pool/ours':>9}  (pool workers={workers})"
    )
    for label, base, mine, pooled in rows:
        print(
            f"{label:<11} {base:>10.1f} {mine:>8.1f} {mine / base:>8.2f}x "
            f"{pooled:>8.1f} {pooled / mine:>8.2f}x"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
