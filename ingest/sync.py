"""`ingest sync`: the listing and the ledger as two key-ordered streams, merged page by page.

A sync costs one listing plus work proportional to what changed: a known, unchanged object is
neither looked up one by one nor written; the ledger is read in key order beside the listing
(one range read per shard, never a set in memory). Per listed page the merge says which objects
are new (planned and registered), which changed (a new ETag: reported, or registered again
under a versioned name), which came back, and which ledger keys the listing passed over
(vanished: reported, never deleted in V7).

Providers list in code-point order of the key and SQLite compares UTF-8 bytes, which is the same
order. Should a listing still step backwards (an emulator's UTF-16 order, say), that key is
looked up on its own; a key wrongly passed over as vanished is taken back if still pending on
the page, or cleared (reappeared) if it was already written.

A known object that was never planned (a run stopped while the planner held the start of its
DICOM series or folder item) goes back to the planner as new, so the item is planned whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ingest.ledger import Known
from ingest.model import ItemPlan, ObjectInfo


@dataclass
class PageDiff:
    new: list[ObjectInfo] = field(default_factory=list)
    changed: list[ObjectInfo] = field(default_factory=list)  # new ETag, not reported before
    still_changed: int = 0  # changed, already reported by an earlier sync
    reappeared: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    unchanged: int = 0


class ShardMerge:
    """Merge one shard's listing pages with the ledger's keys of the same shard.

    ``known_from(start)`` streams the ledger's objects of this shard in key order from
    ``start`` (inclusive); ``lookup(key)`` finds one key (only for out-of-order listings).
    ``resume_after``: the shard's listing restarts after this key (its checkpoint), so ledger
    keys up to it were merged by the interrupted sync and are not called vanished; keys after
    it that are not listed now are.
    """

    def __init__(
        self,
        known_from: Callable[[str], Iterator[Known]],
        lookup: Callable[[str], Known | None],
        *,
        resume_after: str | None = None,
        flush_vanished: Callable[[list[str]], None] | None = None,
        max_pending: int = 1000,
    ) -> None:
        self._flush = flush_vanished
        self._max_pending = max_pending
        self._known_from = known_from
        self._lookup = lookup
        self._resume_after = resume_after
        self._known: Iterator[Known] | None = None
        self._head: Known | None = None
        self._last_listed = ""

    def _start(self) -> None:
        after = self._resume_after
        self._known = self._known_from(after or "")
        self._head = next(self._known, None)
        while after is not None and self._head is not None and self._head.key <= after:
            self._head = next(self._known, None)

    def _advance(self) -> None:
        assert self._known is not None
        self._head = next(self._known, None)

    def page(self, objects: list[ObjectInfo], last: bool) -> PageDiff:
        diff = PageDiff()
        for obj in objects:
            if self._known is None:
                self._start()
            if obj.key < self._last_listed:
                # Out of order: look it up; if it was passed over on this page, it is not gone.
                if obj.key in diff.vanished:
                    diff.vanished.remove(obj.key)
                self._classify(obj, self._lookup(obj.key), diff)
                continue
            self._last_listed = obj.key
            while self._head is not None and self._head.key < obj.key:
                self._pass_over(diff)
            if self._head is not None and self._head.key == obj.key:
                self._classify(obj, self._head, diff)
                self._advance()
            else:
                diff.new.append(obj)
        if last:
            if self._known is None:
                self._start()
            while self._head is not None:
                self._pass_over(diff)
        return diff

    def _pass_over(self, diff: PageDiff) -> None:
        """The ledger's head key was not listed: vanished (flushed in bounded chunks, so a
        deleted folder of a million keys never sits in memory)."""
        assert self._head is not None
        if not self._head.vanished:
            diff.vanished.append(self._head.key)
            if self._flush is not None and len(diff.vanished) >= self._max_pending:
                self._flush(diff.vanished)
                diff.vanished = []
        self._advance()

    @staticmethod
    def _classify(obj: ObjectInfo, known: Known | None, diff: PageDiff) -> None:
        if known is None:
            diff.new.append(obj)
            return
        if known.vanished:
            diff.reappeared.append(obj.key)
        if known.unplanned:  # a stopped run held it in the planner: plan it now
            diff.new.append(obj)
            return
        if not obj.etag or not known.etag or obj.etag == known.etag:
            diff.unchanged += 1
        elif obj.etag == known.changed_etag:
            diff.still_changed += 1
        else:
            diff.changed.append(obj)


def versioned_name(name: str, etag: str) -> str:
    """The deterministic name of a changed object's new version: ``photo.jpg`` with ETag
    ``9b2cf5…`` → ``photo.v9b2cf535.jpg``. The same version always gets the same name, so a
    re-run of the same sync registers it once."""
    tag = "".join(c for c in etag.lower() if c.isalnum())[:8] or "new"
    p = PurePosixPath(name)
    return f"{p.stem}.v{tag}{p.suffix}" if p.suffix else f"{name}.v{tag}"


def as_new_version(plan: ItemPlan, etag: str) -> ItemPlan | None:
    """A single-object plan renamed to its versioned name; None for a multi-object item (a
    slot of a folder item or a DICOM series cannot be re-registered alone)."""
    if len(plan.keys) != 1:
        return None
    name = versioned_name(plan.name, etag)
    payload = dict(plan.payload)
    payload["name"] = name
    return ItemPlan(
        plan.path,
        name,
        payload,
        plan.keys,
        extra=plan.extra,
        media=plan.media,
        readonly_endpoint=plan.readonly_endpoint,
    )
