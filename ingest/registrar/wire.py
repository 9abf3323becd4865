"""V7's wire format, built in one place: typed items in, request JSON out.

The registrar and ``ingest plan`` both go through here, so what a dry run prints is exactly
what a run sends. Nothing before this edge holds a V7 dict (see ``ingest.model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ingest.model import Item, ItemType, Slot, VideoFacts

Ident = tuple[str, str]  # an item's (path, name), as V7 compares them


def norm_path(path: object) -> str:
    """A dataset folder as V7 compares it: leading slash, no trailing slash, "/" when empty."""
    p = str(path or "/").strip()
    if not p.startswith("/"):
        p = "/" + p
    return p.rstrip("/") or "/"


def item_key(path: object, name: object) -> Ident:
    """An item's identity as V7 compares it (answers may spell the path differently)."""
    return norm_path(path), str(name)


REGISTER = "register_existing"
REGISTER_READONLY = "register_existing_readonly"


@dataclass(frozen=True, slots=True)
class KeyMap:
    """Provider keys (what the bucket API takes) to storage keys (what V7 is told): Azure
    prefixes the container, S3 and GCS do not."""

    storage_prefix: str = ""  # source.storage_key("")

    def to_storage(self, key: str) -> str:
        return self.storage_prefix + key

    def to_provider(self, storage_key: str) -> str:
        if self.storage_prefix and storage_key.startswith(self.storage_prefix):
            return storage_key[len(self.storage_prefix) :]
        return storage_key


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: the team, dataset and storage configuration, request options."""

    team: str
    dataset_slug: str
    storage_slug: str
    options: dict[str, Any] | None = None


def endpoint(team: str, readonly: bool) -> str:
    """The path under ``{base}/api/`` of the register endpoint for a batch."""
    return f"v2/teams/{team}/items/{REGISTER_READONLY if readonly else REGISTER}"


def envelope(items: Sequence[Item], target: Target, keys: KeyMap) -> dict[str, Any]:
    body: dict[str, Any] = {
        "items": [item_json(i, keys) for i in items],
        "dataset_slug": target.dataset_slug,
        "storage_slug": target.storage_slug,
    }
    if target.options:
        body["options"] = target.options
    return body


def item_json(item: Item, keys: KeyMap) -> dict[str, Any]:
    if item.compact:
        slot = item.slots[0]
        out: dict[str, Any] = {
            "path": item.path,
            "type": str(slot.type),
            "storage_key": _storage_key(slot, 0, keys),
            "name": item.name,
        }
        if slot.fps is not None:
            out["fps"] = slot.fps
        _add_image(out, slot)
        return out
    return {
        "path": item.path,
        "name": item.name,
        "slots": [entry for s in item.slots for entry in _slot_json(s, keys)],
    }


def _storage_key(slot: Slot, i: int, keys: KeyMap) -> str:
    converted = slot.converted
    if converted is not None:  # read-only DICOM: V7 reads the PNG we made, not the .dcm
        return converted.storage_key
    uploaded = slot.uploaded
    return uploaded[i] if i < len(uploaded) else keys.to_storage(slot.objects[i].key)


def _add_image(out: dict[str, Any], slot: Slot) -> None:
    image = slot.image
    if image is not None:
        out["storage_thumbnail_key"] = image.thumbnail_key
        out["height"] = image.height
        out["width"] = image.width


def _slot_json(slot: Slot, keys: KeyMap) -> list[dict[str, Any]]:
    """One wire slot per object: a DICOM series repeats its slot name once per slice."""
    video = slot.video
    if video is not None:
        return [_video_json(slot, video)]
    out = []
    for i, obj in enumerate(slot.objects):
        entry: dict[str, Any] = {
            "slot_name": slot.name,
            "type": str(slot.type),
            "storage_key": _storage_key(slot, i, keys),
            "file_name": slot.file_name if len(slot.objects) == 1 else obj.key.rpartition("/")[2],
        }
        if slot.fps is not None:
            entry["fps"] = slot.fps
        if slot.extract_views:
            entry["extract_views"] = "true"
        _add_image(entry, slot)
        out.append(entry)
    return out


def _video_json(slot: Slot, v: VideoFacts) -> dict[str, Any]:
    """V7's ReadOnlyVideoSlot for a locally processed video (v7-contract.md)."""
    out: dict[str, Any] = {
        "slot_name": slot.name,
        "file_name": slot.file_name,
        "type": str(ItemType.VIDEO),
        "storage_key": v.storage_key,
        "width": v.width,
        "height": v.height,
        "native_fps": v.native_fps,
        "visible_frames": v.visible_frames,
        "total_frames": v.total_frames,
        "hls_segments": {
            "high_quality": {"index": v.high.index, "bitrate": v.high.bitrate},
            "low_quality": {"index": v.low.index, "bitrate": v.low.bitrate},
        },
        "storage_sections_key_prefix": v.sections_prefix,
        "storage_sections_key_extension": v.sections_extension,
        "storage_frames_manifest_key": v.frames_manifest_key,
        "storage_thumbnail_key": v.thumbnail_key,
    }
    if v.low_sections_prefix:
        out["storage_low_quality_sections_key_prefix"] = v.low_sections_prefix
    if v.audio_peaks_key:
        out["storage_audio_peaks_key"] = v.audio_peaks_key
    out["size_bytes"] = v.size_bytes
    return out


# Bytes of JSON around one wire slot beyond its strings: field names, quotes, numbers.
_SLOT_OVERHEAD = 160
_ITEM_OVERHEAD = 48


def approx_bytes(item: Item) -> int:
    """An upper estimate of the item's JSON size, for the batcher's byte limit, without
    building the JSON (storage keys may gain a container prefix: counted generously)."""
    n = _ITEM_OVERHEAD + len(item.path.encode()) + len(item.name.encode())
    for slot in item.slots:
        v = slot.video
        if v is not None:
            # Playlists: JSON escapes each newline as two bytes; names may be non-ASCII.
            for text in (v.high.index, v.low.index):
                n += len(text.encode()) + text.count("\n")
            n += 2 * _SLOT_OVERHEAD + len(slot.name.encode()) + len(slot.file_name.encode())
            n += 8 * (len(v.thumbnail_key.encode()) + 64)
            continue
        per = _SLOT_OVERHEAD + len(slot.name.encode()) + len(slot.file_name.encode())
        if slot.image is not None:
            per += len(slot.image.thumbnail_key.encode()) + 64
        if slot.converted is not None:
            per += len(slot.converted.storage_key.encode())
        for obj in slot.objects:
            n += per + 2 * len(obj.key.encode()) + 64
    return n
