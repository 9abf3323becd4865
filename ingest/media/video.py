"""Locally processed video: V7's artifact set, its encoders run in parallel processes.

Three ffmpeg processes per video, started together, each decoding the source (decoding is
~4 % of this work; one process feeds all its encoders from one main thread in ffmpeg 5.x, so
its encoders run in lockstep and it used 1.3-1.8 of 2 cores; three processes are scheduled
independently, one video can use every core):

- HLS high: libx264 CRF 23, GOP 15, keyframes forced on segment boundaries;
- HLS low: CRF 40, height max(2*ceil(h/4), 720) when h > 720;
- frames: ``showinfo`` logs every decoded frame's timestamp for the manifest, then ``split``s
  into the HQ frame writer (PNG at zlib level 1 -- lossless, the pixels of ffmpeg's decode --
  or JPEG ``-q:v Q``) and the LQ preview writer (JPEG q 5), both fed only the *visible* frames
  (``select`` with a running counter, exactly the manifest's rule); the thumbnail (the middle
  frame fitted inside 356x200) when the container states its frame count, otherwise a cheap
  seek-based command after the pass; the audio peaks (first audio stream, mono, 1 kHz, u8),
  gzipped afterwards.

``split_encoders=False`` puts all of it in one process (one decode: least CPU, most wall time).
Segment frame counts come from the segments themselves (video PES packets, no decoding).

Artifacts are streamed to the bucket while ffmpeg runs: image2 and HLS write ``*.tmp`` files
and rename them when complete (``-atomic_writing 1`` / ``-hls_flags temp_file``), so every file
under its final name is complete; it is uploaded (bounded concurrency) and deleted. When uploads
fall behind by more than ``max_pending_bytes`` every ffmpeg of the video is paused (SIGSTOP)
until the backlog halves (SIGCONT), so temp disk stays bounded. Playlists, thumbnail, peaks and
the manifest go last. Keys live under a deterministic prefix: a re-run overwrites, it never
orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import math
import mimetypes
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

from ingest.config import X264_PRESETS
from ingest.cpus import available_cpus
from ingest.media import MediaError
from ingest.media.ffmpeg import (
    FFMPEG,
    FrameSequence,
    ProbeInfo,
    VideoSource,
    check_ffmpeg,
    count_packets,
    input_args,
    kill,
    probe,
    run_to_end,
    stderr_reason,
    ts_video_frames,
)
from ingest.model import Rendition, VideoFacts

__all__ = [
    "FrameSequence",
    "ProbeInfo",
    "Uploader",
    "VideoOptions",
    "VideoPool",
    "VideoSource",
    "artifact_prefix",
    "check_ffmpeg",
    "probe",
    "visible_step",
]

HLS_GOP = 15
# darwin-py passes no -preset: libx264's default. Faster presets trade size/quality for time
# (benchmarks/README.md, Video), the CRF and the rendition sizes stay.
DEFAULT_X264_PRESET = "medium"
# PNG is lossless at every zlib level; ffmpeg's default (6) costs ~2x level 1's CPU.
DEFAULT_PNG_COMPRESSION_LEVEL = 1
HQ_CRF = 23
LQ_CRF = 40
LQ_FRAMES_QUALITY = 5
THUMB_W, THUMB_H = 356, 200
LOW_MAX_HEIGHT_RULE = "if(gt(ih,720),max(ceil(ih/4)*2,720),ih)"
POLL_S = 0.05
READER_GRACE_S = 2.0  # stderr left to read once a pass is reaped

CT_TS = "video/mp2t"
CT_M3U8 = "application/vnd.apple.mpegurl"
CT_PNG = "image/png"
CT_JPEG = "image/jpeg"
CT_TEXT = "text/plain"
CT_BINARY = "application/octet-stream"


@dataclass(frozen=True)
class VideoOptions:
    fps: float = 0.0  # 0 = native
    segment_length: int = 2
    extract_preview_frames: bool = True
    primary_frames_quality: int = 1  # 1 = PNG, 2..31 JPEG -q:v


class Uploader(Protocol):
    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None: ...


def artifact_prefix(config_prefix: str, storage_name: str, source_key: str) -> str:
    """``{config prefix}/{item id}/files/{slot id}``, darwin-py's layout, with ids derived from
    the storage configuration name and the source key (not random): the same video always
    lands under the same prefix, so a crash and re-run overwrites instead of orphaning."""
    digest = hashlib.sha256(f"{storage_name}\0{source_key}".encode()).digest()
    item = uuid.UUID(bytes=digest[:16], version=4)
    slot = uuid.UUID(bytes=digest[16:32], version=4)
    parts = [config_prefix.strip("/"), str(item), "files", str(slot)]
    return "/".join(p for p in parts if p)


def check_x264_preset(preset: str) -> None:
    if preset not in X264_PRESETS:
        raise ValueError(f"x264 preset must be one of {', '.join(X264_PRESETS)}")


def check_png_compression_level(level: int) -> None:
    if not 0 <= level <= 9:
        raise ValueError("PNG compression level must be 0..9")


def visible_step(native_fps: float, fps: float) -> float:
    """darwin-py's down-sampling step: max(native/fps, 1) rounded to 4 decimals; 1 = all."""
    if fps <= 0 or native_fps <= 0:
        return 1.0
    return round(max(native_fps / fps, 1.0), 4)


def visible_flags(total: int, step: float) -> list[bool]:
    """Frame n is visible when n == int(k * step) for the next k (the manifest's rule)."""
    flags = [False] * total
    k = 0
    for n in range(total):
        if n == int(k * step):
            flags[n] = True
            k += 1
    return flags


def _select_expr(step: float) -> str:
    # ld(0) = visible frames so far; the same doubles and truncation as visible_flags().
    s = repr(step)
    return f"st(1\\,eq(n\\,trunc(ld(0)*{s})))*0+st(0\\,ld(0)+ld(1))*0+ld(1)"


def _pts_text(pts_time: str) -> str:
    """darwin-py writes ``str(float(showinfo's pts_time))`` (ffmpeg prints %.6g)."""
    return str(float(pts_time))


@dataclass
class _Frames:
    """What showinfo reported: one entry per decoded frame."""

    time_base: Fraction | None = None
    pts: list[int | None] = field(default_factory=list)
    pts_text: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=8))


_SHOWINFO_RE = re.compile(r"\] n:\s*\d+ pts:\s*(\S+) pts_time:(\S+).*? s:(\d+)x(\d+)")
_TB_RE = re.compile(r"\] config in time_base: (\d+)/(\d+)")
_ERR_RE = re.compile(r"error|invalid|corrupt|partial file|truncat|could not|failed", re.I)


def _parse_stderr_line(line: str, frames: _Frames) -> None:
    if "Parsed_showinfo_" in line:
        m = _SHOWINFO_RE.search(line)
        if m:
            pts = m.group(1)
            frames.pts.append(int(pts) if pts.lstrip("-").isdigit() else None)
            text = m.group(2)
            frames.pts_text.append(_pts_text(text) if text != "NOPTS" else "")
            if frames.size is None:
                frames.size = (int(m.group(3)), int(m.group(4)))
            return
        m = _TB_RE.search(line)
        if m and frames.time_base is None and int(m.group(2)):
            frames.time_base = Fraction(int(m.group(1)), int(m.group(2)))
        return
    if _ERR_RE.search(line):
        frames.errors.append(line.strip()[:300])


def _reason(frames: _Frames, default: str) -> str:
    for line in reversed(frames.errors):
        text = line.split("] ", 1)[-1]
        if ": " in text and "/" in text.split(": ", 1)[0]:
            text = text.rsplit(": ", 1)[1]  # drop temp paths
        return text[:200]
    return default


@dataclass
class _Upload:
    path: Path | None
    key: str
    content_type: str
    content_encoding: str | None = None
    data: bytes | None = None
    delete: bool = True
    size: int = 0


class _Streamer:
    """Uploads completed artifacts with bounded concurrency, deleting them afterwards, and
    tracks the backlog (bytes written but not yet uploaded)."""

    def __init__(self, uploader: Uploader, concurrency: int) -> None:
        self._uploader = uploader
        self._queue: asyncio.Queue[_Upload | None] = asyncio.Queue()
        self._workers = [
            asyncio.create_task(self._work(), name="video-upload")
            for _ in range(max(1, concurrency))
        ]
        self.backlog_bytes = 0
        self.peak_backlog_bytes = 0
        self.error: BaseException | None = None
        self.failed = asyncio.Event()
        self.segment_frames: dict[str, int] = {}  # high segment file name -> frames
        self.segment_bytes: dict[str, dict[str, int]] = {"high": {}, "low": {}}
        self.uploaded: list[str] = []

    def put(self, item: _Upload) -> None:
        self.backlog_bytes += item.size
        self.peak_backlog_bytes = max(self.peak_backlog_bytes, self.backlog_bytes)
        self._queue.put_nowait(item)

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if item is not None and self.error is None:
                    await self._one(item)
            except Exception as e:
                if self.error is None:
                    self.error = e
                self.failed.set()
            finally:
                if item is not None:
                    self.backlog_bytes -= item.size
                self._queue.task_done()

    async def _one(self, item: _Upload) -> None:
        payload: bytes | Path
        if item.data is not None:
            payload = item.data
        else:
            assert item.path is not None
            payload = item.path
            if item.content_type == CT_TS and "/segments/high/" in item.key:
                data = await asyncio.to_thread(item.path.read_bytes)
                self.segment_frames[item.path.name] = ts_video_frames(data)
        await self._uploader.upload(item.key, payload, item.content_type, item.content_encoding)
        self.uploaded.append(item.key)
        if item.path is not None and item.delete:
            with contextlib.suppress(FileNotFoundError):
                item.path.unlink()

    async def drain(self) -> None:
        """Wait until everything queued is uploaded; raise the first upload error."""
        join = asyncio.create_task(self._queue.join())
        failed = asyncio.create_task(self.failed.wait())
        try:
            await asyncio.wait({join, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            join.cancel()
            failed.cancel()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


def _content_type(name: str) -> str:
    if name.endswith(".ts"):
        return CT_TS
    if name.endswith(".png"):
        return CT_PNG
    if name.endswith((".jpg", ".jpeg")):
        return CT_JPEG
    if name.endswith(".m3u8"):
        return CT_M3U8
    return CT_BINARY


def _hls_output(
    label: str, crf: int, seg: int, out_dir: Path, tune: _Tuning, audio: bool
) -> list[str]:
    args = ["-map", label]
    if audio:
        args += ["-map", "0:a:0", "-c:a", "aac"]
    args += [
        "-c:v",
        "libx264",
        "-preset",
        tune.x264_preset,
        "-crf",
        str(crf),
        "-g",
        str(HLS_GOP),
        "-force_key_frames",
        f"expr:gte(t,n_forced*{seg})",
        "-threads",
        str(tune.threads),
        "-fps_mode",
        "passthrough",
        "-max_muxing_queue_size",
        "1024",
        "-f",
        "hls",
        "-hls_time",
        str(seg),
        "-hls_list_size",
        "0",
        "-start_number",
        "0",
        "-hls_flags",
        "temp_file",
        "-hls_segment_filename",
        str(out_dir / "%09d.ts"),
        str(out_dir / "index.m3u8"),
    ]
    return args


def _frames_output(label: str, pattern: Path, codec_args: list[str], threads: int) -> list[str]:
    args = ["-map", label, "-fps_mode", "passthrough", "-threads", str(threads), *codec_args]
    return [*args, "-f", "image2", "-atomic_writing", "1", "-start_number", "0", str(pattern)]


@dataclass(frozen=True)
class _Tuning:
    """Engine-side knobs that change speed, never the artifact set or its formats."""

    threads: int
    x264_preset: str
    png_compression_level: int


@dataclass
class _Pass:
    """One ffmpeg process of a video's plan and what its stderr said."""

    name: str
    args: list[str]
    frames: _Frames = field(default_factory=_Frames)


@dataclass
class _Plan:
    passes: list[_Pass]
    dirs: dict[str, Path]  # watched dir name -> local dir ("segments/high", ...)
    thumb_frame: int | None  # middle frame picked in-graph, or None
    thumbnail: Path
    peaks: Path | None
    step: float
    hq_ext: str

    @property
    def timeline(self) -> _Frames:
        """The pass whose showinfo logged every decoded frame (the manifest's source)."""
        return next(p.frames for p in self.passes if "frames" in p.name)


# How a video's outputs are grouped into ffmpeg processes. One process decodes once but
# ffmpeg 5.x feeds every encoder from its one main thread (1.3-1.8 of 2 cores used); three
# processes (each decoding: ~4 % of the CPU of this work) are scheduled independently.
SPLIT_PASSES: tuple[tuple[str, ...], ...] = (("high",), ("low",), ("frames",))
ONE_PASS: tuple[tuple[str, ...], ...] = (("high", "low", "frames"),)


def _build(
    src: VideoSource,
    work: Path,
    info: ProbeInfo,
    opts: VideoOptions,
    tune: _Tuning,
    step: float,
    grouping: tuple[tuple[str, ...], ...] = SPLIT_PASSES,
) -> _Plan:
    dirs = {
        "segments/high": work / "segments" / "high",
        "segments/low": work / "segments" / "low",
        "sections/high": work / "sections" / "high",
    }
    if opts.extract_preview_frames:
        dirs["sections/low"] = work / "sections" / "low"
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    thumb_frame = info.total_frames // 2 if info.total_frames else None
    plan = _Plan(
        passes=[],
        dirs=dirs,
        thumb_frame=thumb_frame,
        thumbnail=work / "thumbnail.jpg",
        peaks=work / "audio_peaks.raw" if info.has_audio else None,
        step=step,
        hq_ext="png" if opts.primary_frames_quality <= 1 else "jpg",
    )
    for want in grouping:
        args = _pass_args(src, want, plan, info, opts, tune)
        plan.passes.append(_Pass("+".join(want), args))
    return plan


def _pass_args(
    src: VideoSource, want: tuple[str, ...], plan: _Plan, info: ProbeInfo, opts: VideoOptions,
    tune: _Tuning,
) -> list[str]:  # fmt: skip
    """One ffmpeg command producing the outputs in ``want`` (high, low, frames) from one
    decode; the ``frames`` process also logs the timeline (showinfo), the thumbnail and the
    audio peaks."""
    even = "pad=ceil(iw/2)*2:ceil(ih/2)*2"
    branches: list[tuple[str, str]] = []
    if "high" in want:
        branches.append(("hq", f"{even},format=yuv420p[vh]"))
    if "low" in want:
        branches.append(("lq", f"scale=-2:'{LOW_MAX_HEIGHT_RULE}',{even},format=yuv420p[vl]"))
    frames = "frames" in want
    if frames:
        sel = f"select='{_select_expr(plan.step)}'," if plan.step > 1 else ""
        if opts.extract_preview_frames:
            branches.append(("fr", f"{sel}split=2[fh][fl]"))
        else:
            branches.append(("fr", f"{sel}null[fh]"))
        if plan.thumb_frame is not None:
            branches.append(
                (
                    "th",
                    f"select='eq(n\\,{plan.thumb_frame})',"
                    # fit inside 356x200, never enlarge (small DICOM frames are common)
                    f"scale=w='min({THUMB_W},iw)':h='min({THUMB_H},ih)'"
                    ":force_original_aspect_ratio=decrease[tn]",
                )
            )
    head = "[0:v:0]" + ("showinfo=checksum=0," if frames else "")
    if len(branches) == 1:
        graph = [head + branches[0][1]]
    else:
        labels = "".join(f"[{label}]" for label, _ in branches)
        graph = [f"{head}split={len(branches)}{labels}"]
        graph += [f"[{label}]{chain}" for label, chain in branches]
    if frames and plan.peaks is not None:
        graph.append("[0:a:0]aresample=1000,asetnsamples=1[pk]")

    t = tune.threads
    args = [
        FFMPEG,
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-y",
        "-v",
        "info",
        "-threads",
        str(t),
        *input_args(src),
        "-filter_complex_threads",
        str(t),
        "-filter_complex",
        ";".join(graph),
    ]
    seg, dirs = opts.segment_length, plan.dirs
    if "high" in want:
        args += _hls_output("[vh]", HQ_CRF, seg, dirs["segments/high"], tune, info.has_audio)
    if "low" in want:
        args += _hls_output("[vl]", LQ_CRF, seg, dirs["segments/low"], tune, info.has_audio)
    if not frames:
        return args
    if plan.hq_ext == "png":
        # Lossless at every level; 1 encodes ~2x faster than zlib's default 6. The "up" filter
        # costs no measurable CPU and makes level 1's frames ~10 % smaller (~5 % above 6's).
        hq_codec = ["-compression_level", str(tune.png_compression_level), "-pred", "up"]
    else:
        hq_codec = ["-q:v", str(opts.primary_frames_quality)]
    args += _frames_output("[fh]", dirs["sections/high"] / f"%09d.{plan.hq_ext}", hq_codec, t)
    if opts.extract_preview_frames:
        lq_codec = ["-q:v", str(LQ_FRAMES_QUALITY)]
        args += _frames_output("[fl]", dirs["sections/low"] / "%09d.jpg", lq_codec, t)
    if plan.thumb_frame is not None:
        args += ["-map", "[tn]", "-fps_mode", "passthrough", "-update", "1"]
        args += ["-f", "image2", str(plan.thumbnail)]
    if plan.peaks is not None:
        args += ["-map", "[pk]", "-ac", "1", "-f", "u8", str(plan.peaks)]
    return args


def _extinf(index: str) -> list[float]:
    out = []
    for line in index.splitlines():
        if line.startswith("#EXTINF:"):
            with contextlib.suppress(ValueError):
                out.append(float(line[8:].split(",")[0]))
    return out


def _segment_names(index: str) -> list[str]:
    return [ln.strip() for ln in index.splitlines() if ln.strip() and not ln.startswith("#")]


def _rewrite_index(index: str, key_prefix: str) -> str:
    """Segment lines -> full storage keys (darwin-py's rewrite of ``*.ts`` lines)."""
    return re.sub(
        r"^(.*\.ts)$",
        lambda m: f"{key_prefix}/{m.group(1).rsplit('/', 1)[-1]}",
        index,
        flags=re.MULTILINE,
    )


def _bitrate(index: str, sizes: dict[str, int]) -> float:
    """Mean over segments of bytes*8 / EXTINF seconds."""
    rates = [
        sizes[name] * 8 / d
        for d, name in zip(_extinf(index), _segment_names(index), strict=False)
        if d > 0 and name.rsplit("/", 1)[-1] in sizes
    ]
    return sum(rates) / len(rates) if rates else 0.0


def _segment_counts_from_timing(frames: _Frames, index: str, total: int) -> list[int]:
    """Fallback: assign frames to segments by their timestamps against EXTINF boundaries."""
    durations = _extinf(index)
    tb = frames.time_base
    if not durations or tb is None or not frames.pts or frames.pts[0] is None:
        return [total]
    first = frames.pts[0]
    bounds = list(_cumsum(durations))
    counts = [0] * len(durations)
    j = 0
    for p in frames.pts:
        t = float((p - first) * tb) if p is not None else 0.0
        while j < len(bounds) - 1 and t >= bounds[j] - 1e-4:
            j += 1
        counts[j] += 1
    return counts


def _cumsum(values: list[float]) -> list[float]:
    acc, out = 0.0, []
    for v in values:
        acc += v
        out.append(acc)
    return out


def manifest_lines(pts_text: list[str], segment_counts: list[int], step: float) -> list[str]:
    """``FRAME_IN_SEGMENT:SEGMENT:VISIBLE:PTS_SECONDS`` per decoded frame."""
    flags = visible_flags(len(pts_text), step)
    lines = []
    seg, in_seg = 0, 0
    for n, text in enumerate(pts_text):
        while seg < len(segment_counts) - 1 and in_seg >= segment_counts[seg]:
            seg += 1
            in_seg = 0
        lines.append(f"{in_seg}:{seg}:{1 if flags[n] else 0}:{text}")
        in_seg += 1
    return lines


def _signal_all(procs: list[asyncio.subprocess.Process], sig: int) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)


def default_workers() -> int:
    return max(1, available_cpus() // 2)


class VideoPool:
    """Processes at most ``workers`` videos at a time; each runs ``len(grouping)`` ffmpeg
    processes at once (three by default: HLS high, HLS low, frames) of ``threads`` each."""

    def __init__(
        self,
        workers: int = 0,
        threads_per_worker: int = 0,
        time_limit_s: float = 3600,
        upload_concurrency: int = 8,
        temp_dir: Path | None = None,
        max_pending_bytes: int = 512 * 1024 * 1024,
        on_pause: Callable[[], None] | None = None,
        x264_preset: str = DEFAULT_X264_PRESET,
        png_compression_level: int = DEFAULT_PNG_COMPRESSION_LEVEL,
        split_encoders: bool = True,
    ) -> None:
        cores = available_cpus()
        self.workers = workers if workers > 0 else default_workers()
        self.threads = (
            threads_per_worker if threads_per_worker > 0 else max(1, cores // self.workers)
        )
        check_x264_preset(x264_preset)
        check_png_compression_level(png_compression_level)
        self.tuning = _Tuning(self.threads, x264_preset, png_compression_level)
        self.grouping = SPLIT_PASSES if split_encoders else ONE_PASS
        self.time_limit_s = time_limit_s
        self.upload_concurrency = max(1, upload_concurrency)
        self.temp_dir = temp_dir
        self.max_pending_bytes = max(1, max_pending_bytes)
        self.on_pause = on_pause
        self.pauses = 0
        self._slots = asyncio.Semaphore(self.workers)
        self.last_stats: dict[str, Any] = {}

    async def process(
        self,
        src: VideoSource,
        *,
        prefix: str,
        file_name: str,
        uploader: Uploader,
        source_storage_key: str | None,
        size_bytes: int,
        opts: VideoOptions,
    ) -> VideoFacts:
        """Cut one video, stream its artifacts to ``{prefix}/...`` and return its facts.

        ``src`` is a local video file or a ``FrameSequence`` (numbered images, e.g. converted
        DICOM frames); a sequence is not a file to upload, so it needs ``source_storage_key``.
        """
        if isinstance(src, FrameSequence) and source_storage_key is None:
            raise ValueError("a FrameSequence source needs source_storage_key")
        if not 1 <= opts.primary_frames_quality <= 31:
            raise ValueError("primary_frames_quality must be 1 (PNG) or 2..31 (JPEG)")
        if opts.segment_length < 1:
            raise ValueError("segment_length must be >= 1")
        prefix = prefix.strip("/")
        async with self._slots:
            try:
                async with asyncio.timeout(self.time_limit_s):
                    return await self._process(
                        src, prefix, file_name, uploader, source_storage_key, size_bytes, opts
                    )
            except TimeoutError:
                raise MediaError(
                    f"time limit: video processing took longer than {self.time_limit_s:g} s",
                    final=False,
                ) from None

    async def _process(
        self,
        src: VideoSource,
        prefix: str,
        file_name: str,
        uploader: Uploader,
        source_storage_key: str | None,
        size_bytes: int,
        opts: VideoOptions,
    ) -> VideoFacts:
        started = time.monotonic()
        info = await probe(src)
        native_fps = info.native_fps
        if native_fps <= 0:
            # darwin-py: frames / duration, rounded to 2 decimals, when there is no avg rate.
            count = await count_packets(src)
            native_fps = round(count / info.duration_s, 2) if info.duration_s > 0 else 0.0
        step = visible_step(native_fps, opts.fps)
        work = Path(tempfile.mkdtemp(prefix="ingest-video-", dir=self.temp_dir))
        streamer = _Streamer(uploader, self.upload_concurrency)
        try:
            if source_storage_key is None:
                assert isinstance(src, Path)
                ctype = mimetypes.guess_type(file_name)[0] or CT_BINARY
                streamer.put(_Upload(src, f"{prefix}/{file_name}", ctype, delete=False))
            plan = _build(src, work, info, opts, self.tuning, step, self.grouping)
            frames = await self._run(plan, work, prefix, streamer)
            facts = await self._finish(
                src, plan, frames, info, native_fps, work, prefix, file_name, streamer, opts
            )
            facts = replace(
                facts,
                storage_key=source_storage_key or f"{prefix}/{file_name}",
                size_bytes=size_bytes,
            )
            self.last_stats = {
                "seconds": time.monotonic() - started,
                "peak_backlog_bytes": streamer.peak_backlog_bytes,
                "uploads": len(streamer.uploaded),
            }
            return facts
        finally:
            await streamer.close()
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _run(self, plan: _Plan, work: Path, prefix: str, streamer: _Streamer) -> _Frames:
        """Run the plan's ffmpeg processes at once, streaming what they complete; every one
        is killed and reaped on error, time limit or cancellation."""
        procs: list[asyncio.subprocess.Process] = []
        readers: list[asyncio.Task[None]] = []
        seen: set[str] = set()
        paused = False
        try:
            for p in plan.passes:
                proc = await asyncio.create_subprocess_exec(
                    *p.args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                procs.append(proc)
                assert proc.stderr is not None
                readers.append(
                    asyncio.create_task(self._read_stderr(proc.stderr, p.frames), name=p.name)
                )
            waiters = {asyncio.ensure_future(proc.wait()) for proc in procs}
            while waiters:
                _, waiters = await asyncio.wait(waiters, timeout=POLL_S)
                streamer.raise_error()
                self._scan(plan, prefix, streamer, seen)
                if any(proc.returncode not in (None, 0) for proc in procs):
                    break  # one failed: the others' work is wasted, stop them now
                if not paused and streamer.backlog_bytes > self.max_pending_bytes:
                    _signal_all(procs, signal.SIGSTOP)
                    paused = True
                    self.pauses += 1
                    if self.on_pause is not None:
                        self.on_pause()
                elif paused and streamer.backlog_bytes <= self.max_pending_bytes // 2:
                    _signal_all(procs, signal.SIGCONT)
                    paused = False
            for w in waiters:
                w.cancel()
            if not waiters:
                await asyncio.gather(*readers)
        finally:
            try:
                await asyncio.gather(*(kill(proc) for proc in procs), return_exceptions=True)
                if readers:  # reaped processes: their stderr ends now; keep the failure's reason
                    await asyncio.wait(readers, timeout=READER_GRACE_S)
            finally:
                for r in readers:
                    r.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
        # The process that failed by itself, not one we killed because of it.
        failed = sorted(
            (rc < 0, p.name, rc, p)
            for p, rc in zip(plan.passes, (q.returncode for q in procs), strict=True)
            if rc is not None and rc != 0
        )
        if failed:
            _, _, rc, p = failed[0]
            raise MediaError(f"ffmpeg failed: {_reason(p.frames, f'exit {rc}')}")
        frames = plan.timeline
        if not frames.pts_text:
            raise MediaError(f"no decodable video frames: {_reason(frames, 'empty stream')}")
        errors = [e for p in plan.passes for e in p.frames.errors]
        if any("partial file" in e or "truncat" in e.lower() for e in errors):
            raise MediaError("truncated file: the video stream ends early")
        self._scan(plan, prefix, streamer, seen)
        return frames

    @staticmethod
    async def _read_stderr(stream: asyncio.StreamReader, frames: _Frames) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the buffer: skip it
                await stream.read(1 << 16)
                continue
            if not raw:
                return
            _parse_stderr_line(raw.decode("utf-8", "replace"), frames)

    @staticmethod
    def _scan(plan: _Plan, prefix: str, streamer: _Streamer, seen: set[str]) -> None:
        """Queue every complete frame/segment (final name, not ``*.tmp``) for upload."""
        for rel, d in plan.dirs.items():
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for e in entries:
                name = e.name
                if name.endswith(".tmp") or name.endswith(".m3u8"):
                    continue
                key = f"{prefix}/{rel}/{name}"
                if key in seen:
                    continue
                seen.add(key)
                try:
                    size = e.stat().st_size
                except FileNotFoundError:
                    continue
                if rel.startswith("segments/"):
                    streamer.segment_bytes[rel.split("/")[1]][name] = size
                streamer.put(_Upload(Path(e.path), key, _content_type(name), size=size))

    async def _finish(
        self,
        src: VideoSource,
        plan: _Plan,
        frames: _Frames,
        info: ProbeInfo,
        native_fps: float,
        work: Path,
        prefix: str,
        file_name: str,
        streamer: _Streamer,
        opts: VideoOptions,
    ) -> VideoFacts:
        total = len(frames.pts_text)
        flags = visible_flags(total, plan.step)
        visible = sum(flags)
        # Thumbnail: in-graph when the container's frame count was right, else one seek.
        if plan.thumb_frame != total // 2 or not await asyncio.to_thread(plan.thumbnail.exists):
            await self._seek_thumbnail(src, frames, total // 2, plan.thumbnail)
        peaks_gz: bytes | None = None
        if plan.peaks is not None and await asyncio.to_thread(plan.peaks.exists):
            raw = await asyncio.to_thread(plan.peaks.read_bytes)
            peaks_gz = await asyncio.to_thread(gzip.compress, raw, 9, mtime=0)
        await streamer.drain()

        indexes = {}
        for q in ("high", "low"):
            path = plan.dirs[f"segments/{q}"] / "index.m3u8"
            try:
                indexes[q] = await asyncio.to_thread(path.read_text)
            except FileNotFoundError:
                raise MediaError("ffmpeg wrote no HLS playlist") from None
        names = _segment_names(indexes["high"])
        counts = [streamer.segment_frames.get(n.rsplit("/", 1)[-1], -1) for n in names]
        if sum(counts) != total or min(counts, default=-1) < 0:
            counts = _segment_counts_from_timing(frames, indexes["high"], total)
        hq_written = sum(1 for k in streamer.uploaded if k.startswith(f"{prefix}/sections/high/"))
        if hq_written != visible:
            raise MediaError(
                f"frame extraction mismatch: {hq_written} frames written, {visible} visible"
            )
        manifest = "\n".join(manifest_lines(frames.pts_text, counts, plan.step))

        # Small artifacts last: thumbnail, peaks, playlists, then the manifest.
        if await asyncio.to_thread(plan.thumbnail.exists):
            streamer.put(_Upload(plan.thumbnail, f"{prefix}/thumbnail.jpg", CT_JPEG))
        else:
            raise MediaError("could not extract a thumbnail frame")
        if peaks_gz is not None:
            streamer.put(
                _Upload(None, f"{prefix}/audio_peaks.gz", CT_BINARY, "gzip", data=peaks_gz)
            )
        for q in ("high", "low"):
            streamer.put(
                _Upload(
                    plan.dirs[f"segments/{q}"] / "index.m3u8",
                    f"{prefix}/segments/{q}/index.m3u8",
                    CT_M3U8,
                )
            )
        await streamer.drain()
        streamer.put(
            _Upload(None, f"{prefix}/frames_manifest.txt", CT_TEXT, data=manifest.encode())
        )
        await streamer.drain()

        width, height = frames.size or (info.width, info.height)
        return VideoFacts(
            storage_key="",
            width=width,
            height=height,
            native_fps=native_fps,
            visible_frames=visible,
            total_frames=total,
            high=Rendition(
                _rewrite_index(indexes["high"], f"{prefix}/segments/high"),
                _bitrate(indexes["high"], streamer.segment_bytes["high"]),
            ),
            low=Rendition(
                _rewrite_index(indexes["low"], f"{prefix}/segments/low"),
                _bitrate(indexes["low"], streamer.segment_bytes["low"]),
            ),
            sections_prefix=f"{prefix}/sections/high",
            sections_extension=plan.hq_ext,
            frames_manifest_key=f"{prefix}/frames_manifest.txt",
            thumbnail_key=f"{prefix}/thumbnail.jpg",
            size_bytes=0,
            low_sections_prefix=f"{prefix}/sections/low" if opts.extract_preview_frames else "",
            audio_peaks_key=f"{prefix}/audio_peaks.gz" if peaks_gz is not None else "",
        )

    async def _seek_thumbnail(self, src: VideoSource, frames: _Frames, n: int, out: Path) -> None:
        """Decode from the keyframe before frame ``n`` only, then fit it inside 356x200."""
        await asyncio.to_thread(out.unlink, True)
        seek: list[str] = []
        tb = frames.time_base
        if tb is not None and n < len(frames.pts) and frames.pts[n] is not None:
            p = frames.pts[n]
            assert p is not None
            t = max(float(p * tb) - 0.0005, 0.0)
            if t > 0:
                seek = ["-ss", f"{t:.6f}"]
        args = [
            FFMPEG,
            "-hide_banner",
            "-nostdin",
            "-v",
            "error",
            "-threads",
            str(self.threads),
            *seek,
            *input_args(src),
            "-map",
            "0:v:0",
            "-vf",
            f"scale=w='min({THUMB_W},iw)':h='min({THUMB_H},ih)'"
            ":force_original_aspect_ratio=decrease",
            "-frames:v",
            "1",
            "-update",
            "1",
            "-y",
            str(out),
        ]
        code, _, err = await run_to_end(*args)
        if code != 0 or not await asyncio.to_thread(out.exists):
            reason = stderr_reason(err, "no frame")
            raise MediaError(f"could not extract a thumbnail frame: {reason}")


def low_rendition_height(h: int) -> int:
    """V7's low rendition height: max(2*ceil(h/4), 720) when h > 720, else unchanged."""
    return max(2 * math.ceil(h / 4), 720) if h > 720 else h
