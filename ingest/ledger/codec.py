"""How the ledger stores items and media facts: pure functions, bytes in and out.

Our own storage format (orjson, a dict tagged ``{"v": 2, ...}``), not V7's wire format: the
wire JSON is built elsewhere (``ingest.registrar.wire``) from the typed ``Item``.

Legacy rows (schema <= 4, written by the engine before typed items) stored the V7 wire JSON of
the item in ``items.payload`` and the provider keys in ``items.keys``; they are decoded here
lazily, when read (``item_from_legacy``), and rewritten in the new format the next time the
item is stored (``media_done``). Old media-cache values decode through ``facts_from_bytes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from ingest.model import (
    ConvertedFacts,
    Facts,
    ImageFacts,
    Item,
    ItemType,
    Media,
    ObjectInfo,
    Rendition,
    Slot,
    UploadFacts,
    VideoFacts,
)

FORMAT = 2  # the tag of the payloads written by this module ("v")
CONVERTED_MARK = b'"t":"converted"'  # in an item payload that holds converted DICOM


class CodecError(ValueError):
    """Bytes that are neither our format nor a legacy row we can read."""


# --- media facts ------------------------------------------------------------------------------


def _facts_dict(f: Facts) -> dict[str, Any]:
    if isinstance(f, ImageFacts):
        return {"t": "image", "width": f.width, "height": f.height, "thumbnail": f.thumbnail_key}
    if isinstance(f, UploadFacts):
        return {"t": "upload", "storage_key": f.storage_key}
    if isinstance(f, ConvertedFacts):
        return {
            "t": "converted",
            "storage_key": f.storage_key,
            "made": _facts_dict(f.made),
            "order": list(f.order),
            **({"left_out": [[i, r] for i, r in f.left_out]} if f.left_out else {}),
        }
    return {
        "t": "video",
        "storage_key": f.storage_key,
        "width": f.width,
        "height": f.height,
        "native_fps": f.native_fps,
        "visible_frames": f.visible_frames,
        "total_frames": f.total_frames,
        "high": [f.high.index, f.high.bitrate],
        "low": [f.low.index, f.low.bitrate],
        "sections_prefix": f.sections_prefix,
        "sections_extension": f.sections_extension,
        "frames_manifest": f.frames_manifest_key,
        "thumbnail": f.thumbnail_key,
        "size_bytes": f.size_bytes,
        "low_sections_prefix": f.low_sections_prefix,
        "audio_peaks": f.audio_peaks_key,
    }


def _facts_from_dict(d: Mapping[str, Any]) -> Facts:
    t = d["t"]
    if t == "image":
        return ImageFacts(int(d["width"]), int(d["height"]), str(d["thumbnail"]))
    if t == "upload":
        return UploadFacts(str(d["storage_key"]))
    if t == "converted":
        made = _facts_from_dict(d["made"])
        if not isinstance(made, ImageFacts | VideoFacts):
            raise CodecError(f"converted DICOM made {made!r}")
        return ConvertedFacts(
            str(d["storage_key"]),
            made,
            tuple(int(i) for i in d.get("order", ())),
            tuple((int(i), str(r)) for i, r in d.get("left_out", ())),
        )
    if t == "video":
        return VideoFacts(
            storage_key=str(d["storage_key"]),
            width=int(d["width"]),
            height=int(d["height"]),
            native_fps=float(d["native_fps"]),
            visible_frames=int(d["visible_frames"]),
            total_frames=int(d["total_frames"]),
            high=Rendition(str(d["high"][0]), float(d["high"][1])),
            low=Rendition(str(d["low"][0]), float(d["low"][1])),
            sections_prefix=str(d["sections_prefix"]),
            sections_extension=str(d["sections_extension"]),
            frames_manifest_key=str(d["frames_manifest"]),
            thumbnail_key=str(d["thumbnail"]),
            size_bytes=int(d["size_bytes"]),
            low_sections_prefix=str(d.get("low_sections_prefix", "")),
            audio_peaks_key=str(d.get("audio_peaks", "")),
        )
    raise CodecError(f"unknown media facts type {t!r}")


def facts_to_bytes(facts: Facts) -> bytes:
    """Media facts for the media cache."""
    return orjson.dumps({"v": FORMAT, **_facts_dict(facts)})


def facts_from_bytes(data: bytes) -> Facts:
    """Media facts from the media cache: our format, or a value the old engine cached (a
    thumbnail dict, an uploaded file's storage key, a processed V7 video slot)."""
    try:
        value = orjson.loads(data)
        if isinstance(value, dict) and value.get("v") == FORMAT:
            return _facts_from_dict(value)
        if isinstance(value, str):
            return UploadFacts(value)
        if isinstance(value, dict):
            facts = _legacy_slot_facts(value)
            if facts is not None:
                return facts
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise CodecError(f"unreadable media facts: {exc}") from None
    raise CodecError("unreadable media facts: unknown shape")


# --- items ------------------------------------------------------------------------------------


def _obj(o: ObjectInfo) -> list[Any]:
    return [o.key, o.size, o.etag, o.last_modified]


def _slot_dict(s: Slot) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": s.name,
        "type": str(s.type),
        "file_name": s.file_name,
        "objects": [_obj(o) for o in s.objects],
    }
    if s.fps is not None:
        d["fps"] = s.fps
    if s.extract_views:
        d["extract_views"] = True
    if s.facts:
        d["facts"] = [_facts_dict(f) for f in s.facts]
    return d


def _slot_from_dict(d: Mapping[str, Any]) -> Slot:
    fps = d.get("fps")
    if fps is not None and not isinstance(fps, int | float | str):
        raise CodecError(f"bad fps {fps!r}")
    return Slot(
        name=str(d["name"]),
        type=ItemType(d["type"]),
        objects=tuple(
            ObjectInfo(str(k), int(size), str(etag), str(lm)) for k, size, etag, lm in d["objects"]
        ),
        file_name=str(d["file_name"]),
        fps=fps,
        extract_views=bool(d.get("extract_views", False)),
        facts=tuple(_facts_from_dict(f) for f in d.get("facts", ())),
    )


def converted_by_key(item: Item) -> dict[str, str]:
    """Provider key -> the storage key its DICOM was converted into: the PNG of a slice, or
    the series video with the section (0-based, as the section files are numbered)."""
    out: dict[str, str] = {}
    for slot in item.slots:
        c = slot.converted
        if c is None:
            continue
        if isinstance(c.made, ImageFacts):
            out.update((o.key, c.storage_key) for o in slot.objects)
            continue
        left_out = dict(c.left_out)
        sections: dict[int, list[int]] = {}
        for n, i in enumerate(c.order):
            sections.setdefault(i, []).append(n)
        for i, o in enumerate(slot.objects):
            if i in left_out:
                out[o.key] = f"not converted: {left_out[i]}"
                continue
            found = sections.get(i, [])
            where = f"section {found[0]}" if len(found) == 1 else f"sections {_span(found)}"
            out[o.key] = f"{c.storage_key} ({where})" if found else c.storage_key
    return out


def _span(ns: list[int]) -> str:
    return f"{ns[0]}-{ns[-1]}" if ns and ns == list(range(ns[0], ns[-1] + 1)) else str(ns)


def item_to_bytes(item: Item) -> bytes:
    """An item for ``items.payload``: everything needed to rebuild it, nothing V7-specific."""
    d: dict[str, Any] = {
        "v": FORMAT,
        "path": item.path,
        "name": item.name,
        "slots": [_slot_dict(s) for s in item.slots],
    }
    if item.compact:
        d["compact"] = True
    if item.media is not Media.NONE:
        d["media"] = str(item.media)
    if item.readonly_endpoint:
        d["readonly"] = True
    return orjson.dumps(d)


def is_current(payload: bytes) -> bool:
    """Written in our format (else a legacy V7 wire payload). Cheap: no full parse."""
    return payload[:6] == b'{"v":2'


def with_columns(item: Item, path: str, name: str, media: str, readonly: bool) -> Item:
    """A stored item with its row's columns applied: the columns are what SQL updates
    (state changes, renames by the collision policy), so they win over the payload's copy."""
    if (item.path, item.name, str(item.media), item.readonly_endpoint) == (
        path,
        name,
        media,
        readonly,
    ):
        return item
    return dataclasses.replace(
        item, path=path, name=name, media=Media(media), readonly_endpoint=readonly
    )


def item_from_bytes(payload: bytes) -> Item:
    try:
        d = orjson.loads(payload)
        if not isinstance(d, dict) or d.get("v") != FORMAT:
            raise CodecError("not an item of this ledger format")
        return Item(
            path=str(d["path"]),
            name=str(d["name"]),
            slots=tuple(_slot_from_dict(s) for s in d["slots"]),
            compact=bool(d.get("compact", False)),
            media=Media(d.get("media", "")),
            readonly_endpoint=bool(d.get("readonly", False)),
        )
    except CodecError:
        raise
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise CodecError(f"unreadable item payload: {exc}") from None


# --- legacy rows (schema <= 4: the V7 wire JSON) -----------------------------------------------


def legacy_keys(keys: bytes) -> list[str]:
    """The provider keys of a legacy row (``items.keys``: a JSON list, in slot order)."""
    value = orjson.loads(keys)
    if not isinstance(value, list):
        raise CodecError("legacy keys are not a list")
    return [str(k) for k in value]


def _is_listed_object(storage_key: str, key: str) -> bool:
    """``storage_key`` names the listed object itself: the provider key, or it behind one
    container segment (Azure). Anything else is a copy the media stage uploaded."""
    if storage_key == key:
        return True
    if not storage_key.endswith("/" + key):
        return False
    container = storage_key[: -len(key) - 1]
    return bool(container) and "/" not in container


def _legacy_slot_facts(d: Mapping[str, Any]) -> Facts | None:
    """Facts a processed legacy slot (or cache value) carries: a processed video, a read-only
    image's thumbnail; None when it carries none of those."""
    if "hls_segments" in d:
        hls = d["hls_segments"]
        return VideoFacts(
            storage_key=str(d.get("storage_key", "")),
            width=int(d["width"]),
            height=int(d["height"]),
            native_fps=float(d["native_fps"]),
            visible_frames=int(d["visible_frames"]),
            total_frames=int(d["total_frames"]),
            high=Rendition(
                str(hls["high_quality"]["index"]), float(hls["high_quality"]["bitrate"])
            ),
            low=Rendition(str(hls["low_quality"]["index"]), float(hls["low_quality"]["bitrate"])),
            sections_prefix=str(d["storage_sections_key_prefix"]),
            sections_extension=str(d["storage_sections_key_extension"]),
            frames_manifest_key=str(d["storage_frames_manifest_key"]),
            thumbnail_key=str(d["storage_thumbnail_key"]),
            size_bytes=int(d.get("size_bytes", 0)),
            low_sections_prefix=str(d.get("storage_low_quality_sections_key_prefix", "")),
            audio_peaks_key=str(d.get("storage_audio_peaks_key", "")),
        )
    if "storage_thumbnail_key" in d:
        return ImageFacts(int(d["width"]), int(d["height"]), str(d["storage_thumbnail_key"]))
    return None


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def item_from_legacy(
    path: str,
    name: str,
    payload: bytes,
    keys: bytes,
    media: str,
    readonly_endpoint: bool,
    objects: Mapping[str, ObjectInfo],
) -> Item:
    """An ``Item`` from a row the old engine wrote: ``payload`` the V7 wire JSON (single-slot
    shorthand or ``slots``), ``keys`` the provider keys in slot order; ``objects`` the rows of
    the objects table for them (etag, size, last-modified; a key missing there gets size 0).

    Consecutive DICOM slots named "0" (a series) become one slot with several objects. Media
    facts are read from the wire fields only when the item's media work is done (``media``
    ""): a processed video slot, a read-only image's thumbnail, a storage key that is not the
    listed object (a local file uploaded). A local read-only image carries two facts for one
    object, which a ``Slot`` cannot hold: it comes back with no facts and ``media`` "upload",
    so the media stage redoes it (from its cache)."""
    try:
        wire = orjson.loads(payload)
        provider_keys = legacy_keys(keys)
        if not isinstance(wire, dict):
            raise CodecError("legacy payload is not an object")
        compact = "slots" not in wire
        raw_slots: Sequence[Mapping[str, Any]]
        if compact:
            raw_slots = [{**wire, "slot_name": "0", "file_name": str(wire.get("name", name))}]
        else:
            raw_slots = list(wire["slots"])
        if len(raw_slots) != len(provider_keys):
            raise CodecError(f"{len(raw_slots)} slots for {len(provider_keys)} keys")
        done = media == ""
        ambiguous = False
        groups: list[tuple[Mapping[str, Any], list[ObjectInfo], list[Facts]]] = []
        for d, key in zip(raw_slots, provider_keys, strict=True):
            obj = objects.get(key) or ObjectInfo(key, 0)
            facts: list[Facts] = []
            if done:
                f = _legacy_slot_facts(d)
                storage_key = str(d.get("storage_key", ""))
                uploaded = (
                    not isinstance(f, VideoFacts)
                    and bool(storage_key)
                    and not _is_listed_object(storage_key, key)
                )
                if f is not None and uploaded:
                    ambiguous = True
                elif f is not None:
                    facts.append(f)
                elif uploaded:
                    facts.append(UploadFacts(storage_key))
            prev = groups[-1] if groups else None
            if (
                prev is not None
                and str(d.get("type")) == ItemType.DICOM
                and str(prev[0].get("type")) == ItemType.DICOM
                and d.get("slot_name") == "0"
                and prev[0].get("slot_name") == "0"
            ):
                prev[1].append(obj)
                prev[2].extend(facts)
            else:
                groups.append((d, [obj], facts))
        slots = tuple(
            Slot(
                name=str(d["slot_name"]),
                type=ItemType(d["type"]),
                objects=tuple(objs),
                file_name=str(d.get("file_name") or objs[0].key.rpartition("/")[2]),
                fps=d.get("fps"),
                extract_views=_truthy(d.get("extract_views")),
                facts=() if ambiguous else tuple(facts),
            )
            for d, objs, facts in groups
        )
        return Item(
            path=path,
            name=name,
            slots=slots,
            compact=compact,
            media=Media.UPLOAD if ambiguous else Media(media),
            readonly_endpoint=readonly_endpoint,
        )
    except CodecError:
        raise
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise CodecError(f"unreadable legacy item payload: {exc!r}") from None
