"""The media stage: turns a planned item into one that can be sent.

Read-only images get their exact size and a thumbnail uploaded next to them; videos processed
locally get their artifacts cut by the ffmpeg pool and streamed to the bucket. The stage runs
beside registration (the pipeline feeds it from its own bounded queues), so the first images
register while videos are still being cut.

Keys: payloads carry V7 *storage keys* (Azure: ``container/blob``); uploads go to *provider
keys* (Azure: the blob name). ``KeyMap`` converts between the two for one source.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ingest.errors import ObjectNotFound, SourceError
from ingest.media import MediaError
from ingest.media.thumbnail import thumbnail_key
from ingest.model import ItemPlan, Media
from ingest.sources import Source

log = logging.getLogger("ingest.media")

DEFAULT_ARTIFACT_PREFIX = "thumbnails"
THUMBNAIL_KIND = "thumbnail/v1"
UPLOAD_KIND = "upload/v1"


class MediaCache(Protocol):
    """Where finished media results are remembered (the ledger)."""

    def object_meta(self, key: str) -> tuple[str, int]: ...
    def cached_media(self, bucket: str, key: str, etag: str, kind: str) -> Any: ...
    def cache_media(self, bucket: str, key: str, etag: str, kind: str, result: Any) -> None: ...


class Thumbnailer(Protocol):
    async def make(self, data: bytes) -> Any: ...


class VideoCutter(Protocol):
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
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class KeyMap:
    """Storage keys (what V7 is told) vs provider keys (what the bucket API takes)."""

    storage_prefix: str  # source.storage_key("") : "container/" for Azure, "" otherwise

    @classmethod
    def of(cls, source: Source) -> KeyMap:
        return cls(source.storage_key(""))

    def to_storage(self, key: str) -> str:
        return self.storage_prefix + key

    def to_provider(self, storage_key: str) -> str:
        if self.storage_prefix and storage_key.startswith(self.storage_prefix):
            return storage_key[len(self.storage_prefix) :]
        return storage_key


def provider_artifact_prefix(configured: str, storage: dict[str, Any], provider: str) -> str:
    """The bucket prefix for thumbnails and video artifacts (a provider key prefix).

    ``configured`` wins; else the V7 storage configuration's ``prefix`` (where V7 itself would
    write thumbnails; for Azure its first segment is the container, dropped here because
    uploads go to the source's container); else ``thumbnails``."""
    prefix = configured.strip("/")
    if not prefix:
        prefix = str(storage.get("prefix") or "").strip("/")
        if provider == "azure":
            prefix = prefix.partition("/")[2]
    return prefix or DEFAULT_ARTIFACT_PREFIX


class SourceUploader:
    """The video pool's uploader: storage keys in, provider keys to the bucket."""

    def __init__(self, source: Source, keys: KeyMap) -> None:
        self._source = source
        self._keys = keys

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None:
        await self._source.upload(self._keys.to_provider(key), data, content_type, content_encoding)


@contextlib.contextmanager
def _bucket_errors(doing: str) -> Iterator[None]:
    """The bucket failing is never the object's fault: a MediaError that is not final, so the
    worker tries the item again later."""
    try:
        yield
    except ObjectNotFound:
        raise MediaError("object no longer in the bucket", final=False) from None
    except SourceError as e:
        raise MediaError(f"{doing}: {e}", final=False) from None


class MediaStage:
    """Prepares items that need media work. One instance per run; safe to call concurrently."""

    def __init__(
        self,
        source: Source,
        cache: MediaCache,
        *,
        artifact_prefix: str,
        storage_name: str,
        thumbnails: Thumbnailer | None,
        videos: VideoCutter | None,
        video_options: Any,
        max_image_bytes: int,
        temp_dir: Path | None = None,
        destination: Source | None = None,
    ) -> None:
        self.source = source
        # Where uploads go and what V7 reads: the source bucket itself, or for a local
        # directory the bucket of the storage configuration.
        self.destination = destination or source
        self.local = destination is not None and destination is not source
        self.cache = cache
        self.keys = KeyMap.of(self.destination)
        self.prefix = artifact_prefix
        self.storage_name = storage_name
        self.thumbnails = thumbnails
        self.videos = videos
        self.video_options = video_options
        self.max_image_bytes = max_image_bytes
        self.temp_dir = temp_dir
        self._bucket_id = f"{source.provider}:{source.bucket}"
        self._uploader = SourceUploader(self.destination, self.keys)

    async def prepare(self, item: ItemPlan) -> ItemPlan:
        """The item with every slot filled in (thumbnail keys and sizes, processed video
        slots), ``media`` cleared. Raises MediaError for a bad object: the caller records it."""
        payload = dict(item.payload)
        if "slots" in payload:
            slots = []
            for slot in payload["slots"]:
                slots.append(await self._slot(item, dict(slot)))
            payload["slots"] = slots
        else:
            payload = await self._slot(item, payload)
        return replace(item, payload=payload, media=Media.NONE, size_hint=0)

    async def _slot(self, item: ItemPlan, slot: dict[str, Any]) -> dict[str, Any]:
        kind = slot.get("type")
        if kind == "video" and item.media is Media.VIDEO:
            return await self._video(slot)
        # The key to read the file from: a local path, or the bucket key behind storage_key.
        key = str(slot["storage_key"]) if self.local else self.keys.to_provider(slot["storage_key"])
        if self.local:
            slot["storage_key"] = await self._upload_original(key, str(slot.get("file_name", "")))
        if not item.readonly_endpoint:
            return slot
        if kind == "image":
            slot.update(await self._image(key))
            return slot
        raise MediaError(f"{kind} files cannot be registered through read-only storage")

    # --- images ----------------------------------------------------------------------------

    async def _image(self, key: str) -> dict[str, Any]:
        if self.thumbnails is None:
            raise MediaError("thumbnails are not available in this run")
        etag, size = self.cache.object_meta(key)
        cached = self.cache.cached_media(self._bucket_id, key, etag, THUMBNAIL_KIND)
        if isinstance(cached, dict):
            return cached
        if size > self.max_image_bytes:
            raise MediaError(
                f"image too large to thumbnail: {size:,} bytes (media.max_image_bytes)"
            )
        data = await self._read(key, size)
        thumb = await self.thumbnails.make(data)
        tkey = thumbnail_key(key, self.prefix)
        await self._upload(tkey, thumb.jpeg, "image/jpeg")
        result = {
            "storage_thumbnail_key": self.keys.to_storage(tkey),
            "height": int(thumb.height),
            "width": int(thumb.width),
        }
        self.cache.cache_media(self._bucket_id, key, etag, THUMBNAIL_KIND, result)
        return result

    async def _upload_original(self, key: str, file_name: str) -> str:
        """A local file into the bucket, under a key derived from its path (a re-run
        overwrites it); returns its storage key."""
        etag, _size = self.cache.object_meta(key)
        cached = self.cache.cached_media(self._bucket_id, key, etag, UPLOAD_KIND)
        if isinstance(cached, str):
            return cached
        name = file_name or key.rpartition("/")[2]
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        dest = f"{self.prefix}/files/{digest}/{name}"
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        with _bucket_errors("cannot upload to the bucket"):
            await self.destination.upload(dest, self.source_path(key), content_type)
        storage_key = self.keys.to_storage(dest)
        self.cache.cache_media(self._bucket_id, key, etag, UPLOAD_KIND, storage_key)
        return storage_key

    def source_path(self, key: str) -> Path:
        root = getattr(self.source, "root", None)
        if not isinstance(root, Path):
            raise MediaError("only a local directory source has files to upload")
        return root / key

    async def _read(self, key: str, size: int) -> bytes:
        if size <= 0:
            raise MediaError("empty object (0 bytes)")
        with _bucket_errors("cannot read the object"):
            return await self.source.read_range(key, 0, size)

    async def _upload(self, key: str, data: bytes, content_type: str) -> None:
        with _bucket_errors("cannot upload to the bucket"):
            await self.destination.upload(key, data, content_type)

    # --- videos ----------------------------------------------------------------------------

    async def _video(self, slot: dict[str, Any]) -> dict[str, Any]:
        if self.videos is None:
            raise MediaError("local video processing is not available in this run")
        from ingest.media.video import artifact_prefix

        storage_key = str(slot["storage_key"])
        key = storage_key if self.local else self.keys.to_provider(storage_key)
        etag, size = self.cache.object_meta(key)
        opts_kind = f"video/v1:{self.video_options!r}"
        cached = self.cache.cached_media(self._bucket_id, key, etag, opts_kind)
        if isinstance(cached, dict):
            return {**cached, "slot_name": slot["slot_name"], "file_name": slot["file_name"]}
        prefix = self.keys.to_storage(artifact_prefix(self.prefix, self.storage_name, key))
        work = Path(tempfile.mkdtemp(prefix="ingest-video-", dir=self.temp_dir))
        try:
            src = work / ("source" + Path(key).suffix.lower())
            with _bucket_errors("cannot download the video"):
                await self.source.download(key, src)
            with _bucket_errors("cannot upload video artifacts"):
                processed = await self.videos.process(
                    src,
                    prefix=prefix,
                    file_name=str(slot["file_name"]),
                    uploader=self._uploader,
                    # A local file is uploaded beside its artifacts; a bucket object stays put.
                    source_storage_key=None if self.local else storage_key,
                    size_bytes=size,
                    opts=self.video_options,
                )
        finally:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, work, True)
        processed["slot_name"] = slot["slot_name"]
        processed["file_name"] = slot["file_name"]
        self.cache.cache_media(self._bucket_id, key, etag, opts_kind, processed)
        return processed
