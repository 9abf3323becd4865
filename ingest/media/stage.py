"""The media stage: turns a planned item into one that can be sent.

Read-only images get their exact size and a thumbnail uploaded next to them; videos processed
locally get their artifacts cut by the ffmpeg pool and streamed to the bucket. The stage runs
beside registration (the pipeline feeds it from its own bounded queues), so the first images
register while videos are still being cut.

Keys: objects carry *provider keys* (what the bucket API takes); the facts written here carry
V7 *storage keys* (Azure: ``container/blob``), converted by ``KeyMap``.
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
from typing import TYPE_CHECKING, Any, Protocol

from ingest.errors import ObjectNotFound, SourceError
from ingest.media import MediaError
from ingest.media.thumbnail import thumbnail_key
from ingest.model import (
    ConvertedFacts,
    Facts,
    ImageFacts,
    Item,
    ItemType,
    Media,
    ObjectInfo,
    Slot,
    UploadFacts,
    VideoFacts,
)
from ingest.providers import Source
from ingest.registrar.wire import KeyMap

if TYPE_CHECKING:
    from ingest.media.convert import DicomConverter

log = logging.getLogger("ingest.media")

DEFAULT_ARTIFACT_PREFIX = "thumbnails"
THUMBNAIL_KIND = "thumbnail/v1"
UPLOAD_KIND = "upload/v1"


class MediaCache(Protocol):
    """Where finished media facts are remembered across runs (the ledger port)."""

    async def cached_facts(self, bucket: str, obj: ObjectInfo, kind: str) -> Facts | None: ...
    async def cache_facts(self, bucket: str, obj: ObjectInfo, kind: str, facts: Facts) -> None: ...


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
    ) -> VideoFacts: ...


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


@dataclass(frozen=True, slots=True)
class DicomOptions:
    """How read-only DICOM is converted (``media.dicom_fps``, ``plan.ignore_dicom_layout``)."""

    fps: float = 10.0
    ignore_layout: bool = False


class StageBucket:
    """The DICOM converter's view of the bucket: reads from the source, writes to the
    destination, bucket failures as retryable MediaErrors, storage keys for V7."""

    def __init__(self, source: Source, destination: Source, keys: KeyMap) -> None:
        self._source = source
        self._destination = destination
        self._keys = keys

    async def download(self, key: str, dest: Path) -> None:
        with _bucket_errors("cannot download the DICOM file"):
            await self._source.download(key, dest)

    async def upload(self, key: str, data: bytes | Path, content_type: str) -> None:
        with _bucket_errors("cannot upload to the bucket"):
            await self._destination.upload(key, data, content_type)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        with _bucket_errors("cannot read the DICOM file"):
            return await self._source.read_range(key, start, end)

    def to_storage(self, key: str) -> str:
        return self._keys.to_storage(key)


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
        dicom: DicomOptions | None = None,
    ) -> None:
        self.source = source
        # Where uploads go and what V7 reads: the source bucket itself, or for a local
        # directory the bucket of the storage configuration.
        self.destination = destination or source
        self.local = destination is not None and destination is not source
        self.cache = cache
        self.keys = KeyMap(self.destination.storage_key(""))
        self.prefix = artifact_prefix
        self.storage_name = storage_name
        self.thumbnails = thumbnails
        self.videos = videos
        self.video_options = video_options
        self.max_image_bytes = max_image_bytes
        self.temp_dir = temp_dir
        self._bucket_id = f"{source.provider}:{source.bucket}"
        self._uploader = SourceUploader(self.destination, self.keys)
        self.bucket = StageBucket(source, self.destination, self.keys)
        # Read-only DICOM is converted (V7 takes none there); None: DICOM goes as it is.
        self.dicom: DicomConverter | None = None
        if dicom is not None and thumbnails is not None:
            from ingest.media.convert import DicomConverter

            self.dicom = DicomConverter(
                thumbnails,  # type: ignore[arg-type]  # a ThumbnailPool: it has call()
                videos,
                self.bucket,
                self._uploader,
                prefix=artifact_prefix,
                storage_name=storage_name,
                video_options=video_options,
                fps=dicom.fps,
                ignore_layout=dicom.ignore_layout,
                temp_dir=temp_dir,
                max_bytes=max_image_bytes,
            )

    async def prepare(self, item: Item) -> Item:
        """The item with the media facts of every slot (uploads, thumbnails and sizes,
        processed videos), ``media`` cleared. Raises MediaError for a bad object."""
        slots = tuple([await self._slot(item, slot) for slot in item.slots])
        return replace(item, slots=slots, media=Media.NONE)

    async def _slot(self, item: Item, slot: Slot) -> Slot:
        if slot.type is ItemType.DICOM and self.dicom is not None and item.readonly_endpoint:
            return await self._dicom(slot)
        if slot.type is ItemType.VIDEO and item.media is Media.VIDEO:
            return replace(slot, facts=(await self._video(slot.obj),))
        facts: list[Facts] = []
        if self.local:
            facts += [await self._upload_original(o) for o in slot.objects]
        if item.readonly_endpoint:
            if slot.type is not ItemType.IMAGE:
                raise MediaError(
                    f"{slot.type} files cannot be registered through read-only storage"
                )
            facts.append(await self._image(slot.obj))
        return replace(slot, facts=tuple(facts)) if facts else slot

    # --- images ----------------------------------------------------------------------------

    async def _image(self, obj: ObjectInfo) -> ImageFacts:
        if self.thumbnails is None:
            raise MediaError("thumbnails are not available in this run")
        cached = await self.cache.cached_facts(self._bucket_id, obj, THUMBNAIL_KIND)
        if isinstance(cached, ImageFacts):
            return cached
        if obj.size > self.max_image_bytes:
            raise MediaError(
                f"image too large to thumbnail: {obj.size:,} bytes (media.max_image_bytes)"
            )
        data = await self._read(obj)
        thumb = await self.thumbnails.make(data)
        tkey = thumbnail_key(obj.key, self.prefix)
        await self._upload(tkey, thumb.jpeg, "image/jpeg")
        facts = ImageFacts(int(thumb.width), int(thumb.height), self.keys.to_storage(tkey))
        await self.cache.cache_facts(self._bucket_id, obj, THUMBNAIL_KIND, facts)
        return facts

    async def _upload_original(self, obj: ObjectInfo) -> UploadFacts:
        """A local file into the bucket, under a key derived from its path (a re-run
        overwrites it)."""
        cached = await self.cache.cached_facts(self._bucket_id, obj, UPLOAD_KIND)
        if isinstance(cached, UploadFacts):
            return cached
        name = obj.key.rpartition("/")[2]
        digest = hashlib.sha256(obj.key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        dest = f"{self.prefix}/files/{digest}/{name}"
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        with _bucket_errors("cannot upload to the bucket"):
            await self.destination.upload(dest, self.source_path(obj.key), content_type)
        facts = UploadFacts(self.keys.to_storage(dest))
        await self.cache.cache_facts(self._bucket_id, obj, UPLOAD_KIND, facts)
        return facts

    def source_path(self, key: str) -> Path:
        root = getattr(self.source, "root", None)
        if not isinstance(root, Path):
            raise MediaError("only a local directory source has files to upload")
        return root / key

    async def _read(self, obj: ObjectInfo) -> bytes:
        if obj.size <= 0:
            raise MediaError("empty object (0 bytes)")
        with _bucket_errors("cannot read the object"):
            return await self.source.read_range(obj.key, 0, obj.size)

    async def _upload(self, key: str, data: bytes, content_type: str) -> None:
        with _bucket_errors("cannot upload to the bucket"):
            await self.destination.upload(key, data, content_type)

    # --- read-only DICOM ---------------------------------------------------------------------

    async def _dicom(self, slot: Slot) -> Slot:
        """A DICOM slot converted (or its conversion from the cache, for the same object
        versions and options): an image slot (the PNG) or a video slot (the series)."""
        from ingest.media.convert import converted_slot, layout

        assert self.dicom is not None
        kind = self.dicom.kind(slot)
        cached = await self.cache.cached_facts(self._bucket_id, slot.obj, kind)
        if isinstance(cached, ConvertedFacts):
            facts = cached
        else:
            facts = await self.dicom.convert(slot)
            await self.cache.cache_facts(self._bucket_id, slot.obj, kind, facts)
        return converted_slot(slot, facts, layout(slot, self.prefix, self.storage_name))

    # --- videos ----------------------------------------------------------------------------

    async def _video(self, obj: ObjectInfo) -> VideoFacts:
        if self.videos is None:
            raise MediaError("local video processing is not available in this run")
        from ingest.media.video import artifact_prefix

        key = obj.key
        kind = f"video/v1:{self.video_options!r}"
        cached = await self.cache.cached_facts(self._bucket_id, obj, kind)
        if isinstance(cached, VideoFacts):
            return cached
        prefix = self.keys.to_storage(artifact_prefix(self.prefix, self.storage_name, key))
        file_name = key.rpartition("/")[2]
        work = Path(tempfile.mkdtemp(prefix="ingest-video-", dir=self.temp_dir))
        try:
            src = work / ("source" + Path(key).suffix.lower())
            with _bucket_errors("cannot download the video"):
                await self.source.download(key, src)
            with _bucket_errors("cannot upload video artifacts"):
                facts = await self.videos.process(
                    src,
                    prefix=prefix,
                    file_name=file_name,
                    uploader=self._uploader,
                    # A local file is uploaded beside its artifacts; a bucket object stays put.
                    source_storage_key=None if self.local else self.keys.to_storage(key),
                    size_bytes=obj.size,
                    opts=self.video_options,
                )
        finally:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, work, True)
        await self.cache.cache_facts(self._bucket_id, obj, kind, facts)
        return facts
