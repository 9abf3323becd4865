"""Video processing: ``VideoPool`` against darwin-py's real ``extract_artifacts``.

    .venv/bin/python -m benchmarks.video [--rounds 3] [--seconds 20] [--size 1280x720]
                                         [--rate 30] [--clips 4] [--variants ...]

Generates a clip (testsrc2 + sine, libx264) in a temp dir, then for each round runs, each in
its own child process and in a rotating order (so load drift hits every variant alike):

- ``darwin``: darwin-py's ``darwin.extractor.video.extract_artifacts`` in its own virtual
  environment (``.bench/darwin-venv``, created by benchmarks/darwin_py.py, or ``$DARWIN_VENV``);
- ``before``: ``VideoPool`` as it was: with ``--before-root /work/main`` that checkout's own
  code, otherwise emulated (one ffmpeg process, PNG at zlib's default level 6);
- ``ours``: ``VideoPool`` defaults (three ffmpeg processes, PNG level 1, x264 ``medium``);
- ``veryfast``: the defaults with ``x264_preset="veryfast"`` (the documented trade-off);
- on request: ``t1`` (one thread per ffmpeg process), ``onepass`` (PNG level 1, one process).

Every variant writes the same artifact set (PNG primary frames, JPEG q5 previews, HLS CRF 23
and 40, manifest, thumbnail, audio peaks); ours upload into a sink that drops the bytes.
Wall seconds and CPU seconds (user+sys of the child and everything it waited for) are printed
per run, then medians and the ratio to darwin-py *of the same round*, median over rounds.
``--clips N`` then times N clips submitted at once to one pool (workers 1 and 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c
from ingest.media.video import VideoOptions, VideoPool

# benchmarks/darwin_py.py creates it; DARWIN_VENV points at one elsewhere (another worktree's).
DARWIN_PY = Path(os.environ.get("DARWIN_VENV", c.WORK / "darwin-venv")) / "bin" / "python"

DARWIN_SCRIPT = r"""
import json, sys, tempfile, time
from darwin.extractor.video import extract_artifacts
t = time.perf_counter()
with tempfile.TemporaryDirectory(dir=sys.argv[2]) as out:
    r = extract_artifacts(sys.argv[1], out, "bench/item/files/slot")
    p = r["registration_payload"]
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t,
                              "frames": p["total_frames"], "visible": p["visible_frames"]}))
"""

VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"split_encoders": False, "png_compression_level": 6},
    "ours": {},
    "veryfast": {"x264_preset": "veryfast"},
    # Not run by default (--variants ...,t1,onepass):
    "t1": {"threads_per_worker": 1},  # one thread per ffmpeg process
    "onepass": {"split_encoders": False},  # PNG level 1 in one process
}


class NullUploader:
    """Accepts every artifact and drops it (measures processing, not a bucket)."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None:
        self.count += 1
        if isinstance(data, bytes):
            self.bytes += len(data)
        else:
            self.bytes += (await asyncio.to_thread(data.stat)).st_size


def make_clip(path: Path, seconds: int, size: str, rate: str) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip


async def run_pool(
    clips: list[Path], temp: Path, workers: int, knobs: dict[str, Any]
) -> dict[str, Any]:
    uploader = NullUploader()
    pool = VideoPool(workers=workers, temp_dir=temp, **knobs)

    async def one(i: int, src: Path, size: int) -> int:
        facts = await pool.process(
            src,
            prefix=f"bench/item{i}/files/slot",
            file_name=src.name,
            uploader=uploader,
            source_storage_key=f"bench/{src.name}",
            size_bytes=size,
            opts=VideoOptions(),
        )
        return facts.total_frames

    sizes = [(await asyncio.to_thread(s.stat)).st_size for s in clips]
    t = time.perf_counter()
    frames = await asyncio.gather(
        *(one(i, s, n) for i, (s, n) in enumerate(zip(clips, sizes, strict=True)))
    )
    return {
        "seconds": time.perf_counter() - t,
        "frames": sum(frames),
        "uploads": uploader.count,
        "bytes": uploader.bytes,
    }


def child(knobs: dict[str, Any], clips: list[Path], temp: Path, workers: int) -> None:
    """Runs inside the child process: one pool run, one JSON line."""
    result = asyncio.run(run_pool(clips, temp, workers, knobs))
    print("RESULT " + json.dumps(result), flush=True)


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    c0, t0 = cpu_children(), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall, cpu = time.perf_counter() - t0, cpu_children() - c0
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    line = next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("RESULT "))
    doc: dict[str, Any] = json.loads(line[7:])
    return {"wall_s": wall, "cpu_s": cpu, **doc}


BEFORE_ROOT: Path | None = None  # --before-root: a checkout whose `ingest` is "before"


def run_variant(variant: str, clips: list[Path], temp: Path, workers: int = 1) -> dict[str, Any]:
    if variant == "darwin":
        script = temp / "darwin_extract.py"
        script.write_text(DARWIN_SCRIPT, encoding="utf-8")
        return timed([str(DARWIN_PY), str(script), str(clips[0]), str(temp)])
    knobs, root = VARIANTS[variant], c.ROOT
    if variant == "before" and BEFORE_ROOT is not None:
        knobs, root = {}, BEFORE_ROOT  # that checkout's own VideoPool with its defaults
    # Run as a script so that `ingest` comes from PYTHONPATH = root, this file from here.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(knobs)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd += ["--workers", str(workers), "--temp", str(temp), *map(str, clips)]
    return timed(cmd, env=env)


def rounds(clip: Path, temp: Path, names: list[str], n: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for r in range(n):
        order = names[r % len(names) :] + names[: r % len(names)]
        for v in order:
            res = run_variant(v, [clip], temp)
            runs[v].append(res)
            print(
                f"round {r + 1} {v:9s} {res['wall_s']:6.1f} s wall {res['cpu_s']:6.1f} s CPU "
                f"{res['frames']} frames  ({c.load_note()})",
                flush=True,
            )
    return runs


def summary(runs: dict[str, list[dict[str, Any]]]) -> None:
    base = runs["darwin"]
    rows: list[list[object]] = []
    for v, rs in runs.items():
        wall = [x["wall_s"] for x in rs]
        cpu = [x["cpu_s"] for x in rs]
        wr = [x["wall_s"] / b["wall_s"] for x, b in zip(rs, base, strict=True)]
        cr = [x["cpu_s"] / b["cpu_s"] for x, b in zip(rs, base, strict=True)]
        rows.append(
            [
                v,
                f"{statistics.median(wall):.1f}",
                f"{statistics.median(cpu):.1f}",
                f"{statistics.median(wr):.2f} ({min(wr):.2f}-{max(wr):.2f})",
                f"{statistics.median(cr):.2f}",
            ]
        )
    print()
    print(
        c.table(
            ["variant", "wall s (median)", "CPU s (median)", "wall ÷ darwin-py", "CPU ÷ darwin-py"],
            rows,
        )
    )


def throughput(clip: Path, temp: Path, n: int, darwin_wall_s: float) -> None:
    clips = []
    for i in range(n):
        dup = temp / f"clip{i}.mp4"
        dup.write_bytes(clip.read_bytes())
        clips.append(dup)
    rows: list[list[object]] = []
    for variant, workers in (("ours", 1), ("ours", 2), ("before", 2)):
        res = run_variant(variant, clips, temp, workers)
        wall = res["wall_s"]
        speedup = n * darwin_wall_s / wall  # darwin-py cuts one video after another
        rows.append([variant, workers, f"{wall:.1f}", f"{res['cpu_s']:.1f}",
                     f"{n * 60 / wall:.1f}", f"{speedup:.2f}"])  # fmt: skip
        print(f"{n} clips, {variant}, workers {workers}: {wall:.1f} s", flush=True)
    print()
    header = ["variant", "workers", "wall s", "CPU s", "clips/min", "vs darwin-py one by one"]
    print(c.table(header, rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--rate", default="30")
    ap.add_argument("--clips", type=int, default=4, help="clips at once for throughput; 0 = skip")
    ap.add_argument("--variants", default="darwin,before,ours,veryfast")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--temp", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "--before-root",
        type=Path,
        help='checkout (e.g. main\'s) whose VideoPool runs as "before" (default: emulated here)',
    )
    a = ap.parse_args(argv)
    if a.child:
        child(json.loads(a.child), a.paths, a.temp, a.workers)
        return 0
    global BEFORE_ROOT
    BEFORE_ROOT = a.before_root
    names = a.variants.split(",")
    if "darwin" not in names:
        names.insert(0, "darwin")
    if not DARWIN_PY.exists():
        print(f"{DARWIN_PY} missing: run `python -m benchmarks.darwin_py --quick` once")
        return 2
    c.WORK.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-video-", dir=c.WORK) as tmp:
        temp = Path(tmp)
        clip = temp / "clip.mp4"
        make_clip(clip, a.seconds, a.size, a.rate)
        print(
            f"clip: {a.seconds} s {a.size} @ {a.rate} fps + audio, "
            f"{clip.stat().st_size / 1e6:.1f} MB, {os.cpu_count()} cores, {a.rounds} rounds",
            flush=True,
        )
        runs = rounds(clip, temp, names, a.rounds)
        summary(runs)
        if a.clips > 0:
            darwin_wall = statistics.median(x["wall_s"] for x in runs["darwin"])
            throughput(clip, temp, a.clips, darwin_wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
