"""Media stage: items that need thumbnails, uploads or video cutting go through bounded queues
to their workers, beside registration (the first items register while videos are cut)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from ingest.errors import ClaimLost, IngestError
from ingest.ledger import LedgerPort
from ingest.media import MediaError
from ingest.model import Item, Media
from ingest.stats import Stats

log = logging.getLogger("ingest.media")


class Prepare(Protocol):
    """The media stage (ingest.media.stage.MediaStage): raises MediaError for a bad object."""

    async def prepare(self, item: Item) -> Item: ...


class MediaWorkers:
    """One bounded queue and a pool of workers per kind (images and uploads; videos)."""

    def __init__(
        self,
        media: Prepare,
        ledger: LedgerPort,
        stats: Stats,
        *,
        image_workers: int,
        video_workers: int,
        ready: Callable[[Item], Awaitable[None]],
        stopped: Callable[[], bool],
        failed: Callable[[str], None],
        send_ready: bool = True,
    ) -> None:
        # send_ready False: a process without the "send" role leaves finished items to others
        self._send_ready = send_ready
        self.media = media
        self.ledger = ledger
        self.stats = stats
        self._ready = ready
        self._stopped = stopped
        self._failed = failed
        self._workers = {Media.IMAGE: max(1, image_workers), Media.VIDEO: max(1, video_workers)}
        self.queues: dict[Media, asyncio.Queue[Item | None]] = {
            kind: asyncio.Queue(2 * n) for kind, n in self._workers.items()
        }
        stats.queues.update(
            media_images=self.queues[Media.IMAGE].qsize,
            media_videos=self.queues[Media.VIDEO].qsize,
        )

    def start(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        return [
            tg.create_task(self._loop(kind), name=f"media-{kind}-{i}")
            for kind, n in self._workers.items()
            for i in range(n)
        ]

    async def put(self, item: Item) -> None:
        await self.queues[_queue(item)].put(item)

    async def close(self) -> None:
        for kind, n in self._workers.items():
            for _ in range(n):
                await self.queues[kind].put(None)

    async def _loop(self, kind: Media) -> None:
        queue = self.queues[kind]
        while (item := await queue.get()) is not None:
            if self._stopped():
                continue  # not started: stays PLANNED for the next run
            try:
                await self._work(item)
            except ClaimLost as e:  # another process took the item over: it is theirs
                log.warning(str(e), extra={"item": item.name})

    async def _work(self, item: Item) -> None:
        """One item's media work; ClaimLost when another process took it over."""
        await self.ledger.mark_processing(item)
        self.stats.processing += 1
        try:
            ready = await self.media.prepare(item)
        except MediaError as e:
            await self._fail(item, e.reason, final=e.final)
            return
        except IngestError as e:  # the bucket side (SourceRetryable, …): try again later
            await self._fail(item, f"storage error, retry later: {e}", final=False)
            return
        except Exception as e:  # a bug must not sink the run: record it, go on
            log.exception("media processing failed", extra={"item": item.name})
            await self._fail(item, f"internal error: {type(e).__name__}: {e}"[:300])
            return
        finally:
            self.stats.processing -= 1
        await self.ledger.media_done(ready)
        self.stats.media_done += 1
        if self._send_ready:
            await self._ready(ready)

    async def _fail(self, item: Item, reason: str, *, final: bool = False) -> None:
        await self.ledger.media_failed(item, reason, final=final)
        self._failed(reason)


# A single .dcm larger than this goes to the video workers: a slice is ~0.5 MiB (CT) to a few
# MiB (a radiograph), a multi-frame file (cine, ultrasound, enhanced CT) usually far larger,
# and it is encoded under a video permit: waited for in an image worker, it would hold up
# every image behind it.
DICOM_VIDEO_QUEUE_BYTES = 4 * 1024 * 1024


def _queue(item: Item) -> Media:
    """Which workers take the item: videos, DICOM series and large single DICOM files (cut by
    ffmpeg) go to the video workers; images, uploads of local files and small single DICOM
    files (one slice: a PNG) to the image workers. Pure: decided from the listing alone,
    before any header is read."""
    if item.media is Media.VIDEO:
        return Media.VIDEO
    if item.media is Media.DICOM and any(
        len(s.objects) > 1 or s.obj.size > DICOM_VIDEO_QUEUE_BYTES for s in item.slots
    ):
        return Media.VIDEO
    return Media.IMAGE
