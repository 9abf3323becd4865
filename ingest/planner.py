"""From listed objects to dataset items — pure: no I/O, no clock, deterministic.

The same key always plans to the same ``(path, name)``: that identity is what makes re-runs and
crash recovery safe. One ``ShardPlanner`` per listing shard, fed pages in key order.

Grouping (multi-slot folders, DICOM series) holds a folder's objects until the listing has moved
past the folder: all keys under ``a/b/`` are contiguous in key order, so only the chain of
ancestor folders of the current key is ever held, and memory stays bounded.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ingest.config import Config, PlanConfig
from ingest.model import Item, ItemType, Media, ObjectInfo, Skip, Slot

# What darwin-py accepts (darwin/datatypes.py: SUPPORTED_IMAGE/VIDEO_EXTENSIONS), lower-cased,
# plus mkv/hevc/m4v which V7's video pipeline reads. Matching is case-insensitive.
IMAGE_EXTENSIONS = frozenset(
    {
        ".png",
        ".jpeg",
        ".jpg",
        ".jfif",
        ".jpe",
        ".tif",
        ".tiff",
        ".bmp",
        ".svs",
        ".webp",
        ".ndpi",
        ".rvg",
        ".qoi",
        ".gif",  # not in darwin-py's list; registered as an image (its first frame)
    }
)
VIDEO_EXTENSIONS = frozenset({".avi", ".bpm", ".mov", ".mp4", ".mkv", ".hevc", ".m4v"})
PDF_EXTENSIONS = frozenset({".pdf"})
DICOM_EXTENSIONS = frozenset({".dcm"})
MAX_DICOM_SLICES = 10_000

ROOT_ITEM_NAME = "root"  # name of a folder item made from files directly under the prefix


def file_type(key: str) -> ItemType | None:
    ext = posixpath.splitext(key)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return ItemType.IMAGE
    if ext in VIDEO_EXTENSIONS:
        return ItemType.VIDEO
    if ext in PDF_EXTENSIONS:
        return ItemType.PDF
    if ext in DICOM_EXTENSIONS:
        return ItemType.DICOM
    return None


def join_path(*parts: str) -> str:
    """A dataset folder path: leading '/', no trailing '/', no empty segments."""
    segs = [s for p in parts for s in p.split("/") if s]
    return "/" + "/".join(segs)


def request_options(plan: PlanConfig) -> dict[str, Any] | None:
    return {"ignore_dicom_layout": True} if plan.ignore_dicom_layout else None


def _fps(plan: PlanConfig) -> float | int | str:
    if plan.fps == "native":
        return "native"
    v = float(plan.fps)
    return int(v) if v.is_integer() else v


@dataclass
class _Group:
    folder: str  # the folder's key prefix, "" or ending in "/"
    members: list[tuple[ObjectInfo, ItemType]] = field(default_factory=list)
    overflow: bool = False


class ShardPlanner:
    """Plans one shard's objects, fed in key order page by page."""

    def __init__(
        self,
        plan: PlanConfig,
        *,
        readonly: bool = False,
        strip: str = "",
        video_local: bool = False,
        local_files: bool = False,
    ) -> None:
        self.plan = plan
        self.readonly = readonly
        self.strip = strip
        # Videos are cut locally with ffmpeg and registered through the read-only endpoint
        # (always so on read-only storage, where V7 cannot write its own artifacts).
        self.video_local = video_local or readonly or local_files
        # Files from a local directory are uploaded to the bucket before registration.
        self.local_files = local_files
        self._stack: list[_Group] = []
        self._fps = _fps(plan)

    @property
    def holding(self) -> bool:
        """True while objects of an unfinished folder are held (not yet emitted)."""
        return bool(self._stack)

    # --- naming ---------------------------------------------------------------------------

    def _rel(self, key: str) -> str:
        return key[len(self.strip) :] if self.strip and key.startswith(self.strip) else key

    def _folder_path(self, rel_folder: str) -> str:
        if not self.plan.preserve_folders:
            return join_path(self.plan.root_path)
        return join_path(self.plan.root_path, rel_folder)

    def path_name(self, key: str) -> tuple[str, str]:
        rel = self._rel(key)
        folder, _, name = rel.rpartition("/")
        return self._folder_path(folder), name

    # --- feeding --------------------------------------------------------------------------

    def feed(self, objs: Iterable[ObjectInfo]) -> list[Item | Skip]:
        out: list[Item | Skip] = []
        for obj in objs:
            self._close_until(obj.key, out)
            self._one(obj, out)
        return out

    def finish(self) -> list[Item | Skip]:
        out: list[Item | Skip] = []
        while self._stack:
            self._emit_group(self._stack.pop(), out)
        return out

    def _close_until(self, key: str, out: list[Item | Skip]) -> None:
        while self._stack and not key.startswith(self._stack[-1].folder):
            self._emit_group(self._stack.pop(), out)

    def _reject(self, obj: ObjectInfo, t: ItemType | None) -> str | None:
        if obj.key.endswith("/"):
            return "folder marker"
        if obj.key.startswith("/"):
            return "key starts with '/': V7 storage keys cannot"
        if t is None:
            ext = posixpath.splitext(obj.key)[1]
            return f"unsupported file type '{ext}'" if ext else "no file extension"
        if obj.size == 0:
            return "empty object (0 bytes)"
        if self.readonly and t is ItemType.PDF:
            return "read-only storage: PDFs need page sections (not supported yet)"
        return None

    def grouped(self, key: str) -> bool:
        """True when ``key`` would be one file of a multi-file item (a folder's slots, a DICOM
        series): such an item can only be planned from the whole folder's listing."""
        return self._grouped(file_type(key))

    def _grouped(self, t: ItemType | None) -> bool:
        if self.plan.slots == "folder":
            return True
        return t is ItemType.DICOM and self.plan.dicom_series

    def _one(self, obj: ObjectInfo, out: list[Item | Skip]) -> None:
        t = file_type(obj.key)
        reason = self._reject(obj, t)
        if reason is not None:
            out.append(Skip(obj, reason))
            return
        assert t is not None
        if not self._grouped(t):
            out.append(self._single(obj, t))
            return
        folder = obj.key.rpartition("/")[0]
        folder = folder + "/" if folder else ""
        if not self._stack or self._stack[-1].folder != folder:
            self._stack.append(_Group(folder))
        g = self._stack[-1]
        limit = MAX_DICOM_SLICES if self.plan.slots != "folder" else self.plan.max_slots
        if g.overflow:
            out.append(Skip(obj, self._overflow_reason(limit)))
            return
        g.members.append((obj, t))
        if len(g.members) > limit:
            g.overflow = True
            out.extend(Skip(m, self._overflow_reason(limit)) for m, _t in g.members)
            g.members = []

    def _overflow_reason(self, limit: int) -> str:
        return f"folder has more than {limit} files for one item (plan.max_slots)"

    # --- items ------------------------------------------------------------------------------

    def _single(self, obj: ObjectInfo, t: ItemType) -> Item:
        path, name = self.path_name(obj.key)
        if t is ItemType.DICOM:
            return self._item(path, name, (self._slot(obj, t, "0"),), {t})
        if t is ItemType.VIDEO and self.video_local:
            # Cut locally: the media stage adds its VideoFacts; sent as a slot of its own.
            return self._item(path, name, (Slot(name, t, (obj,), name),), {t})
        fps = self._fps if t is ItemType.VIDEO else None
        slot = Slot(name, t, (obj,), name, fps=fps)
        return self._item(path, name, (slot,), {t}, compact=True)

    def _item(
        self,
        path: str,
        name: str,
        slots: tuple[Slot, ...],
        types: set[ItemType],
        *,
        compact: bool = False,
    ) -> Item:
        media = Media.NONE
        if ItemType.VIDEO in types and self.video_local:
            media = Media.VIDEO
        elif self.local_files:
            media = Media.UPLOAD
        elif ItemType.DICOM in types and self.readonly:
            # V7 takes no DICOM from read-only storage: the media stage converts it (and makes
            # the thumbnails of the item's other images on the way).
            media = Media.DICOM
        elif ItemType.IMAGE in types and self.readonly:
            media = Media.IMAGE
        return Item(
            path,
            name,
            slots,
            compact=compact,
            media=media,
            readonly_endpoint=self.readonly or media is Media.VIDEO,
        )

    def _slot(self, obj: ObjectInfo, t: ItemType, slot_name: str) -> Slot:
        return Slot(
            slot_name,
            t,
            (obj,),
            obj.key.rpartition("/")[2],
            fps=self._fps if t is ItemType.VIDEO and not self.video_local else None,
            extract_views=t is ItemType.DICOM and self.plan.extract_views and slot_name == "0",
        )

    def _emit_group(self, g: _Group, out: list[Item | Skip]) -> None:
        if not g.members:
            return
        rel_folder = self._rel(g.folder).rstrip("/")
        parent, _, base = rel_folder.rpartition("/")
        name = base or ROOT_ITEM_NAME
        path = self._folder_path(parent)
        slots: list[Slot] = []
        series: list[ObjectInfo] = []  # slices of one DICOM series share slot "0"
        used: set[str] = set()
        types: set[ItemType] = set()
        for m, t in g.members:
            types.add(t)
            if t is ItemType.DICOM and self.plan.dicom_series:
                if not series:
                    slots.append(self._slot(m, t, "0"))  # placeholder, filled in below
                series.append(m)
                continue
            slot_name = m.key.rpartition("/")[2]
            n = 1
            base_name = slot_name
            while slot_name in used or slot_name == "0":
                slot_name = f"{base_name}_{n}"
                n += 1
            used.add(slot_name)
            slots.append(self._slot(m, t, slot_name))
        if series:
            i = next(i for i, s in enumerate(slots) if s.name == "0")
            slots[i] = replace(slots[i], objects=tuple(series))
        out.append(self._item(path, name, tuple(slots), types))

    def manifest_item(
        self, item_name: str, rel_path: str, slots: list[tuple[str, ObjectInfo | None, str]]
    ) -> tuple[Item, str]:
        """One item of a user's manifest: ``slots`` are (slot_name, listed object or None, key).

        Returns the item and "" when it can be sent, or the item and the reason it cannot (a
        key missing from the bucket, an unsupported or empty file, a repeated slot name): the
        caller records it FAILED with that reason. Pure."""
        path = join_path(self.plan.root_path, rel_path)
        out: list[Slot] = []
        types: set[ItemType] = set()
        problems: list[str] = []
        seen: set[str] = set()
        for slot_name, obj, key in slots:
            if slot_name in seen:
                problems.append(f"slot name '{slot_name}' used twice")
            seen.add(slot_name)
            info = obj or ObjectInfo(key, 0)
            t = file_type(key)
            reason = "not in the bucket listing" if obj is None else self._reject(info, t)
            if reason is not None:
                problems.append(f"{key}: {reason}")
            t = t or ItemType.IMAGE
            types.add(t)
            out.append(self._slot(info, t, slot_name))
        item = self._item(path, item_name, tuple(out), types)
        return item, "; ".join(problems)[:500]


def collision(item: Item, recorded_keys: tuple[str, ...]) -> list[Skip]:
    """The policy for an item whose (path, name) is already recorded with other keys (e.g.
    ``preserve_folders = false`` with one file name in two folders): the objects that are not
    part of the recorded item are skipped with a reason that says what to change. Pure."""
    known = set(recorded_keys)
    where = item.path.rstrip("/") + "/" + item.name
    other = recorded_keys[0] if recorded_keys else ""
    reason = (
        f"name collision: item '{where}' already comes from '{other}' (rename one, or "
        "change plan.preserve_folders / plan.slots)"
    )[:300]
    return [Skip(o, reason) for s in item.slots for o in s.objects if o.key not in known]


def plan_manifest_item(
    planner: ShardPlanner,
    item_name: str,
    rel_path: str,
    slots: list[tuple[str, ObjectInfo | None, str]],
) -> tuple[Item, str]:
    """See ``ShardPlanner.manifest_item``."""
    return planner.manifest_item(item_name, rel_path, slots)


def video_local(cfg: Config, readonly: bool) -> bool:
    """Are videos cut locally? Always on read-only storage; on read-write when configured."""
    mode = cfg.media.video_processing
    return readonly or mode == "local" or cfg.source.provider == "local"


def make_shard_planner(cfg: Config, readonly: bool) -> ShardPlanner:
    return ShardPlanner(
        cfg.plan,
        readonly=readonly,
        strip=cfg.strip,
        video_local=video_local(cfg, readonly),
        local_files=cfg.source.provider == "local",
    )
