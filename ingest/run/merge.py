"""Sync stage: the listing merged with the ledger page by page (``ingest.sync`` decides; this
module answers its questions through the ledger port and records what it found)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ingest.ledger import LedgerPort
from ingest.model import Item, ObjectInfo, Skip
from ingest.planner import ShardPlanner
from ingest.providers import Page, Shard, Source
from ingest.providers.fanout import ShardPage
from ingest.stats import Stats
from ingest.sync import NeedKnown, NeedLookup, PageDiff, ShardMerge, Steps, as_new_version

log = logging.getLogger("ingest.sync")

KNOWN_CHUNK = 1000


class SyncMerge:
    """Per shard, keeps only the listing's new objects; records changed, back and vanished."""

    def __init__(
        self,
        on_change: str,  # sync.on_change: "report" or "register"
        source: Source,
        ledger: LedgerPort,
        stats: Stats,
        new_planner: Callable[[], ShardPlanner],
        route: Callable[[Item], Awaitable[None]],
    ) -> None:
        self.on_change = on_change
        self.source = source
        self.ledger = ledger
        self.stats = stats
        self.new_planner = new_planner
        self.route = route
        self._merges: dict[str, ShardMerge] = {}

    async def page(self, sp: ShardPage, checkpoint: str | None) -> ShardPage:
        """The page with only its new objects (``checkpoint``: the shard's resume point)."""
        merge = self._merges.get(sp.shard.id)
        if merge is None:
            after = None if checkpoint is None else self.source.checkpoint_key(checkpoint)
            merge = self._merges[sp.shard.id] = ShardMerge(resume_after=after)
        diff = await self._drive(sp.shard, merge.steps(sp.page.objects, sp.last))
        if sp.last:
            del self._merges[sp.shard.id]
        await self._vanished(diff.vanished)
        register_again = self.on_change == "register"
        reported = [] if register_again else diff.changed
        await self.ledger.record_sync_page(
            reappeared=diff.reappeared, changed=[(o.key, o.etag) for o in reported]
        )
        self.stats.changed += len(diff.changed)
        if diff.changed or diff.reappeared:
            log.info(
                "sync: objects changed or back",
                extra={
                    "changed": len(diff.changed),
                    "reappeared": len(diff.reappeared),
                    "policy": self.on_change,
                    "example": (diff.changed or [ObjectInfo(k, 0) for k in diff.reappeared])[0].key,
                },
            )
        if register_again:
            await self._register_new_versions(diff.changed)
        if len(diff.new) == len(sp.page.objects):
            return sp
        return ShardPage(sp.shard, Page(diff.new, [], sp.page.checkpoint), sp.last)

    async def _drive(self, shard: Shard, steps: Steps) -> PageDiff:
        """Answer the merge's questions through the ledger port."""
        answer: Any = None
        try:
            while True:
                need = steps.send(answer)
                if isinstance(need, NeedKnown):
                    answer = await self.ledger.known_range(
                        shard.prefix, shard.recursive, need.start, need.inclusive, KNOWN_CHUNK
                    )
                elif isinstance(need, NeedLookup):
                    answer = (await self.ledger.known([need.key])).get(need.key)
                else:
                    await self._vanished(need.keys)
                    answer = None
        except StopIteration as done:
            diff: PageDiff = done.value
            return diff

    async def _vanished(self, keys: list[str]) -> None:
        if keys:
            self.stats.vanished += await self.ledger.record_sync_page(vanished=keys)

    async def _report_changed(self, obj: ObjectInfo, why: str) -> None:
        await self.ledger.record_sync_page(changed=[(obj.key, obj.etag)])
        log.warning(
            "changed object reported, not re-registered", extra={"key": obj.key, "why": why}
        )

    async def sweep_vanished_folders(self, shards: Sequence[Shard]) -> None:
        """Folders the ledger knows that no shard listed any more: every key under them is
        gone (their keys were never merged, since discovery found no such folder)."""
        prefixes = [s.prefix for s in shards if s.recursive or s.prefix]
        for shard in shards:
            if shard.recursive:
                continue
            for folder in await self.ledger.sub_folders(shard.prefix):
                if any(p.startswith(folder) for p in prefixes):
                    continue
                n = await self.ledger.mark_vanished_under(folder)
                self.stats.vanished += n
                if n:
                    log.info("sync: folder vanished", extra={"folder": folder, "objects": n})

    async def _register_new_versions(self, changed: Sequence[ObjectInfo]) -> None:
        """sync.on_change = "register": each changed object becomes a new item named after its
        new version; the old item stays in V7."""
        for obj in changed:
            planner = self.new_planner()
            if planner.grouped(obj.key) or await self.ledger.item_key_count(obj.key) > 1:
                # A slice of a DICOM series or a slot of a folder item: a lone new version
                # would be a one-slot item of its own, so it is only reported.
                await self._report_changed(obj, "part of a multi-file item")
                continue
            for p in [*planner.feed([obj]), *planner.finish()]:
                version = None if isinstance(p, Skip) else as_new_version(p, obj.etag)
                if version is None:
                    await self._report_changed(
                        obj, "part of a multi-file item or no longer planned"
                    )
                elif await self.ledger.record_new_version(obj, version):
                    self.stats.planned += 1
                    await self.route(version)
