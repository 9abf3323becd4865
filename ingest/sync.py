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

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, Union

from ingest.ledger.port import Known
from ingest.model import Item, ObjectInfo


@dataclass
class PageDiff:
    new: list[ObjectInfo] = field(default_factory=list)
    changed: list[ObjectInfo] = field(default_factory=list)  # new ETag, not reported before
    still_changed: int = 0  # changed, already reported by an earlier sync
    reappeared: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    unchanged: int = 0


# What the merge asks of the ledger while it runs (answered by ``ingest.run.merge``).
@dataclass(frozen=True, slots=True)
class NeedKnown:
    """The next chunk of this shard's ledger keys from ``start`` (answer: list[Known], [] at
    the end)."""

    start: str
    inclusive: bool


@dataclass(frozen=True, slots=True)
class NeedLookup:
    """One key listed out of order (answer: Known | None)."""

    key: str


@dataclass(frozen=True, slots=True)
class FlushVanished:
    """Record these keys as vanished now, to keep memory bounded (answer: None)."""

    keys: list[str]


Need = Union[NeedKnown, NeedLookup, FlushVanished]  # noqa: UP007 (a runtime alias)
Steps = Generator[Need, Any, PageDiff]


class ShardMerge:
    """Merge one shard's listing pages with the ledger's keys of the same shard.

    Pure and I/O-free: ``steps(page, last)`` is a generator that yields what it needs from the
    ledger (``NeedKnown``, ``NeedLookup``, ``FlushVanished``) and returns the page's
    ``PageDiff``; the caller answers each request (the sync stage does it with the async ledger
    port; tests with plain dicts). Only one chunk of ledger keys is held at a time.
    ``resume_after``: the shard's listing restarts after this key (its checkpoint), so ledger
    keys up to it were merged by the interrupted sync and are not called vanished; keys after
    it that are not listed now are.
    """

    def __init__(self, *, resume_after: str | None = None, max_pending: int = 1000) -> None:
        self._max_pending = max_pending
        self._buf: deque[Known] = deque()
        self._cursor = resume_after or ""
        self._inclusive = resume_after is None
        self._exhausted = False
        self._last_listed = ""

    def _head(self) -> Generator[Need, Any, Known | None]:
        if not self._buf and not self._exhausted:
            rows: list[Known] = yield NeedKnown(self._cursor, self._inclusive)
            if not rows:
                self._exhausted = True
            else:
                self._buf.extend(rows)
                self._cursor, self._inclusive = rows[-1].key, False
        return self._buf[0] if self._buf else None

    def steps(self, objects: list[ObjectInfo], last: bool) -> Steps:
        diff = PageDiff()
        for obj in objects:
            if obj.key < self._last_listed:
                # Out of order: look it up; if it was passed over on this page, it is not gone.
                if obj.key in diff.vanished:
                    diff.vanished.remove(obj.key)
                found: Known | None = yield NeedLookup(obj.key)
                self._classify(obj, found, diff)
                continue
            self._last_listed = obj.key
            while (head := (yield from self._head())) is not None and head.key < obj.key:
                yield from self._pass_over(head, diff)
            if head is not None and head.key == obj.key:
                self._classify(obj, head, diff)
                self._buf.popleft()
            else:
                diff.new.append(obj)
        if last:
            while (head := (yield from self._head())) is not None:
                yield from self._pass_over(head, diff)
        return diff

    def _pass_over(self, head: Known, diff: PageDiff) -> Generator[Need, Any, None]:
        """The ledger's head key was not listed: vanished (flushed in bounded chunks, so a
        deleted folder of a million keys never sits in memory)."""
        self._buf.popleft()
        if not head.vanished:
            diff.vanished.append(head.key)
            if len(diff.vanished) >= self._max_pending:
                yield FlushVanished(diff.vanished)
                diff.vanished = []

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


def as_new_version(item: Item, etag: str) -> Item | None:
    """A single-object item renamed to its versioned name; None for a multi-object item (a
    slot of a folder item or a DICOM series cannot be re-registered alone)."""
    if len(item.keys) != 1:
        return None
    return replace(item, name=versioned_name(item.name, etag))
