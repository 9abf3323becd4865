"""Video processing: one decode vs darwin-py's multi-pass recipe.

    .venv/bin/python -m benchmarks.video [--seconds 20] [--size 1280x720] [--rate 30]

Generates a clip (testsrc2 + sine) in a temp dir, then times
  (a) one plain decode pass: ``ffmpeg -i clip -f null -``,
  (b) darwin-py's extraction reproduced with plain ffmpeg commands, one after the other as it
      runs them: probe, HLS high, HLS low, HQ PNG dump, LQ JPEG dump, showinfo timestamp pass,
      per-segment ffprobe -count_frames, thumbnail (decode to the middle), audio probe + peaks,
  (c) ``VideoPool.process`` (one ffmpeg process, one decode) uploading into a discarding sink,
and prints seconds and the ratios c/a and b/c.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from ingest.media.video import VideoOptions, VideoPool


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
        self.bytes += (
            len(data) if isinstance(data, bytes) else (await asyncio.to_thread(data.stat)).st_size
        )


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), check=True, capture_output=True, stdin=subprocess.DEVNULL)


def ff(*args: str) -> None:
    run("ffmpeg", "-hide_banner", "-v", "error", "-y", *args)


def make_clip(path: Path, seconds: int, size: str, rate: str) -> None:
    ff(
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate={rate}:duration={seconds}",
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=440:duration={seconds}",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-shortest",
        str(path),
    )


def plain_decode(src: Path) -> float:
    t = time.perf_counter()
    ff("-i", str(src), "-f", "null", "-")
    return time.perf_counter() - t


def darwin_style(src: Path, out: Path, seg: int = 2) -> float:
    """darwin-py's sequence of commands (its defaults: fps 0, PNG, preview frames, audio)."""
    t = time.perf_counter()
    run("ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
        "stream=width,height,avg_frame_rate,duration", "-of", "json", str(src))  # fmt: skip
    for q, crf, vf in (("high", 23, None), ("low", 40, "scale=-2:'if(gt(ih,720),max(ceil(ih/4)*2,720),ih)'")):  # fmt: skip  # noqa: E501
        d = out / "segments" / q
        d.mkdir(parents=True)
        args = ["-i", str(src), "-c:v", "libx264", "-crf", str(crf), "-g", "15", "-f", "hls",
                "-hls_time", str(seg), "-hls_list_size", "0", "-start_number", "0",
                "-hls_segment_filename", str(d / "%09d.ts"), "-fps_mode", "passthrough",
                "-max_muxing_queue_size", "1024"]  # fmt: skip
        if vf:
            args += ["-vf", vf]
        ff(*args, str(d / "index.m3u8"))
    for q, ext, quality in (("high", "png", None), ("low", "jpg", "5")):
        d = out / "sections" / q
        d.mkdir(parents=True)
        args = ["-i", str(src), "-start_number", "0", "-fps_mode", "passthrough", "-f", "image2"]
        if quality:
            args += ["-q", quality]
        ff(*args, str(d / f"%09d.{ext}"))
    info = run("ffmpeg", "-hide_banner", "-v", "info", "-i", str(src), "-fps_mode", "passthrough",
               "-vf", "showinfo", "-f", "null", "-")  # fmt: skip
    total = info.stderr.count(b"pts_time:")
    for segment in sorted((out / "segments" / "high").glob("*.ts")):
        run("ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
            "stream=nb_read_frames", "-of", "json", str(segment))  # fmt: skip
    ff("-i", str(src), "-vf",
       f"select=gte(n\\,{total // 2}),scale=w=356:h=200:force_original_aspect_ratio=decrease",
       "-vframes", "1", str(out / "thumbnail.jpg"))  # fmt: skip
    run("ffprobe", "-v", "error", "-select_streams", "a", "-show_entries", "stream=codec_type",
        "-of", "json", str(src))  # fmt: skip
    ff("-i", str(src), "-map", "0:a:0", "-ac", "1", "-af", "aresample=1000,asetnsamples=1",
       "-f", "u8", str(out / "audio_peaks.raw"))  # fmt: skip
    return time.perf_counter() - t


def single_pass(src: Path, temp: Path) -> tuple[float, NullUploader, dict[str, object]]:
    uploader = NullUploader()
    pool = VideoPool(workers=1, temp_dir=temp)
    size = src.stat().st_size

    async def go() -> dict[str, object]:
        return await pool.process(
            src,
            prefix="bench/item/files/slot",
            file_name=src.name,
            uploader=uploader,
            source_storage_key="bench/clip.mp4",
            size_bytes=size,
            opts=VideoOptions(),
        )

    t = time.perf_counter()
    slot = asyncio.run(go())
    return time.perf_counter() - t, uploader, slot


def cpu_children() -> float:
    """CPU seconds (user + sys) of reaped child processes: less noisy than wall time on a
    shared box."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--rate", default="30")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        root = Path(tmp)
        src = root / "clip.mp4"
        make_clip(src, a.seconds, a.size, a.rate)
        print(f"clip: {a.seconds} s {a.size} @ {a.rate} fps + audio, "
              f"{src.stat().st_size / 1e6:.1f} MB, {os.cpu_count()} cores")  # fmt: skip
        c0 = cpu_children()
        ta = plain_decode(src)
        c1 = cpu_children()
        print(f"(a) plain decode pass          {ta:7.2f} s wall {c1 - c0:7.2f} s CPU")
        (root / "darwin").mkdir()
        tb = darwin_style(src, root / "darwin")
        c2 = cpu_children()
        print(f"(b) darwin-py-style multi-pass {tb:7.2f} s wall {c2 - c1:7.2f} s CPU")
        (root / "ours").mkdir()
        tc, up, slot = single_pass(src, root / "ours")
        c3 = cpu_children()
        print(f"(c) VideoPool single pass      {tc:7.2f} s wall {c3 - c2:7.2f} s CPU  "
              f"({up.count} uploads, {up.bytes / 1e6:.0f} MB, "
              f"{slot['total_frames']} frames)")  # fmt: skip
        print(f"wall: c/a = {tc / ta:.2f}   b/c = {tb / tc:.2f}")
        print(f"CPU:  c/a = {(c3 - c2) / (c1 - c0):.2f}   b/c = {(c2 - c1) / (c3 - c2):.2f}")


if __name__ == "__main__":
    main()
