"""Planning stage: filters and plans each shard's pages, one stateful planner per shard."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ingest.model import Item, ObjectInfo, Skip
from ingest.planner import ShardPlanner
from ingest.providers import Page
from ingest.providers.fanout import ShardPage
from ingest.providers.globs import compile_filter

NOT_IN_MANIFEST = "not named in the manifest (plan.manifest)"


class Planning:
    """Filters and plans pages; a shard's planner holds the objects of an unfinished folder.

    Handed only what it uses: the include/exclude patterns and a planner factory (built from
    the ``[plan]`` section by ``ingest.planner.make_shard_planner``)."""

    def __init__(
        self,
        include: Sequence[str],
        exclude: Sequence[str],
        new_planner: Callable[[], ShardPlanner],
    ) -> None:
        self._filter = compile_filter(list(include), list(exclude))
        self.new_planner = new_planner
        self._planners: dict[str, ShardPlanner] = {}
        self.seen = 0  # objects handed to plan_page this pass
        self.filtered = 0  # of which source.include / exclude left out

    def plan_page(
        self, sp: ShardPage, manifest_keys: set[str] | None = None
    ) -> tuple[list[Item | Skip], str]:
        """Plans for one page and the checkpoint that is safe to store after it ("" = keep the
        previous one: the planner still holds objects of an unfinished folder).

        ``manifest_keys`` (manifest mode): the page's keys named in the manifest; they wait
        for the manifest's items (planned after the listing), every other key is skipped."""
        planner = self._planners.get(sp.shard.id)
        if planner is None:
            planner = self._planners[sp.shard.id] = self.new_planner()
        kept: list[ObjectInfo] = []
        plans: list[Item | Skip] = []
        self.seen += len(sp.page.objects)
        for obj in sp.page.objects:
            reason = self._filter(obj.key)
            if reason is not None:
                self.filtered += 1
            elif manifest_keys is not None:
                if obj.key in manifest_keys:
                    continue
                reason = NOT_IN_MANIFEST
            if reason is None:
                kept.append(obj)
            else:
                plans.append(Skip(obj, reason))
        plans.extend(planner.feed(kept))
        if sp.last:
            plans.extend(planner.finish())
            del self._planners[sp.shard.id]
            return plans, sp.page.checkpoint
        return plans, (sp.page.checkpoint if not planner.holding else "")


def empty_listing_warning(
    prefix: str,
    include: Sequence[str],
    exclude: Sequence[str],
    *,
    listed: int,
    planned_from: int,
    filtered: int,
) -> str | None:
    """Why a complete listing gave nothing to register, or None: the prefix listed nothing,
    or the patterns left out every object the planner saw (``planned_from``; a sync hands it
    only the new ones). Pure; the run still ends 0 — an empty prefix is not an error."""
    patterns = f"source.include = {list(include)}, source.exclude = {list(exclude)}"
    if listed == 0:
        return (
            f"the listing of prefix {prefix!r} found no objects ({patterns}): check "
            "source.bucket and source.prefix"
        )
    if planned_from > 0 and filtered == planned_from and (include or exclude):
        return (
            f"none of the {planned_from:,} objects listed under prefix {prefix!r} passed the "
            f"patterns ({patterns}): check the patterns (a pattern without '/' matches the "
            "file name, one with '/' the whole key)"
        )
    return None


def chunks(sp: ShardPage, size: int) -> list[ShardPage]:
    """A page as consecutive pieces; only the last carries the checkpoint and ``last``, so a
    crash between pieces resumes from the previous page and re-plans idempotently."""
    objs = sp.page.objects
    if len(objs) <= size:
        return [sp]
    out = []
    for i in range(0, len(objs), size):
        final = i + size >= len(objs)
        page = Page(objs[i : i + size], [], sp.page.checkpoint if final else "")
        out.append(ShardPage(sp.shard, page, sp.last and final))
    return out


def without_prefixes(sp: ShardPage, prefixes: tuple[str, ...]) -> tuple[ShardPage, int]:
    """The page without keys under ``prefixes`` (our artifacts, V7's thumbnails), and how
    many were dropped."""
    if not prefixes:
        return sp, 0
    kept = [o for o in sp.page.objects if not o.key.startswith(prefixes)]
    dropped = len(sp.page.objects) - len(kept)
    if not dropped:
        return sp, 0
    return ShardPage(sp.shard, Page(kept, sp.page.prefixes, sp.page.checkpoint), sp.last), dropped


def partition_events(
    objects: list[ObjectInfo], ignore_prefixes: tuple[str, ...], grouped: Callable[[str], bool]
) -> tuple[list[ObjectInfo], list[ObjectInfo], int]:
    """Objects reported by bucket events, in key order: (plan now, leave to the sync, how many
    are our own artifacts). A file of a multi-file item (DICOM series, folder slots) is left
    to the scheduled sync: events of one folder arrive over seconds, and an item planned from
    the first few would register without the rest (V7 items do not take slots later)."""
    objs = sorted(
        (o for o in objects if not o.key.startswith(ignore_prefixes)), key=lambda o: o.key
    )
    now: list[ObjectInfo] = []
    later: list[ObjectInfo] = []
    for o in objs:
        (later if grouped(o.key) else now).append(o)
    return now, later, len(objects) - len(objs)
