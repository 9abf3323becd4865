"""Read-only DICOM converted into what V7 shows, with the artifacts in the bucket.

- **One slice** (a slot of one single-frame file): a PNG at ``{prefix}/dicom/{digest}/{stem}.png``
  and a thumbnail at the image thumbnail key; the slot becomes an ``image`` slot whose
  ``storage_key`` is the PNG and whose size is Columns x Rows.
- **A series** (a slot of several files) or **a multi-frame file**: one video, one frame per
  slice (or per frame), in V7's order (``ingest.media.dicom.series_order``; the listing's
  order with ``ignore_dicom_layout``). Frames are decoded one by one in the decoder processes
  and piped as raw 8-bit video into ffmpeg's stdin, which writes a lossless FFV1 video in the
  temp dir (never uploaded: browsers cannot play FFV1); that video goes through the ordinary
  video pipeline (``VideoPool.process``: HLS, one HQ/LQ section per frame, thumbnail,
  manifest), lossless, so each HQ section is exactly the converted slice. The slot's
  ``storage_key`` is an H.264 MP4 (yuv420p, faststart) encoded from it and uploaded beside its
  artifacts, which a browser plays.
- A multi-frame file among the files of a series is left out of the series video (V7 gives
  such a file a slot of its own; a converted read-only item cannot gain slots here), unless
  ``ignore_dicom_layout``, where V7 makes every file a slice and its frames go in its place.
- Within a series, the largest group of one SeriesInstanceUID and one frame size is the video;
  the rest (a localizer of another size, a second series in the folder) is left out, each
  file with its reason in ``ConvertedFacts.left_out`` (the report's ``converted`` column says
  "not converted: ..."), and the series is still registered. A tie between two groups:
  ``FAILED`` with the sizes found (``plan.dicom_series = false`` registers each slice alone).
  See ``ingest.media.dicom.series_members``.

Bounded: a series is sorted from each slice's first ``HEADER_BYTES`` (a ranged read, parsed
without pixels; a longer header is read again with 1 MiB, then 8 MiB, then whole; every prefix
is deleted once parsed); the slices are then fetched a few ahead of the decoder in series
order and deleted once decoded (temp disk: a window of slices plus the two videos being
written), and at most ``max_pending`` frames are being decoded or waiting for ffmpeg at a
time. A ``.dcm`` object larger than ``media.max_image_bytes`` is FAILED without being read.
Idempotent: every key is derived from the object (or series folder) key, so a re-run
overwrites; the facts are cached per object version, so an unchanged file is never converted
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ingest.media import MediaError
from ingest.media.dicom import (
    MAX_FRAMES,
    DicomRejected,
    SliceHeader,
    SliceImage,
    convert_frame,
    convert_slice,
    read_header,
    series_members,
    series_order,
    series_range,
)
from ingest.media.ffmpeg import FFMPEG, kill, run_to_end, stderr_reason
from ingest.media.thumbnail import thumbnail_key
from ingest.model import ConvertedFacts, ImageFacts, ItemType, ObjectInfo, Slot, VideoFacts

T = TypeVar("T")

DICOM_KIND = "dicom/v2"  # v2: enhanced files' functional groups reach the decoder
DOWNLOAD_CONCURRENCY = 8  # bucket reads at once per slot
PREFETCH_FILES = 8  # slices fetched ahead of the decoder in a series
# One decoder job (a header, a slice, a frame) past this is FAILED (retryable) and its worker
# killed: a slice decodes in milliseconds, a large JPEG 2000 frame in seconds.
DECODE_LIMIT_S = 120.0
HEADER_BYTES = 64 * 1024  # what is read of each slice to sort a series
# Ranged reads tried in turn for a header (a long private header); past the last the whole
# object is read, and every prefix is deleted once parsed.
HEADER_READS = (HEADER_BYTES, 1024 * 1024, 8 * 1024 * 1024)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Decoders(Protocol):
    """The decoder processes (``ThumbnailPool.call``) and how many jobs they take at once."""

    max_pending: int
    max_pixels: int

    async def call(self, fn: Callable[..., T], *args: Any) -> T: ...
    async def call_within(self, limit_s: float | None, fn: Callable[..., T], *args: Any) -> T: ...


class Cutter(Protocol):
    async def process(
        self,
        src: Path,
        *,
        prefix: str,
        file_name: str,
        uploader: Any,
        source_storage_key: str | None,
        size_bytes: int,
        opts: Any,
    ) -> VideoFacts: ...


class Bucket(Protocol):
    """What the converter needs of the media stage: downloads and uploads (provider keys),
    storage keys for V7, bucket errors already turned into MediaError."""

    async def download(self, key: str, dest: Path) -> None: ...
    async def read_range(self, key: str, start: int, end: int) -> bytes: ...
    async def upload(self, key: str, data: bytes | Path, content_type: str) -> None: ...
    def to_storage(self, key: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a DICOM slot's conversion goes (provider keys), known before any decoding:
    ``png``/``thumbnail`` when it is one slice, ``video_prefix`` + ``video_name`` when it is
    a series or a multi-frame file."""

    png: str
    thumbnail: str
    video_prefix: str
    video_name: str


def _stem(name: str) -> str:
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return _UNSAFE.sub("_", stem).strip("._")[:80] or "dicom"


def series_id(slot: Slot) -> str:
    """The key a slot's conversion is derived from: the file's key for one file, the series
    folder (``a/b/``) for several, so adding a slice keeps the prefix (a re-run overwrites)."""
    if len(slot.objects) == 1:
        return slot.obj.key
    return slot.obj.key.rpartition("/")[0] + "/"


def layout(slot: Slot, prefix: str, storage_name: str) -> Layout:
    """Pure: the keys a DICOM slot converts into (see the module docstring)."""
    from ingest.media.video import artifact_prefix

    sid = series_id(slot)
    digest = hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    base = sid.rstrip("/").rpartition("/")[2] or "series"
    stem = _stem(base)
    root = prefix.strip("/")
    png = f"{root}/dicom/{digest}/{stem}.png" if root else f"dicom/{digest}/{stem}.png"
    return Layout(
        png=png,
        thumbnail=thumbnail_key(sid, prefix),
        video_prefix=artifact_prefix(prefix, storage_name, sid),
        video_name=f"{stem}.mp4",
    )


def cache_kind(slot: Slot, fps: float, ignore_layout: bool, video_options: Any) -> str:
    """The media-cache kind of a slot's conversion, cached on its first object: it names
    every object version of the slot (a changed or added slice is a miss) and the options
    that shape the output."""
    h = hashlib.sha256()
    for o in slot.objects:
        h.update(f"{o.key}\0{o.etag}\0{o.size}\n".encode("utf-8", "surrogatepass"))
    return f"{DICOM_KIND}:{h.hexdigest()[:32]}:{fps:g}:{int(ignore_layout)}:{video_options!r}"


def section_order(headers: Sequence[SliceHeader], order: Sequence[int]) -> list[tuple[int, int]]:
    """(object index, frame index) per section, in the series order: each file's frames in
    their own order."""
    return [(i, f) for i in order for f in range(headers[i].frames)]


def series_fps(headers: Sequence[SliceHeader], default_fps: float) -> float:
    """A single multi-frame file plays at its stated rate; a series of slices at the
    configured ``media.dicom_fps``."""
    if len(headers) == 1 and headers[0].frames > 1 and headers[0].fps > 0:
        return round(headers[0].fps, 3)
    return default_fps


class DicomConverter:
    """Converts read-only DICOM slots (one per call, safe to call concurrently)."""

    def __init__(
        self,
        decoders: Decoders,
        videos: Cutter | None,
        bucket: Bucket,
        uploader: Any,
        *,
        prefix: str,
        storage_name: str,
        video_options: Any,
        fps: float,
        ignore_layout: bool,
        temp_dir: Path | None = None,
        max_bytes: int = 0,
        decode_limit_s: float = DECODE_LIMIT_S,
    ) -> None:
        self.decoders = decoders
        self.videos = videos
        self.bucket = bucket
        self.uploader = uploader
        self.prefix = prefix
        self.storage_name = storage_name
        self.video_options = video_options
        self.fps = fps
        self.ignore_layout = ignore_layout
        self.temp_dir = temp_dir
        self.max_bytes = max_bytes  # a larger .dcm object is FAILED unread (0: no limit)
        self.decode_limit_s = decode_limit_s
        # Series encodes at once: as many as ffmpeg video workers (a multi-frame file can
        # arrive through the image workers, which are many more).
        self._encodes = asyncio.Semaphore(max(1, int(getattr(videos, "workers", 1) or 1)))

    def kind(self, slot: Slot) -> str:
        return cache_kind(slot, self.fps, self.ignore_layout, self.video_options)

    async def convert(self, slot: Slot) -> ConvertedFacts:
        """Read headers, order, decode and write the slot's conversion; raises MediaError."""
        work = Path(tempfile.mkdtemp(prefix="ingest-dicom-", dir=self.temp_dir))
        files = _Files(slot.objects, work, self.bucket, self.max_bytes)
        try:
            keys = layout(slot, self.prefix, self.storage_name)
            if len(slot.objects) == 1:
                await files.fetch(0)
                headers = [await self._header(files, 0, files.paths[0])]
                if headers[0].frames == 1:
                    return await self._slice(files.paths[0], keys)
            else:
                headers = await self._headers(files)
            total = sum(h.frames for h in headers)
            if total > MAX_FRAMES:
                raise MediaError(
                    f"too many frames in the series: {total:,} (at most {MAX_FRAMES:,})"
                )
            members = series_members(headers, files.names, ignore_layout=self.ignore_layout)
            if members.problem:
                raise MediaError(members.problem)
            kept = members.kept
            order = [
                kept[j]
                for j in series_order(
                    [headers[i] for i in kept],
                    [files.names[i] for i in kept],
                    ignore_layout=self.ignore_layout,
                )
            ]
            facts = await self._series(files, headers, order, keys, work)
            return replace(facts, left_out=tuple(members.left_out))
        finally:
            await files.close()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, work, True)

    async def _headers(self, files: _Files) -> list[SliceHeader]:
        """Every slice's header, from ranged reads of growing size (``HEADER_READS``; the
        whole object only past the last), each parsed and deleted at once: at most
        ``DOWNLOAD_CONCURRENCY`` prefixes on temp disk, no slice kept. The slices themselves
        are fetched later, a few at a time, in series order."""
        reading = asyncio.Semaphore(DOWNLOAD_CONCURRENCY)

        async def one(i: int) -> SliceHeader:
            try:
                async with reading:
                    return await self._header_of(files, i)
            except MediaError as e:
                raise MediaError(f"{files.names[i]}: {e.reason}"[:300], final=e.final) from None

        return await _all([one(i) for i in range(len(files.paths))])

    async def _header_of(self, files: _Files, i: int) -> SliceHeader:
        size = files.objects[i].size
        for limit in (*HEADER_READS, size):
            whole = size <= limit
            head = await files.head(i, min(limit, size))
            try:
                return await self._header(files, i, head)
            except DicomRejected:
                raise
            except MediaError:
                if whole:
                    raise  # the whole object was read: the header itself is bad
                # else the header runs past this prefix: read more
            finally:
                await asyncio.to_thread(head.unlink, True)
        raise AssertionError("unreachable: the last read is the whole object")

    async def _header(self, files: _Files, i: int, path: Path) -> SliceHeader:
        """The header of object ``i`` read from ``path`` (the object or a prefix of it),
        checked against its size and the pixel limit before anything is decoded."""
        size = files.objects[i].size
        return await self._decode(read_header, str(path), size, self.decoders.max_pixels)

    async def _decode(self, fn: Callable[..., T], *args: Any) -> T:
        """A decoder job under ``decode_limit_s`` (its worker killed past it)."""
        return await self.decoders.call_within(self.decode_limit_s, fn, *args)

    async def _slice(self, path: Path, keys: Layout) -> ConvertedFacts:
        image: SliceImage = await self._decode(convert_slice, str(path), self.decoders.max_pixels)
        await self.bucket.upload(keys.png, image.png, "image/png")
        await self.bucket.upload(keys.thumbnail, image.thumbnail, "image/jpeg")
        facts = ImageFacts(image.width, image.height, self.bucket.to_storage(keys.thumbnail))
        return ConvertedFacts(self.bucket.to_storage(keys.png), facts, (0,))

    async def _series(
        self,
        files: _Files,
        headers: Sequence[SliceHeader],
        order: Sequence[int],
        keys: Layout,
        work: Path,
    ) -> ConvertedFacts:
        if self.videos is None:
            raise MediaError("local video processing is not available in this run")
        sections = section_order(headers, order)
        rgb = any(headers[i].color for i in order)
        stored_range = series_range([headers[i] for i in order])
        width, height = headers[order[0]].columns, headers[order[0]].rows
        fps = series_fps(headers, self.fps)
        video = work / f"{Path(keys.video_name).stem}.mkv"  # FFV1: temp only
        playable = work / keys.video_name
        opts = self.video_options
        with contextlib.suppress(TypeError):  # every slice one visible section
            opts = replace(opts, fps=0.0)
        limit_s = float(getattr(self.videos, "time_limit_s", 0) or 0) or None
        async with self._encodes:
            try:
                async with asyncio.timeout(limit_s):  # both encodes, one limit
                    async with contextlib.aclosing(
                        self._frames(files, sections, rgb, stored_range)
                    ) as frames:
                        await encode_lossless(
                            frames, video, width=width, height=height, rgb=rgb, fps=fps
                        )
                    await encode_mp4(video, playable)
            except TimeoutError:
                raise MediaError(
                    f"time limit: converting the slices took longer than {limit_s:g} s",
                    final=False,
                ) from None
            size = (await asyncio.to_thread(playable.stat)).st_size
            mp4_key = f"{keys.video_prefix}/{keys.video_name}"
            await self.bucket.upload(mp4_key, playable, "video/mp4")
            await asyncio.to_thread(playable.unlink, True)
            facts = await self.videos.process(
                video,
                prefix=self.bucket.to_storage(keys.video_prefix),
                file_name=keys.video_name,
                uploader=self.uploader,
                source_storage_key=self.bucket.to_storage(mp4_key),  # uploaded above
                size_bytes=size,
                opts=opts,
            )
        return ConvertedFacts(facts.storage_key, facts, tuple(i for i, _f in sections))

    async def _frames(
        self,
        files: _Files,
        sections: Sequence[tuple[int, int]],
        rgb: bool,
        stored_range: tuple[float, float] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Each section's 8-bit frame, in order: at most ``max_pending`` decoding ahead and
        ``PREFETCH_FILES`` slices fetched ahead; a slice's file is deleted once its last
        frame is out, so temp disk holds a window of slices, not the series."""
        ahead: deque[tuple[int, asyncio.Task[bytes]]] = deque()
        limit = max(1, self.decoders.max_pending)
        left = Counter(i for i, _f in sections)  # frames still to come, per file
        in_order = list(dict.fromkeys(i for i, _f in sections))
        position = {i: n for n, i in enumerate(in_order)}

        async def next_frame() -> bytes:
            i, task = ahead.popleft()
            try:
                frame = await task
            except MediaError as e:
                raise MediaError(f"{files.names[i]}: {e.reason}"[:300], final=e.final) from None
            left[i] -= 1
            if not left[i]:
                await files.drop(i)
            return frame

        try:
            for i, frame in sections:
                n = position[i]
                files.prefetch(in_order[n : n + PREFETCH_FILES])
                await files.fetch(i)
                call = self._decode(convert_frame, str(files.paths[i]), frame, rgb, stored_range)
                ahead.append((i, asyncio.ensure_future(call)))
                if len(ahead) >= limit:
                    yield await next_frame()
            while ahead:
                yield await next_frame()
        finally:
            for _i, task in ahead:
                task.cancel()
            if ahead:
                await asyncio.gather(*(t for _i, t in ahead), return_exceptions=True)
            await files.close()


class _Files:
    """The slot's objects in the temp dir: fetched on demand (bounded concurrency), header
    prefixes, deletion once decoded."""

    def __init__(
        self, objects: Sequence[ObjectInfo], work: Path, bucket: Bucket, max_bytes: int = 0
    ) -> None:
        self.objects = objects
        self.max_bytes = max_bytes
        self.names = [o.key.rpartition("/")[2] for o in objects]
        self.paths = [work / f"{i:06d}.dcm" for i in range(len(objects))]
        self._work = work
        self._bucket = bucket
        self._sem = asyncio.Semaphore(DOWNLOAD_CONCURRENCY)
        self._fetches: dict[int, asyncio.Task[None]] = {}

    def _check(self, i: int) -> None:
        size = self.objects[i].size
        if size <= 0:
            raise MediaError("empty object (0 bytes)")
        if self.max_bytes and size > self.max_bytes:
            raise MediaError(
                f"DICOM file too large: {size:,} bytes (media.max_image_bytes {self.max_bytes:,})"
            )

    async def head(self, i: int, size: int) -> Path:
        """The first ``size`` bytes of object ``i`` in a file of their own (the caller
        deletes it); the whole object past ``HEADER_READS``."""
        self._check(i)
        obj = self.objects[i]
        path = self._work / f"{i:06d}.head"
        async with self._sem:
            if size > HEADER_READS[-1]:
                await self._bucket.download(obj.key, path)
                return path
            data = await self._bucket.read_range(obj.key, 0, size)
        await asyncio.to_thread(path.write_bytes, data)
        return path

    def prefetch(self, indices: Sequence[int]) -> None:
        for i in indices:
            if i not in self._fetches:
                self._fetches[i] = asyncio.ensure_future(self._download(i))

    async def fetch(self, i: int) -> None:
        self.prefetch([i])
        await self._fetches[i]

    async def _download(self, i: int) -> None:
        self._check(i)
        async with self._sem:
            await self._bucket.download(self.objects[i].key, self.paths[i])

    async def drop(self, i: int) -> None:
        await asyncio.to_thread(self.paths[i].unlink, True)

    async def close(self) -> None:
        for task in self._fetches.values():
            task.cancel()
        await asyncio.gather(*self._fetches.values(), return_exceptions=True)


async def _all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Gather; on the first error cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def encode_lossless(
    frames: AsyncIterator[bytes], out: Path, *, width: int, height: int, rgb: bool, fps: float
) -> int:
    """Raw 8-bit frames (grey or RGB24, ``width`` x ``height``) from ``frames`` into a lossless
    FFV1 Matroska file through ffmpeg's stdin; returns the number of frames. The entry point
    of frames made by a converter into the video pipeline (``VideoPool.process`` takes the
    file it writes)."""
    frame_bytes = width * height * (3 if rgb else 1)
    args = [
        FFMPEG,
        "-hide_banner",
        "-nostats",
        "-v",
        "error",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24" if rgb else "gray",
        "-s",
        f"{width}x{height}",
        "-framerate",
        f"{fps:g}",
        "-i",
        "pipe:0",
        "-c:v",
        "ffv1",
        "-y",
        str(out),
    ]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stderr is not None
    err = asyncio.ensure_future(proc.stderr.read())
    count = 0
    try:
        try:
            async for frame in frames:
                if len(frame) != frame_bytes:
                    raise MediaError(
                        f"frame {count}: {len(frame)} bytes, expected {frame_bytes} "
                        f"({width}x{height})"
                    )
                proc.stdin.write(frame)
                await proc.stdin.drain()
                count += 1
        except (BrokenPipeError, ConnectionResetError):
            pass  # ffmpeg exited early: its return code and stderr say why
        finally:
            proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.wait_closed()
        await proc.wait()
        if proc.returncode != 0:
            reason = stderr_reason(await err, f"exit {proc.returncode}")
            raise MediaError(f"ffmpeg could not encode the slices: {reason}")
    finally:
        await kill(proc)
        err.cancel()
    if count == 0:
        raise MediaError("no frames to encode")
    return count


async def encode_mp4(src: Path, out: Path) -> None:
    """The browser-playable copy of a converted series: H.264 (CRF 18, yuv420p, padded to even
    sizes as 4:2:0 needs), faststart MP4."""
    args = [
        FFMPEG,
        "-hide_banner",
        "-nostats",
        "-v",
        "error",
        "-i",
        str(src),
        "-map",
        "0:v:0",
        "-vf",
        "pad=ceil(iw/2)*2:ceil(ih/2)*2,format=yuv420p",
        "-c:v",
        "libx264",
        "-crf",
        "18",
        "-movflags",
        "+faststart",
        "-y",
        str(out),
    ]
    code, _out, err = await run_to_end(*args)
    if code != 0:
        reason = stderr_reason(err, f"exit {code}")
        raise MediaError(f"ffmpeg could not encode the series MP4: {reason}")


def converted_slot(slot: Slot, facts: ConvertedFacts, keys: Layout) -> Slot:
    """The slot as V7 gets it: an image (the PNG) or a video (the series video); its objects
    stay the .dcm files (what the ledger and the report track)."""
    if isinstance(facts.made, ImageFacts):
        kind, file_name = ItemType.IMAGE, keys.png.rpartition("/")[2]
    else:
        kind, file_name = ItemType.VIDEO, keys.video_name
    return replace(
        slot, type=kind, file_name=file_name, facts=(facts,), extract_views=False, fps=None
    )
