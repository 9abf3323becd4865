"""Local video processing with the real ffmpeg on clips generated here.

The only test double is the Uploader (an in-memory bucket): ffmpeg itself is never mocked.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
from PIL import Image, ImageChops

from ingest.errors import PreflightError
from ingest.media import MediaError
from ingest.media.video import (
    FrameSequence,
    ProbeInfo,
    VideoOptions,
    VideoPool,
    artifact_prefix,
    check_ffmpeg,
    low_rendition_height,
    probe,
    visible_flags,
    visible_step,
)
from ingest.model import Item, ItemType, ObjectInfo, Slot, VideoFacts
from ingest.registrar import wire

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

PREFIX = "thumbs/1111/files/2222"


@dataclass
class Obj:
    data: bytes
    content_type: str
    content_encoding: str | None


@dataclass
class MemoryBucket:
    """Uploader test double: records keys, content types, encodings and bytes."""

    objects: dict[str, Obj] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    first_upload: asyncio.Event | None = None
    gate: asyncio.Event | None = None

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None:
        if self.first_upload is not None:
            self.first_upload.set()
        if self.gate is not None:
            await self.gate.wait()
        body = data if isinstance(data, bytes) else await asyncio.to_thread(data.read_bytes)
        self.objects[key] = Obj(body, content_type, content_encoding)
        self.order.append(key)

    def keys(self, under: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(under))


def ffmpeg(*args: str) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-v", "error", "-y", *args],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def make_clip(
    path: Path,
    *,
    size: str = "320x240",
    rate: str = "30",
    duration: float = 5,
    audio: bool = True,
    extra: tuple[str, ...] = (),
    pattern: str = "testsrc2",
) -> Path:
    args = ["-f", "lavfi", "-i", f"{pattern}=size={size}:rate={rate}:duration={duration}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={duration}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", *extra]
    if audio:
        args += ["-c:a", "aac", "-shortest"]
    ffmpeg(*args, str(path))
    return path


def wire_slot(facts: VideoFacts, file_name: str) -> dict[str, Any]:
    """The slot V7 is sent for these facts (what the pool used to return as a dict)."""
    obj = ObjectInfo(f"src/{file_name}", facts.size_bytes)
    slot = Slot(file_name, ItemType.VIDEO, (obj,), file_name, facts=(facts,))
    (out,) = wire.item_json(Item("/", file_name, (slot,)), wire.KeyMap())["slots"]
    assert isinstance(out, dict)
    return out


def process(
    src: Path,
    opts: VideoOptions | None = None,
    *,
    bucket: MemoryBucket | None = None,
    pool: VideoPool | None = None,
    source_storage_key: str | None = "src/clip.mp4",
) -> tuple[dict[str, Any], MemoryBucket]:
    """Cut ``src``; return its wire slot and the bucket it was streamed to."""
    bucket = bucket or MemoryBucket()
    pool = pool or VideoPool(workers=1)
    size = src.stat().st_size

    async def go() -> VideoFacts:
        return await pool.process(
            src,
            prefix=PREFIX,
            file_name=src.name,
            uploader=bucket,
            source_storage_key=source_storage_key,
            size_bytes=size,
            opts=opts or VideoOptions(),
        )

    facts = asyncio.run(go())
    assert isinstance(facts, VideoFacts)
    assert facts.size_bytes == size
    return wire_slot(facts, src.name), bucket


def manifest(bucket: MemoryBucket) -> list[str]:
    return bucket.objects[f"{PREFIX}/frames_manifest.txt"].data.decode().split("\n")


def ffprobe_json(path: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", *args, "-of", "json", str(path)],
        check=True,
        capture_output=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def ffmpeg_children() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.name().startswith("ffmpeg") and p.status() != psutil.STATUS_ZOMBIE
    ]


# --- clips (generated once per module) ------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    base = make_clip(d / "clip.mp4", extra=("-pix_fmt", "yuv420p"))
    ntsc = make_clip(d / "ntsc.mp4", size="160x120", rate="30000/1001", duration=3, audio=False)
    # Odd size, portrait, taller than 720 (testsrc: testsrc2 rounds sizes to even; yuv444p so
    # that x264 accepts the odd size).
    odd = make_clip(
        d / "odd.mkv", size="481x853", rate="10", duration=1, audio=False,
        extra=("-pix_fmt", "yuv444p"), pattern="testsrc",
    )  # fmt: skip
    vfr = make_clip(
        d / "vfr.mkv",
        size="160x120",
        duration=2,
        audio=False,
        extra=("-vf", "select='lt(mod(n\\,3)\\,2)'", "-fps_mode", "vfr"),
    )
    return {"base": base, "ntsc": ntsc, "odd": odd, "vfr": vfr}


@pytest.fixture(scope="module")
def default_run(clips: dict[str, Path]) -> tuple[dict[str, Any], MemoryBucket]:
    # source_storage_key=None: the source itself is uploaded next to the artifacts.
    return process(clips["base"], source_storage_key=None)


@pytest.fixture(scope="module")
def reduced_run(clips: dict[str, Path]) -> tuple[dict[str, Any], MemoryBucket]:
    opts = VideoOptions(fps=15, primary_frames_quality=5, extract_preview_frames=False)
    return process(clips["base"], opts)


# --- the default run: 5 s, 30 fps, 2 s segments ---------------------------------------------


def test_manifest_lines_match_darwin_py(default_run: tuple[dict[str, Any], MemoryBucket]) -> None:
    slot, bucket = default_run
    lines = manifest(bucket)
    assert len(lines) == 150
    assert not bucket.objects[f"{PREFIX}/frames_manifest.txt"].data.endswith(b"\n")
    for i, line in enumerate(lines):
        in_seg, seg, vis, pts = line.split(":")
        assert (int(in_seg), int(seg), int(vis)) == (i % 60, i // 60, 1)
        # darwin-py: str(float(showinfo pts_time)), ffmpeg prints %.6g
        assert pts == str(float(f"{i / 30:.6g}"))
    assert lines[0] == "0:0:1:0.0" and lines[1] == "1:0:1:0.0333333"
    assert slot["total_frames"] == slot["visible_frames"] == 150


def test_artifacts_keys_and_content_types(
    default_run: tuple[dict[str, Any], MemoryBucket],
) -> None:
    slot, bucket = default_run
    hq = bucket.keys(f"{PREFIX}/sections/high/")
    lq = bucket.keys(f"{PREFIX}/sections/low/")
    assert hq == [f"{PREFIX}/sections/high/{i:09d}.png" for i in range(150)]
    assert lq == [f"{PREFIX}/sections/low/{i:09d}.jpg" for i in range(150)]
    for q in ("high", "low"):
        segs = bucket.keys(f"{PREFIX}/segments/{q}/")
        assert segs == [f"{PREFIX}/segments/{q}/{i:09d}.ts" for i in range(3)] + [
            f"{PREFIX}/segments/{q}/index.m3u8"
        ]
        assert bucket.objects[segs[0]].content_type == "video/mp2t"
        assert bucket.objects[segs[-1]].content_type == "application/vnd.apple.mpegurl"
    assert bucket.objects[hq[0]].content_type == "image/png"
    assert bucket.objects[lq[0]].content_type == "image/jpeg"
    assert bucket.objects[hq[0]].data.startswith(b"\x89PNG")
    assert bucket.objects[f"{PREFIX}/frames_manifest.txt"].content_type == "text/plain"
    thumb = bucket.objects[f"{PREFIX}/thumbnail.jpg"]
    assert thumb.content_type == "image/jpeg"
    with Image.open(io.BytesIO(thumb.data)) as im:
        assert im.size == (267, 200)  # 320x240 fitted inside 356x200
    # The source was uploaded because it was not in the bucket yet.
    assert slot["storage_key"] == f"{PREFIX}/clip.mp4"
    assert bucket.objects[f"{PREFIX}/clip.mp4"].content_type == "video/mp4"
    # Playlists and the manifest go last.
    tail = bucket.order[-4:]
    assert tail[-1] == f"{PREFIX}/frames_manifest.txt"
    assert {f"{PREFIX}/segments/high/index.m3u8", f"{PREFIX}/segments/low/index.m3u8"} <= set(tail)


def test_slot_payload(default_run: tuple[dict[str, Any], MemoryBucket]) -> None:
    slot, bucket = default_run
    assert list(slot) == [  # V7's ReadOnlyVideoSlot, as the pool used to build it
        "slot_name",
        "file_name",
        "type",
        "storage_key",
        "width",
        "height",
        "native_fps",
        "visible_frames",
        "total_frames",
        "hls_segments",
        "storage_sections_key_prefix",
        "storage_sections_key_extension",
        "storage_frames_manifest_key",
        "storage_thumbnail_key",
        "storage_low_quality_sections_key_prefix",
        "storage_audio_peaks_key",
        "size_bytes",
    ]
    assert slot["type"] == "video"
    assert slot["slot_name"] == slot["file_name"] == "clip.mp4"
    assert (slot["width"], slot["height"], slot["native_fps"]) == (320, 240, 30.0)
    assert slot["storage_sections_key_prefix"] == f"{PREFIX}/sections/high"
    assert slot["storage_sections_key_extension"] == "png"
    assert slot["storage_low_quality_sections_key_prefix"] == f"{PREFIX}/sections/low"
    assert slot["storage_frames_manifest_key"] == f"{PREFIX}/frames_manifest.txt"
    assert slot["storage_thumbnail_key"] == f"{PREFIX}/thumbnail.jpg"
    assert slot["storage_audio_peaks_key"] == f"{PREFIX}/audio_peaks.gz"
    assert slot["size_bytes"] > 0
    hls = slot["hls_segments"]
    for q, name in (("high_quality", "high"), ("low_quality", "low")):
        index = hls[q]["index"]
        entries = [ln for ln in index.splitlines() if ln and not ln.startswith("#")]
        assert entries == [f"{PREFIX}/segments/{name}/{i:09d}.ts" for i in range(3)]
        durations = [float(ln[8:].rstrip(",")) for ln in index.splitlines() if "EXTINF" in ln]
        assert durations == [2.0, 2.0, 1.0]
        sizes = [len(bucket.objects[e].data) for e in entries]
        expected = sum(s * 8 / d for s, d in zip(sizes, durations, strict=True)) / 3
        assert hls[q]["bitrate"] == pytest.approx(expected)
    assert hls["high_quality"]["bitrate"] > hls["low_quality"]["bitrate"]
    # Every key the slot names exists in the bucket.
    for k in ("storage_key", "storage_frames_manifest_key", "storage_thumbnail_key"):
        assert slot[k] in bucket.objects


def test_audio_peaks(default_run: tuple[dict[str, Any], MemoryBucket]) -> None:
    _, bucket = default_run
    obj = bucket.objects[f"{PREFIX}/audio_peaks.gz"]
    assert (obj.content_type, obj.content_encoding) == ("application/octet-stream", "gzip")
    raw = gzip.decompress(obj.data)
    assert 4900 <= len(raw) <= 5100  # 5 s of mono u8 at 1 kHz
    assert max(raw) - min(raw) > 20  # a sine (amplitude 1/8), not silence


def test_frames_equal_a_plain_reference_dump(
    default_run: tuple[dict[str, Any], MemoryBucket], clips: dict[str, Path], tmp_path: Path
) -> None:
    _, bucket = default_run
    ffmpeg("-i", str(clips["base"]), "-fps_mode", "passthrough", str(tmp_path / "%09d.png"))
    ref = sorted(tmp_path.glob("*.png"))
    assert len(ref) == len(bucket.keys(f"{PREFIX}/sections/high/")) == 150
    for n, path in enumerate(ref):  # PNG at zlib level 1 is still lossless: the same pixels
        ours = Image.open(io.BytesIO(bucket.objects[f"{PREFIX}/sections/high/{n:09d}.png"].data))
        with Image.open(path) as theirs:
            assert ours.mode == theirs.mode and ours.size == theirs.size
            assert ImageChops.difference(ours, theirs).getbbox() is None, n


def x264_settings(segment: bytes, tmp: Path) -> str:
    """The settings libx264 writes into its first SEI ("options: cabac=1 ref=3 ..."), read
    from the segment's H.264 elementary stream (the TS packets cut it into pieces)."""
    ts = tmp / "segment.ts"
    ts.write_bytes(segment)
    es = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(ts), "-map", "0:v:0", "-c", "copy", "-f", "h264",
         "pipe:1"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    ).stdout  # fmt: skip
    start = es.index(b"options: ")
    return es[start : es.index(b"\x00", start)].decode("ascii", "replace") + " "


def test_renditions_at_darwin_py_crf_gop_and_preset(
    default_run: tuple[dict[str, Any], MemoryBucket], tmp_path: Path
) -> None:
    _, bucket = default_run
    high = x264_settings(bucket.objects[f"{PREFIX}/segments/high/000000000.ts"].data, tmp_path)
    low = x264_settings(bucket.objects[f"{PREFIX}/segments/low/000000000.ts"].data, tmp_path)
    for opts, crf in ((high, "23.0"), (low, "40.0")):
        assert f" crf={crf} " in opts and " keyint=15 " in opts
        assert " subme=7 " in opts and " ref=3 " in opts  # libx264's default preset, medium


def test_one_process_and_three_write_the_same_artifacts(
    default_run: tuple[dict[str, Any], MemoryBucket], clips: dict[str, Path]
) -> None:
    """split_encoders only changes how the work is spread over processes."""
    split_slot, split = default_run
    slot, one = process(clips["base"], pool=VideoPool(workers=1, split_encoders=False),
                        source_storage_key=None)  # fmt: skip
    assert set(one.objects) == set(split.objects)
    assert manifest(one) == manifest(split)
    for key in split.keys(f"{PREFIX}/sections/high/")[::37]:
        assert one.objects[key].data == split.objects[key].data  # same pixels, same zlib level
    assert {k: v for k, v in slot.items() if k != "hls_segments"} == {
        k: v for k, v in split_slot.items() if k != "hls_segments"
    }
    for q in ("high_quality", "low_quality"):
        assert slot["hls_segments"][q]["index"] == split_slot["hls_segments"][q]["index"]


def test_faster_preset_and_png_level_are_knobs(clips: dict[str, Path], tmp_path: Path) -> None:
    pool = VideoPool(workers=1, x264_preset="veryfast", png_compression_level=9)
    slot, bucket = process(clips["ntsc"], pool=pool)
    high = x264_settings(bucket.objects[f"{PREFIX}/segments/high/000000000.ts"].data, tmp_path)
    assert " crf=23.0 " in high and " subme=2 " in high and " ref=1 " in high  # veryfast
    ffmpeg("-i", str(clips["ntsc"]), "-fps_mode", "passthrough", str(tmp_path / "%09d.png"))
    ref = sorted(tmp_path.glob("*.png"))
    assert len(ref) == slot["total_frames"] == 90
    for n in (0, 45, 89):
        ours = Image.open(io.BytesIO(bucket.objects[f"{PREFIX}/sections/high/{n:09d}.png"].data))
        with Image.open(ref[n]) as theirs:
            assert ImageChops.difference(ours, theirs).getbbox() is None
    with pytest.raises(ValueError, match="x264 preset"):
        VideoPool(x264_preset="quick")
    with pytest.raises(ValueError, match="PNG compression level"):
        VideoPool(png_compression_level=10)


# --- options ----------------------------------------------------------------------------------


def test_fps_jpeg_and_no_preview(reduced_run: tuple[dict[str, Any], MemoryBucket]) -> None:
    slot, bucket = reduced_run
    lines = manifest(bucket)
    assert len(lines) == 150 and slot["total_frames"] == 150
    assert [int(ln.split(":")[2]) for ln in lines] == [1 - i % 2 for i in range(150)]
    assert slot["visible_frames"] == 75
    hq = bucket.keys(f"{PREFIX}/sections/high/")
    assert hq == [f"{PREFIX}/sections/high/{i:09d}.jpg" for i in range(75)]
    assert bucket.objects[hq[0]].content_type == "image/jpeg"
    assert slot["storage_sections_key_extension"] == "jpg"
    assert bucket.keys(f"{PREFIX}/sections/low/") == []
    assert "storage_low_quality_sections_key_prefix" not in slot
    assert slot["storage_key"] == "src/clip.mp4"  # already in the bucket: not copied
    assert f"{PREFIX}/clip.mp4" not in bucket.objects


def test_visible_frames_are_the_selected_reference_frames(
    reduced_run: tuple[dict[str, Any], MemoryBucket], clips: dict[str, Path], tmp_path: Path
) -> None:
    _, bucket = reduced_run
    ffmpeg("-i", str(clips["base"]), "-fps_mode", "passthrough", str(tmp_path / "%09d.png"))
    ref = sorted(tmp_path.glob("*.png"))
    visible = [n for n, v in enumerate(visible_flags(len(ref), 2.0)) if v]
    for k in (0, 1, 37, 74):
        ours = Image.open(io.BytesIO(bucket.objects[f"{PREFIX}/sections/high/{k:09d}.jpg"].data))
        with Image.open(ref[visible[k]]) as theirs:
            diff = ImageChops.difference(ours.convert("RGB"), theirs.convert("RGB"))
            hist = diff.convert("L").histogram()
            mean = sum(i * c for i, c in enumerate(hist)) / (320 * 240)
            assert mean < 8  # JPEG q5 vs lossless: close, and far from a neighbour frame


def test_visible_rule() -> None:
    assert visible_step(30.0, 0) == 1.0
    assert visible_step(30.0, 60) == 1.0
    assert visible_step(30000 / 1001, 10) == 2.997
    assert [n for n, v in enumerate(visible_flags(10, 1.5)) if v] == [0, 1, 3, 4, 6, 7, 9]


# --- input shapes ------------------------------------------------------------------------------


def test_ntsc_rate_unrounded_and_no_audio(clips: dict[str, Path]) -> None:
    slot, bucket = process(clips["ntsc"], VideoOptions(fps=10))
    assert slot["native_fps"] == 30000 / 1001
    assert slot["total_frames"] == len(manifest(bucket)) == 90
    step = visible_step(30000 / 1001, 10)
    assert slot["visible_frames"] == sum(visible_flags(90, step))
    assert "storage_audio_peaks_key" not in slot
    assert not any(k.endswith("audio_peaks.gz") for k in bucket.objects)
    # Segments cut on 2 s boundaries: 60 frames (2.002 s) then 30.
    segs = [int(ln.split(":")[1]) for ln in manifest(bucket)]
    assert segs.count(0) == 60 and segs.count(1) == 30


def test_odd_portrait_above_720p(clips: dict[str, Path], tmp_path: Path) -> None:
    slot, bucket = process(clips["odd"])
    assert (slot["width"], slot["height"]) == (481, 853)
    assert slot["total_frames"] == 10
    with Image.open(io.BytesIO(bucket.objects[f"{PREFIX}/sections/high/000000000.png"].data)) as im:
        assert im.size == (481, 853)
    low = tmp_path / "low.ts"
    low.write_bytes(bucket.objects[f"{PREFIX}/segments/low/000000000.ts"].data)
    stream = ffprobe_json(low, "-select_streams", "v:0", "-show_streams")["streams"][0]
    assert stream["height"] == low_rendition_height(853) == 720
    assert stream["pix_fmt"] == "yuv420p"
    high = tmp_path / "high.ts"
    high.write_bytes(bucket.objects[f"{PREFIX}/segments/high/000000000.ts"].data)
    stream = ffprobe_json(high, "-select_streams", "v:0", "-show_streams")["streams"][0]
    assert (stream["width"], stream["height"]) == (482, 854)  # padded to even for H.264 4:2:0
    with Image.open(io.BytesIO(bucket.objects[f"{PREFIX}/thumbnail.jpg"].data)) as im:
        assert im.size[1] == 200 and im.size[0] <= 356


def test_variable_frame_rate(clips: dict[str, Path]) -> None:
    slot, bucket = process(clips["vfr"])
    frames = ffprobe_json(
        clips["vfr"], "-select_streams", "v:0", "-show_entries", "frame=pts_time", "-show_frames"
    )["frames"]
    lines = manifest(bucket)
    assert slot["total_frames"] == len(lines) == len(frames) == 40
    for line, frame in zip(lines, frames, strict=True):
        assert float(line.split(":")[3]) == pytest.approx(float(frame["pts_time"]), abs=1e-4)
    assert len(bucket.keys(f"{PREFIX}/sections/high/")) == 40
    counts = [int(ln.split(":")[1]) for ln in lines]
    assert counts == sorted(counts) and counts[-1] == 0  # 2 s clip, one segment


def test_frame_sequence_source(tmp_path: Path) -> None:
    """Numbered images (what DICOM frames become) are cut like a video file."""
    frames = tmp_path / "frames"
    frames.mkdir()
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=6:duration=3", "-start_number", "1",
           str(frames / "%06d.png"))  # fmt: skip
    src = FrameSequence(frames / "%06d.png", Fraction(6), start_number=1)
    bucket = MemoryBucket()
    pool = VideoPool(workers=1)

    async def go() -> VideoFacts:
        return await pool.process(
            src, prefix=PREFIX, file_name="scan.dcm", uploader=bucket,
            source_storage_key="src/scan.dcm", size_bytes=123, opts=VideoOptions(fps=3),
        )  # fmt: skip

    facts = asyncio.run(go())
    assert (facts.total_frames, facts.visible_frames, facts.native_fps) == (18, 9, 6.0)
    assert (facts.width, facts.height, facts.storage_key) == (160, 120, "src/scan.dcm")
    lines = manifest(bucket)
    assert [ln.split(":")[1:3] for ln in lines] == [
        [str(i // 12), str(1 - i % 2)] for i in range(18)
    ]  # 2 s segments of 12 frames; every other frame visible
    hq = bucket.keys(f"{PREFIX}/sections/high/")
    assert len(hq) == 9
    for k in (0, 4, 8):  # visible frame k is source image 2k (numbered from 1)
        ours = Image.open(io.BytesIO(bucket.objects[hq[k]].data))
        with Image.open(frames / f"{2 * k + 1:06d}.png") as theirs:
            assert ImageChops.difference(ours, theirs).getbbox() is None
    assert f"{PREFIX}/thumbnail.jpg" in bucket.objects
    assert len(bucket.keys(f"{PREFIX}/segments/high/")) == 3  # 2 segments + playlist
    no_key = pool.process(
        src, prefix=PREFIX, file_name="scan.dcm", uploader=bucket,
        source_storage_key=None, size_bytes=1, opts=VideoOptions(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="source_storage_key"):
        asyncio.run(no_key)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zero", "corrupt", "truncated", "audio_only", "no_video"])
def test_bad_input_is_a_media_error(kind: str, clips: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero":
        path.write_bytes(b"")
        expect = "empty"
    elif kind == "corrupt":
        path.write_bytes(os.urandom(64 * 1024))
        expect = "not a readable video"
    elif kind == "truncated":
        data = clips["base"].read_bytes()  # moov at the end: cut it off
        path.write_bytes(data[: len(data) // 2])
        expect = "not a readable video"
    elif kind == "audio_only":
        path = tmp_path / "a.m4a"
        ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(path))
        expect = "no video stream (audio only)"
    else:
        path = tmp_path / "subs.srt"
        path.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
        expect = "no video stream"
    bucket = MemoryBucket()
    with pytest.raises(MediaError) as err:
        process(path, bucket=bucket)
    assert expect in err.value.reason
    assert "\n" not in err.value.reason
    assert bucket.objects == {}


def test_probe(clips: dict[str, Path]) -> None:
    info = asyncio.run(probe(clips["ntsc"]))
    assert isinstance(info, ProbeInfo)
    assert (info.width, info.height, info.has_audio) == (160, 120, False)
    assert info.native_fps == 30000 / 1001 and info.total_frames == 90
    assert info.duration_s == pytest.approx(3.0, abs=0.05)


# --- preflight -----------------------------------------------------------------------------------


def test_check_ffmpeg_ok() -> None:
    assert asyncio.run(check_ffmpeg()).startswith(("5", "6", "7", "8", "n"))


def test_check_ffmpeg_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PreflightError, match="ffmpeg not found on PATH"):
        asyncio.run(check_ffmpeg())


def test_check_ffmpeg_too_old(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright'\n")
    fake.chmod(0o755)
    os.symlink(shutil.which("ffprobe") or "/usr/bin/ffprobe", tmp_path / "ffprobe")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PreflightError, match=r"4\.x found"):
        asyncio.run(check_ffmpeg())


# --- prefix ---------------------------------------------------------------------------------


def test_artifact_prefix_is_deterministic() -> None:
    a = artifact_prefix("thumbs/", "my-storage", "videos/a.mp4")
    assert a == artifact_prefix("thumbs", "my-storage", "videos/a.mp4")
    assert a != artifact_prefix("thumbs", "other-storage", "videos/a.mp4")
    assert a != artifact_prefix("thumbs", "my-storage", "videos/b.mp4")
    parts = a.split("/")
    assert len(parts) == 4 and parts[0] == "thumbs" and parts[2] == "files"
    assert len(parts[1]) == len(parts[3]) == 36
    assert artifact_prefix("", "s", "k").count("/") == 2


# --- limits, cancellation, back-pressure --------------------------------------------------


def test_time_limit_kills_ffmpeg(clips: dict[str, Path], tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    pool = VideoPool(workers=1, time_limit_s=0.5, temp_dir=temp)
    with pytest.raises(MediaError, match="time limit"):
        process(clips["base"], pool=pool)
    assert ffmpeg_children() == []
    assert list(temp.iterdir()) == []


def test_cancellation_kills_ffmpeg_and_cleans_temp(clips: dict[str, Path], tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    pool = VideoPool(workers=1, temp_dir=temp)

    async def go() -> None:
        bucket = MemoryBucket(first_upload=asyncio.Event(), gate=asyncio.Event())
        task = asyncio.create_task(
            pool.process(
                clips["base"],
                prefix=PREFIX,
                file_name="clip.mp4",
                uploader=bucket,
                source_storage_key="src/clip.mp4",
                size_bytes=1,
                opts=VideoOptions(),
            )
        )
        assert bucket.first_upload is not None
        await bucket.first_upload.wait()  # ffmpeg is running and has written a file
        assert ffmpeg_children() != []
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert ffmpeg_children() == []
    assert list(temp.iterdir()) == []


def test_one_failing_pass_stops_the_others(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in one of a video's ffmpeg processes (here the low rendition's disk fills up:
    no real ffmpeg fails on cue, so an ffmpeg on PATH fails for that command and runs the
    real one for the others) fails the video with that process's reason (not the "exit -9"
    of the ones killed because of it), no process is left and the temp dir is gone."""
    real = shutil.which("ffmpeg")
    assert real is not None
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ffmpeg").write_text(
        "#!/bin/sh\n"
        'case "$*" in *segments/low*)\n'
        "  echo \"[hls @ 0x5] Failed to open file '/t/x/000000000.ts': No space left on "
        'device" >&2; exit 1;;\n'
        "esac\n"
        f'exec {real} "$@"\n'
    )
    (shim / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    temp = tmp_path / "tmp"
    temp.mkdir()
    bucket = MemoryBucket()
    with pytest.raises(MediaError) as err:
        process(clips["base"], pool=VideoPool(workers=1, temp_dir=temp), bucket=bucket)
    assert err.value.reason == "ffmpeg failed: No space left on device"
    assert f"{PREFIX}/frames_manifest.txt" not in bucket.objects
    assert ffmpeg_children() == []
    assert list(temp.iterdir()) == []


@pytest.mark.timeout(60)
def test_backpressure_pauses_ffmpeg(clips: dict[str, Path], tmp_path: Path) -> None:
    bucket = MemoryBucket(gate=asyncio.Event())
    gate = bucket.gate
    assert gate is not None

    def paused() -> None:
        gate.set()  # uploads may proceed only once ffmpeg has been stopped

    pool = VideoPool(workers=1, max_pending_bytes=300_000, on_pause=paused)
    slot, _ = process(clips["base"], VideoOptions(extract_preview_frames=False), bucket=bucket,
                      pool=pool)  # fmt: skip
    assert pool.pauses >= 1
    assert slot["total_frames"] == 150
    assert len(bucket.keys(f"{PREFIX}/sections/high/")) == 150


def test_rerun_overwrites_the_same_keys(
    default_run: tuple[dict[str, Any], MemoryBucket], clips: dict[str, Path]
) -> None:
    first_slot, first = default_run
    slot, again = process(clips["base"], source_storage_key=None)
    assert set(again.objects) == set(first.objects)
    assert slot == first_slot
    assert (
        again.objects[f"{PREFIX}/frames_manifest.txt"]
        == first.objects[f"{PREFIX}/frames_manifest.txt"]
    )


@pytest.fixture(autouse=True)
def _no_leftover_ffmpeg() -> Iterator[None]:
    yield
    assert ffmpeg_children() == []
