"""The media stage: typed items in, items with media facts out (their wire JSON is what the
old stage wrote into payloads), the facts cache, and which media failures are final (the
worker leaves them to `ingest retry`) and which are worth another try later: the bucket side
failing is never the object's fault."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ingest.config import PlanConfig, SourceConfig
from ingest.errors import SourceRetryable
from ingest.media import MediaError
from ingest.media.stage import THUMBNAIL_KIND, UPLOAD_KIND, MediaStage
from ingest.media.thumbnail import thumbnail_key
from ingest.media.video import artifact_prefix
from ingest.model import (
    Facts,
    ImageFacts,
    Item,
    Media,
    ObjectInfo,
    Rendition,
    UploadFacts,
    VideoFacts,
)
from ingest.planner import ShardPlanner
from ingest.providers.local import LocalSource
from ingest.registrar import wire


@dataclass
class MemoryCache:
    """The ledger's media cache: facts by (bucket, key, etag, kind)."""

    facts: dict[tuple[str, str, str, str], Facts] = field(default_factory=dict)

    async def cached_facts(self, bucket: str, obj: ObjectInfo, kind: str) -> Facts | None:
        return self.facts.get((bucket, obj.key, obj.etag, kind))

    async def cache_facts(self, bucket: str, obj: ObjectInfo, kind: str, facts: Facts) -> None:
        self.facts[(bucket, obj.key, obj.etag, kind)] = facts


class FlakyBucket(LocalSource):
    """A directory whose reads fail the way a bucket under an outage does (no emulator
    produces a 503 on demand)."""

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        raise SourceRetryable("HTTP 503 SlowDown")


class ContainerBucket(LocalSource):
    """A directory that names its keys like Azure does: V7 storage keys carry the container."""

    def storage_key(self, key: str) -> str:
        return f"container/{key}"


@dataclass
class Thumb:
    jpeg: bytes
    width: int
    height: int


@dataclass
class FakeThumbnailer:
    seen: list[bytes] = field(default_factory=list)

    async def make(self, data: bytes) -> Thumb:
        self.seen.append(data)
        return Thumb(b"JPEG:" + data, 640, 480)


@dataclass
class FakeCutter:
    """Stands in for the ffmpeg pool: returns facts under the prefix it was given."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    async def process(self, src: Path, **kw: Any) -> VideoFacts:
        self.calls.append({**kw, "data": await asyncio.to_thread(src.read_bytes)})
        prefix = kw["prefix"]
        return VideoFacts(
            storage_key=kw["source_storage_key"] or f"{prefix}/{kw['file_name']}",
            width=320,
            height=240,
            native_fps=30.0,
            visible_frames=150,
            total_frames=150,
            high=Rendition("#EXTM3U\n", 1000.0),
            low=Rendition("#EXTM3U\n", 500.0),
            sections_prefix=f"{prefix}/sections/high",
            sections_extension="png",
            frames_manifest_key=f"{prefix}/frames_manifest.txt",
            thumbnail_key=f"{prefix}/thumbnail.jpg",
            size_bytes=kw["size_bytes"],
        )


def _stage(
    source: LocalSource,
    cache: MemoryCache | None = None,
    *,
    thumbnails: FakeThumbnailer | None = None,
    videos: FakeCutter | None = None,
    destination: LocalSource | None = None,
) -> MediaStage:
    return MediaStage(
        source,
        cache or MemoryCache(),
        artifact_prefix="_ingest",
        storage_name="st",
        thumbnails=thumbnails,
        videos=videos,
        video_options=None,
        max_image_bytes=1 << 20,
        destination=destination,
    )


def _plan(key: str, size: int, **kw: Any) -> Item:
    (item,) = ShardPlanner(PlanConfig(), **kw).feed([ObjectInfo(key, size, "e1")])
    assert isinstance(item, Item)
    return item


async def test_bucket_errors_are_not_final_and_bad_bytes_are(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"0123456789")
    cfg = SourceConfig(provider="local", bucket=str(tmp_path))
    with pytest.raises(MediaError) as outage:
        await _stage(FlakyBucket(cfg))._read(ObjectInfo("a.jpg", 10))
    assert not outage.value.final and "503" in outage.value.reason
    with pytest.raises(MediaError) as gone:
        await _stage(LocalSource(cfg))._read(ObjectInfo("missing.jpg", 10))
    assert not gone.value.final  # it may be put back; a sync tells vanished from not
    with pytest.raises(MediaError) as empty:
        await _stage(LocalSource(cfg))._read(ObjectInfo("a.jpg", 0))
    assert empty.value.final
    assert await _stage(LocalSource(cfg))._read(ObjectInfo("a.jpg", 10)) == b"0123456789"
    # Through prepare(): an outage while thumbnailing a read-only image is not final either.
    item = _plan("a.jpg", 10, readonly=True)
    with pytest.raises(MediaError) as prepared:
        await _stage(FlakyBucket(cfg), thumbnails=FakeThumbnailer()).prepare(item)
    assert not prepared.value.final


async def test_a_read_only_image_gets_its_size_and_thumbnail(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jpg").write_bytes(b"0123456789")
    source = ContainerBucket(SourceConfig(provider="local", bucket=str(tmp_path)))
    cache, thumbs = MemoryCache(), FakeThumbnailer()
    item = _plan("d/a.jpg", 10, readonly=True)
    assert item.media is Media.IMAGE and item.readonly_endpoint
    done = await _stage(source, cache, thumbnails=thumbs).prepare(item)
    tkey = thumbnail_key("d/a.jpg", "_ingest")
    assert done.media is Media.NONE and done.readonly_endpoint
    assert done.slots[0].image == ImageFacts(640, 480, f"container/{tkey}")
    assert (tmp_path / tkey).read_bytes() == b"JPEG:0123456789"  # uploaded by provider key
    assert wire.item_json(done, wire.KeyMap("container/")) == {
        "path": "/d",
        "type": "image",
        "storage_key": "container/d/a.jpg",
        "name": "a.jpg",
        "storage_thumbnail_key": f"container/{tkey}",
        "height": 480,
        "width": 640,
    }
    # Cached by the object's ETag: a second run reads and uploads nothing.
    (tmp_path / tkey).unlink()
    again = await _stage(source, cache, thumbnails=thumbs).prepare(item)
    assert again == done and len(thumbs.seen) == 1 and not (tmp_path / tkey).exists()
    assert [k[3] for k in cache.facts] == [THUMBNAIL_KIND]


async def test_local_files_are_uploaded_and_sent_by_their_copy(tmp_path: Path) -> None:
    src_dir, bucket_dir = tmp_path / "files", tmp_path / "bucket"
    (src_dir / "cars").mkdir(parents=True)
    bucket_dir.mkdir()
    (src_dir / "cars" / "a.jpg").write_bytes(b"pixels")
    source = LocalSource(SourceConfig(provider="local", bucket=str(src_dir)))
    dest = ContainerBucket(SourceConfig(provider="local", bucket=str(bucket_dir)))
    item = _plan("cars/a.jpg", 6, local_files=True)
    assert item.media is Media.UPLOAD
    cache = MemoryCache()
    done = await _stage(source, cache, destination=dest).prepare(item)
    digest = hashlib.sha256(b"cars/a.jpg").hexdigest()[:32]
    copy = f"_ingest/files/{digest}/a.jpg"
    assert done.slots[0].facts == (UploadFacts(f"container/{copy}"),)
    assert (bucket_dir / copy).read_bytes() == b"pixels"
    sent = wire.item_json(done, wire.KeyMap("container/"))
    assert sent["storage_key"] == f"container/{copy}"  # not the local path
    assert done.keys == ("cars/a.jpg",)  # the ledger still knows it by its own key
    assert [k[3] for k in cache.facts] == [UPLOAD_KIND]
    (bucket_dir / copy).unlink()
    assert await _stage(source, cache, destination=dest).prepare(item) == done  # cached
    assert not (bucket_dir / copy).exists()


async def test_a_video_cut_locally_becomes_a_read_only_video_slot(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "clip.MP4").write_bytes(b"video-bytes")
    source = ContainerBucket(SourceConfig(provider="local", bucket=str(tmp_path)))
    cache, cutter = MemoryCache(), FakeCutter()
    item = _plan("v/clip.MP4", 11, video_local=True)
    assert item.media is Media.VIDEO and item.readonly_endpoint and not item.compact
    done = await _stage(source, cache, videos=cutter).prepare(item)
    prefix = "container/" + artifact_prefix("_ingest", "st", "v/clip.MP4")
    (call,) = cutter.calls
    assert call["prefix"] == prefix and call["file_name"] == "clip.MP4"
    assert call["source_storage_key"] == "container/v/clip.MP4"  # in the bucket: not copied
    assert call["size_bytes"] == 11 and call["data"] == b"video-bytes"
    (slot,) = wire.item_json(done, wire.KeyMap("container/"))["slots"]
    assert slot["slot_name"] == slot["file_name"] == "clip.MP4"
    assert slot["type"] == "video" and slot["storage_key"] == "container/v/clip.MP4"
    assert slot["storage_thumbnail_key"] == f"{prefix}/thumbnail.jpg"
    assert slot["size_bytes"] == 11 and "fps" not in slot
    # Cached: not cut again.
    assert await _stage(source, cache, videos=cutter).prepare(item) == done
    assert len(cutter.calls) == 1


async def test_missing_media_tools_are_media_errors(tmp_path: Path) -> None:
    source = LocalSource(SourceConfig(provider="local", bucket=str(tmp_path)))
    with pytest.raises(MediaError, match="thumbnails are not available"):
        await _stage(source).prepare(_plan("a.jpg", 10, readonly=True))
    with pytest.raises(MediaError, match="local video processing is not available"):
        await _stage(source).prepare(_plan("a.mp4", 10, video_local=True))
