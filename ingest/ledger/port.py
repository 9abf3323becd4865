"""The ledger port: everything the engine asks of its memory, named by intent.

Every caller (pipeline stages, sync, worker, status, report, retry) goes through ``LedgerPort``;
a backend implements it. Two are planned: SQLite (one machine, the default: ``sqlite.py``) and
PostgreSQL (several processes share one job). The port is shaped for the second one too:

- writes are *batched* (a page, a batch of outcomes) so one call is one transaction;
- long reads are *chunked* (``limit`` + a key to continue after), never a cursor left open;
- the domain policy a write needs (what a name collision means) is passed in as a pure
  function, so SQL never decides it;
- several processes on one job (``cooperative`` backends, PostgreSQL): a process ``join``s
  with a holder name and gets a fencing token; the shards it lists, the items it plans and
  the items it recovers (``pending``) are *claimed* with that token for ``ttl_s``
  (``renew_claims`` extends them); every write to claimed work checks the token and raises
  ``ClaimLost`` when another process took the work over after the claim expired. A
  non-cooperative backend (SQLite) keeps one process per job with the job lease, and its
  claim methods are trivial.

Errors: a backend raises ``ingest.errors.LedgerError`` (terminal: the message says what to fix)
for a ledger it cannot open or use, never its driver's exception; ``LedgerBusy`` (a
``LedgerError`` with ``retryable = True``) when another process kept it locked too long.

Batched reads (``known``, ``item_states``, ``object_infos``, ``in_manifest``) take any number
of keys and leave out the ones the ledger does not hold.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest.model import Facts, Item, Media, ObjectInfo, Outcome, Skip, State

Ident = tuple[str, str]  # an item's (path, name)

# (item planned now, the keys of the item already recorded under the same (path, name)) ->
# the skips to record for the new item's objects (the planner's collision policy). Called only
# when the new item has keys the recorded one lacks (a plain re-listing asks nothing); the
# skips apply to objects that are not already part of an item.
CollisionPolicy = Callable[[Item, tuple[str, ...]], list[Skip]]

# What a process may do (``worker.roles``).
ROLES = frozenset(("list", "media", "send"))


# The shard id of pages that are not the listing's (bucket events): no continuation is kept
# for it, and a cooperative ledger records its pages without a shard claim.
UNLISTED_SHARD = "events:"


def role_for(item: Item) -> str:
    """The role that works on an item next: "media" while it needs media work, else "send"."""
    return "send" if item.media is Media.NONE else "media"


@dataclass(frozen=True, slots=True)
class Known:
    """An object as the ledger last saw it: one side of the sync merge."""

    key: str
    etag: str
    changed_etag: str  # the new ETag a sync last reported (report mode), else ""
    vanished: bool
    # Listed but never planned: a run stopped while the planner held it (the rest of its
    # DICOM series or folder item was on the next page). The merge plans it again.
    unplanned: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    holder: str
    acquired_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: int
    resume_listing: bool


@dataclass(frozen=True, slots=True)
class Pending:
    """An item left PLANNED, PROCESSING or SENT, and how often it was sent before."""

    item: Item
    attempts: int


@dataclass(frozen=True, slots=True)
class ReportRow:
    key: str
    state: str
    item_path: str
    item_name: str
    v7_id: str
    reason: str
    etag: str
    size: int
    sync: str = ""  # "vanished", "changed (etag …)" or "" (as listed last time)
    converted: str = ""  # read-only DICOM: the storage key made of it (and its video section)


@dataclass
class Status:
    """What `ingest status` shows. ``last_runs``: newest first, one dict per run with "id",
    "kind", "status", "counts" (the run's figures), "started_at" / "finished_at" (ISO 8601
    UTC, to the second; finished_at None while running) and "started_at_s" / "finished_at_s"
    (the same instants as Unix seconds, float, at the ledger's full resolution: durations and
    rates are computed from these, a short run's duration is not rounded to 0 or 1 s)."""

    job: str
    objects_by_state: dict[str, int] = field(default_factory=dict)
    items_by_state: dict[str, int] = field(default_factory=dict)
    failures_by_reason: list[tuple[str, int]] = field(default_factory=list)
    last_runs: list[dict[str, Any]] = field(default_factory=list)
    changed_objects: int = 0
    vanished_objects: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "objects_by_state": self.objects_by_state,
            "items_by_state": self.items_by_state,
            "failures_by_reason": [{"reason": r, "count": n} for r, n in self.failures_by_reason],
            "last_runs": self.last_runs,
            "changed_objects": self.changed_objects,
            "vanished_objects": self.vanished_objects,
        }


@dataclass(frozen=True, slots=True)
class ManifestItem:
    name: str
    path: str
    slots: tuple[tuple[str, str], ...]  # (slot_name, key), in file order


class LedgerPort(Protocol):
    """One job's ledger. All methods are coroutines; none blocks the event loop."""

    job: str
    # True: several processes may work this job at once, through claims (``join``); False:
    # one process per job, under the job lease (``acquire_lease``).
    cooperative: bool

    async def close(self) -> None: ...

    # --- runs and listing checkpoints ----------------------------------------------------

    async def start_run(self, kind: str, *, listing: bool = True) -> RunInfo:
        """Record a run; mark earlier 'running' runs interrupted. Only a listing run touches
        the listing checkpoints (kept when the last listing did not complete: resume)."""
        ...

    async def finish_run(self, run_id: int, status: str, counts: dict[str, int]) -> None: ...

    async def mark_listing_complete(self) -> list[str]:
        """The listing is done. Cooperative: completed only by the last process to finish its
        shards, and that call alone returns every shard id the processes listed (the union:
        what a sync sweeps vanished folders from); else, and for SQLite, []."""
        ...

    async def checkpoints(self) -> dict[str, tuple[str, bool]]:
        """shard id -> (continuation, done) of an interrupted listing."""
        ...

    # --- listing -> items -----------------------------------------------------------------

    async def record_page(
        self,
        shard_id: str,
        checkpoint: str,
        shard_done: bool,
        objects: Sequence[ObjectInfo],
        plans: Sequence[Item | Skip],
        collision: CollisionPolicy,
    ) -> list[Item]:
        """One listed page, its plans and its checkpoint in ONE transaction; returns the items
        new to the ledger. ``checkpoint`` "" keeps the stored one. An item whose (path, name)
        is already recorded with other keys is not new: ``collision`` says what becomes of
        the objects that are not part of the recorded item."""
        ...

    async def add_failed_item(self, item: Item, reason: str) -> bool:
        """An item that can never be sent (a manifest key missing): FAILED, final. True when
        it is new."""
        ...

    def pending(self) -> AsyncGenerator[Pending, None]:
        """Items left PLANNED, PROCESSING or SENT (crash recovery), oldest first, streamed in
        chunks. Only items that existed when the stream started are returned, so items
        planned meanwhile are not seen twice."""
        ...

    # --- media -----------------------------------------------------------------------------

    async def mark_processing(self, item: Item) -> None: ...

    async def media_done(self, item: Item) -> None:
        """Store the item with its media facts: PLANNED, nothing left to do."""
        ...

    async def media_failed(self, item: Item, reason: str, *, final: bool) -> None: ...

    async def cached_facts(self, bucket: str, obj: ObjectInfo, kind: str) -> Facts | None:
        """Media facts made earlier for this exact object version (any job), or None."""
        ...

    async def cache_facts(self, bucket: str, obj: ObjectInfo, kind: str, facts: Facts) -> None: ...

    # --- sending ---------------------------------------------------------------------------

    async def mark_sent(self, items: Sequence[Item]) -> list[int]:
        """SENT and one more attempt each, committed before returning (before the POST).
        Returns each item's attempt count, in order (an item twice in the batch counts twice;
        one the ledger does not hold counts as a first attempt, 1)."""
        ...

    async def keep_claims(self, items: Sequence[Item]) -> None:
        """Right before each further request for items already marked SENT (a retry): our
        claims on them, checked and extended by the lease, or ``ClaimLost`` naming those no
        longer ours (expired or taken over) and nothing is sent. Trivial for SQLite."""
        ...

    async def unmark_sent(self, items: Sequence[Item]) -> None:
        """The request never reached V7 (a graceful stop while it waited for its slot, or it
        was answered only with 429s): take the attempt back (once per occurrence in
        ``items``). An item sent by an earlier run stays SENT, one never sent before (attempts
        back to 0) is PLANNED again; an item no longer SENT (an outcome came) is untouched."""
        ...

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None: ...

    async def set_v7_ids(self, ids: Sequence[tuple[Ident, str]]) -> None:
        """Fill in V7 ids learned later (items confirmed through ALREADY_EXISTS)."""
        ...

    async def note_id_misses(self, idents: Sequence[Ident]) -> None:
        """The items listing was searched for these and did not show them (one more miss)."""
        ...

    async def registered_without_id(self, limit: int) -> list[Ident]:
        """REGISTERED items without a V7 id that were not missed by lookups too often."""
        ...

    async def item_states(self, idents: Sequence[Ident]) -> dict[Ident, State]: ...

    # --- retry -------------------------------------------------------------------------------

    async def requeue_failed(self, blocked_reason: str | None = None) -> int: ...

    async def blocked_reasons(self) -> list[str]:
        """The distinct reasons of this job's BLOCKED items, sorted, each as stored (a
        combined one as "A,B"): what ``retry --blocked`` accepts. V7 may add reasons, and
        the registrar stores UNKNOWN when V7 gives none, so no fixed list can be the check."""
        ...

    async def requeue_due(self, is_due: Callable[[int, float], bool]) -> int:
        """FAILED items, not final and whose objects have not vanished, for which
        ``is_due(failures, failed_at)`` holds: back to PLANNED."""
        ...

    # --- sync: the ledger's side of the listing merge ------------------------------------

    async def known_range(
        self, prefix: str, recursive: bool, start: str, inclusive: bool, limit: int
    ) -> list[Known]:
        """Up to ``limit`` objects of one shard in key order from ``start`` (itself included
        when ``inclusive``; a ``start`` before ``prefix`` means from the first key under it):
        keys under ``prefix`` (``recursive``) or directly under it (sub-folders skipped by
        seeking). Fewer than ``limit`` means the shard has no more."""
        ...

    async def known(self, keys: Sequence[str]) -> dict[str, Known]: ...

    async def sub_folders(self, prefix: str) -> list[str]:
        """Distinct first-level folders under ``prefix`` that the ledger holds keys for."""
        ...

    async def record_sync_page(
        self,
        vanished: Sequence[str] = (),
        reappeared: Sequence[str] = (),
        changed: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Keys gone, keys back, (key, new etag) of changed objects; returns how many known
        objects were newly marked vanished."""
        ...

    async def mark_vanished_under(self, prefix: str) -> int: ...

    async def record_new_version(self, obj: ObjectInfo, item: Item) -> bool:
        """A changed object registered again as a new item; the object points at it."""
        ...

    async def item_key_count(self, key: str) -> int: ...

    # --- leases ------------------------------------------------------------------------------

    async def acquire_lease(
        self, holder: str, ttl_s: float, now: float, holder_dead: Callable[[str], bool]
    ) -> Lease | None:
        """Take or renew the job's lease; returns someone else's live lease instead."""
        ...

    async def renew_lease(self, holder: str, ttl_s: float, now: float) -> bool: ...

    async def release_lease(self, holder: str) -> None: ...

    # --- claims: several processes, one job (cooperative backends) ---------------------------

    async def join(self, holder: str, ttl_s: float, roles: frozenset[str] = ROLES) -> None:
        """Work beside other processes as ``holder`` (unique per process) with a new fencing
        token: from now on this handle claims what it lists, plans and recovers for ``ttl_s``,
        only work its ``roles`` allow, and fences its writes. Trivial for SQLite."""
        ...

    async def renew_claims(self) -> int:
        """Extend every claim still ours (and our run's heartbeat) to the ledger's own clock
        + ``ttl_s`` (never a machine's clock: machines disagree); returns how many claims
        were still ours."""
        ...

    async def reap_claims(self, holder_dead: Callable[[str], bool]) -> int:
        """Expire at once the claims of holders known dead (``holder_dead``), so their work
        need not wait for the lease; returns how many claims went."""
        ...

    async def release_claims(self, idents: Sequence[Ident] | None = None) -> None:
        """Give back our claims on these items (None: every claim of ours, the end of a pass):
        any process may take them at once."""
        ...

    async def register_shards(self, shard_ids: Sequence[str]) -> None:
        """The listing's shards as claimable rows (known ones kept, with their continuation)."""
        ...

    async def claim_shard(self) -> tuple[str, str] | None:
        """(shard id, continuation) of a shard not listed to the end and not claimed by a
        live process, now claimed by us; None when there is none."""
        ...

    async def outstanding(self) -> int:
        """Nonzero while a shard is not listed to the end, or an item is pending that we may
        yet do (within our roles) or another live process may (any role, while one runs): a
        cooperative pass waits meanwhile to take over what a dead process leaves. An item no
        live process has the role for is left to a later run (a lister never waits forever
        for a sender that has gone). Only ``== 0`` is meaningful."""
        ...

    # --- reading -----------------------------------------------------------------------------

    async def status(self, runs: int = 5) -> Status: ...

    async def jobs(self) -> list[str]:
        """Every job this store holds a run of, sorted: what `ingest status` names when the
        configured job is not among them (a changed prefix or bucket changes the job name)."""
        ...

    def report_rows(self) -> AsyncGenerator[ReportRow, None]:
        """One row per object in key order, streamed in chunks."""
        ...

    # --- manifests ---------------------------------------------------------------------------

    async def stage_manifest(self, rows: Iterable[tuple[str, str, str, str]]) -> int:
        """(item_name, slot_name, key, path) rows, read in the ledger's thread."""
        ...

    def manifest_items(self) -> AsyncGenerator[ManifestItem, None]:
        """Manifest items grouped by (path, name), slots in file order, streamed in chunks."""
        ...

    async def in_manifest(self, keys: Sequence[str]) -> set[str]: ...

    async def object_infos(self, keys: Sequence[str]) -> dict[str, ObjectInfo]: ...

    # --- operations --------------------------------------------------------------------------

    async def prune(self, state: State, before: float) -> int:
        """Delete this job's items in ``state`` last updated before ``before`` (epoch s), and
        their objects (``ingest ledger prune``); returns how many items went. What is pruned
        is forgotten: a later run or sync lists those objects as new again."""
        ...
