"""Thin async helpers around the ffmpeg / ffprobe binaries: version check, probe, process
control, and a tiny MPEG-TS reader that counts the frames of an HLS segment without decoding.

Every subprocess goes through ``asyncio.create_subprocess_exec`` (no shell).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ingest.errors import PreflightError
from ingest.media import MediaError

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
MIN_MAJOR = 5

_VERSION_RE = re.compile(r"version\s+n?(\d+)\.?(\d*)")


async def run_to_end(*args: str, timeout_s: float | None = None) -> tuple[int, bytes, bytes]:
    """Run a command to completion (killed on timeout or cancellation): exit code, stdout,
    stderr."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        await kill(proc)
    return proc.returncode or 0, out, err


async def kill(proc: asyncio.subprocess.Process) -> None:
    """Kill a process if still running and reap it (also works on a SIGSTOPped process)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
    # Reap even when the caller is being cancelled: never leave a zombie or a live ffmpeg.
    waiter = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.shield(waiter)
    except asyncio.CancelledError:
        await waiter
        raise


async def check_ffmpeg() -> str:
    """The ffmpeg version string (e.g. ``"5.1.9"``); PreflightError when ffmpeg or ffprobe is
    missing or older than 5."""
    version = ""
    for tool in (FFMPEG, FFPROBE):
        try:
            rc, out, _ = await run_to_end(tool, "-hide_banner", "-version", timeout_s=30)
        except FileNotFoundError:
            raise PreflightError(
                f"{tool} not found on PATH: install ffmpeg {MIN_MAJOR} or newer "
                "(e.g. apt-get install ffmpeg)"
            ) from None
        except PermissionError:
            raise PreflightError(f"{tool} on PATH is not executable") from None
        first = out.decode("utf-8", "replace").splitlines()[0] if out else ""
        m = _VERSION_RE.search(first)
        if rc != 0 or m is None:
            raise PreflightError(f"{tool} -version failed or is unreadable: {first[:80]!r}")
        major = int(m.group(1))
        if major < MIN_MAJOR:
            raise PreflightError(
                f"{tool} {major}.x found, local video processing needs {MIN_MAJOR} or newer"
            )
        if tool == FFMPEG:
            version = first.split()[2] if len(first.split()) > 2 else m.group(0)
    return version


@dataclass(frozen=True)
class FrameSequence:
    """Numbered still images as a video source (e.g. DICOM frames written as PNG): read by
    ffmpeg's image2 demuxer at ``frame_rate``, numbered from ``start_number``."""

    pattern: Path  # printf-style, e.g. frames/%09d.png
    frame_rate: Fraction
    start_number: int = 0

    @property
    def first(self) -> Path:
        return Path(str(self.pattern) % self.start_number)


VideoSource = Path | FrameSequence  # what the video pipeline cuts


def input_args(src: VideoSource) -> list[str]:
    """ffmpeg / ffprobe input options for ``src`` (ending with ``-i <input>``)."""
    if isinstance(src, FrameSequence):
        rate, start = str(src.frame_rate), str(src.start_number)
        return ["-f", "image2", "-framerate", rate, "-start_number", start, "-i", str(src.pattern)]
    return ["-i", str(src)]


@dataclass(frozen=True)
class ProbeInfo:
    """What ffprobe says about the first video stream (dimensions as displayed, i.e. after the
    rotation ffmpeg applies when decoding)."""

    width: int
    height: int
    native_fps: float  # avg_frame_rate as a fraction, unrounded; 0.0 when unknown
    avg_frame_rate: str
    total_frames: int | None  # container's nb_frames when it states one
    duration_s: float
    has_audio: bool
    codec: str
    pix_fmt: str
    rotation: int = 0


def _fraction(text: str | None) -> Fraction | None:
    if not text:
        return None
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _rotation(stream: dict[str, Any]) -> int:
    for sd in stream.get("side_data_list") or []:
        if "rotation" in sd:
            with contextlib.suppress(TypeError, ValueError):
                return int(float(sd["rotation"])) % 360
    tags = stream.get("tags") or {}
    with contextlib.suppress(TypeError, ValueError):
        return int(float(tags.get("rotate", 0))) % 360
    return 0


def stderr_reason(err: bytes, default: str) -> str:
    """A short, report-friendly reason from ffmpeg/ffprobe stderr."""
    lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return default
    text = lines[-1]
    # "path: Invalid data found when processing input" -> drop the (temp) path.
    if ": " in text:
        text = text.rsplit(": ", 1)[1]
    return text[:200]


async def probe(path: VideoSource) -> ProbeInfo:
    """Probe ``path``. MediaError for a zero-byte / corrupt file or one without a video stream."""
    first = path.first if isinstance(path, FrameSequence) else path
    try:
        size = (await asyncio.to_thread(first.stat)).st_size
    except OSError as e:
        raise MediaError(f"cannot read the video file: {e.strerror}") from None
    if size == 0:
        raise MediaError("empty file (0 bytes)")
    rc, out, err = await run_to_end(
        FFPROBE,
        "-v",
        "error",
        "-show_streams",
        "-show_format",
        "-of",
        "json",
        *input_args(path),
        timeout_s=120,
    )
    if rc != 0:
        raise MediaError(f"not a readable video: {stderr_reason(err, 'ffprobe failed')}")
    try:
        data = json.loads(out)
    except ValueError:
        raise MediaError("not a readable video: ffprobe output unreadable") from None
    streams: list[dict[str, Any]] = data.get("streams") or []
    video = [
        s
        for s in streams
        if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
    ]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not video:
        raise MediaError("no video stream (audio only)" if audio else "no video stream")
    v = video[0]
    width, height = int(v.get("width") or 0), int(v.get("height") or 0)
    if width <= 0 or height <= 0:
        raise MediaError("video stream has no dimensions (corrupt or unsupported codec)")
    rotation = _rotation(v)
    if rotation in (90, 270):
        width, height = height, width
    fps = _fraction(v.get("avg_frame_rate"))
    nb = v.get("nb_frames")
    total = int(nb) if isinstance(nb, str) and nb.isdigit() and int(nb) > 0 else None
    duration = 0.0
    for d in (v.get("duration"), (data.get("format") or {}).get("duration")):
        with contextlib.suppress(TypeError, ValueError):
            duration = float(str(d))
            if duration > 0:
                break
    return ProbeInfo(
        width=width,
        height=height,
        native_fps=float(fps) if fps else 0.0,
        avg_frame_rate=str(v.get("avg_frame_rate") or ""),
        total_frames=total,
        duration_s=max(duration, 0.0),
        has_audio=bool(audio),
        codec=str(v.get("codec_name") or ""),
        pix_fmt=str(v.get("pix_fmt") or ""),
        rotation=rotation,
    )


async def count_packets(path: VideoSource) -> int:
    """Video packets in the file (demux only, no decode): darwin-py's frame-count fallback for
    streams without an average frame rate."""
    rc, out, err = await run_to_end(
        FFPROBE,
        "-v",
        "error",
        "-select_streams",
        "v:0",
        "-count_packets",
        "-show_entries",
        "stream=nb_read_packets",
        "-of",
        "json",
        *input_args(path),
        timeout_s=600,
    )
    if rc != 0:
        raise MediaError(f"not a readable video: {stderr_reason(err, 'ffprobe failed')}")
    try:
        return int(json.loads(out)["streams"][0]["nb_read_packets"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise MediaError("cannot count the video frames") from None


# --- MPEG-TS ------------------------------------------------------------------------------

_TS = 188
_H26X_STREAM_TYPES = {0x1B, 0x24, 0x10, 0x02, 0x01}  # H.264, HEVC, MPEG-4, MPEG-2, MPEG-1


def ts_video_frames(data: bytes) -> int:
    """Frames in an MPEG-TS segment written by ffmpeg: one PES packet per video frame, so the
    count of payload-unit-start packets on the video PID. Demux only, no decode."""
    video_pid: int | None = None
    pmt_pids: set[int] = set()
    frames = 0
    view = memoryview(data)
    for off in range(0, len(data) - _TS + 1, _TS):
        if view[off] != 0x47:
            continue
        b1, b2, b3 = view[off + 1], view[off + 2], view[off + 3]
        pusi = b1 & 0x40
        pid = ((b1 & 0x1F) << 8) | b2
        if video_pid is not None:
            if pid == video_pid and pusi:
                frames += 1
            continue
        if not pusi or not (b3 & 0x10):
            continue
        start = off + 4
        if b3 & 0x20:  # adaptation field
            start += 1 + view[start]
        if pid == 0:
            start += 1 + view[start]  # pointer field
            section_len = ((view[start + 1] & 0x0F) << 8) | view[start + 2]
            end = min(start + 3 + section_len - 4, off + _TS)
            i = start + 8
            while i + 4 <= end:
                program = (view[i] << 8) | view[i + 1]
                if program != 0:
                    pmt_pids.add(((view[i + 2] & 0x1F) << 8) | view[i + 3])
                i += 4
        elif pid in pmt_pids:
            start += 1 + view[start]
            section_len = ((view[start + 1] & 0x0F) << 8) | view[start + 2]
            end = min(start + 3 + section_len - 4, off + _TS)
            info_len = ((view[start + 10] & 0x0F) << 8) | view[start + 11]
            i = start + 12 + info_len
            while i + 5 <= end:
                stype = view[i]
                epid = ((view[i + 1] & 0x1F) << 8) | view[i + 2]
                es_len = ((view[i + 3] & 0x0F) << 8) | view[i + 4]
                if stype in _H26X_STREAM_TYPES and video_pid is None:
                    video_pid = epid
                i += 5 + es_len
    return frames
