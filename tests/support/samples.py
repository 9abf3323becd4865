"""Sample media facts shared by the ledger tests (contract, codec, SQLite): one locally cut
video, and the V7 slot an old ledger stored for it (the wire edge's own JSON)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ingest.model import Item, ItemType, ObjectInfo, Rendition, Slot, VideoFacts
from ingest.registrar import wire


def video_facts(key: str, *, peaks: bool = True, preview: bool = False) -> VideoFacts:
    """Facts of a video listed at ``key``, its artifacts under ``art/<key>``."""
    art = f"art/{key}"
    return VideoFacts(
        storage_key=key,
        width=1280,
        height=720,
        native_fps=29.97,
        visible_frames=90,
        total_frames=91,
        high=Rendition(f"#EXTM3U\n{art}/segments/high/000000000.ts\n", 2_500_000.5),
        low=Rendition(f"#EXTM3U\n{art}/segments/low/000000000.ts\n", 300_000.0),
        sections_prefix=f"{art}/sections/high",
        sections_extension="jpg",
        frames_manifest_key=f"{art}/frames_manifest.txt",
        thumbnail_key=f"{art}/thumbnail.jpg",
        size_bytes=5000,
        low_sections_prefix=f"{art}/sections/low" if preview else "",
        audio_peaks_key=f"{art}/audio_peaks.gz" if peaks else "",
    )


def legacy_video_slot(facts: VideoFacts) -> dict[str, Any]:
    """The processed slot a schema <= 4 ledger stored as the item's payload (V7's JSON)."""
    name = facts.storage_key.rpartition("/")[2]
    slot = Slot(name, ItemType.VIDEO, (ObjectInfo(facts.storage_key, facts.size_bytes),), name)
    item = Item("/", name, (replace(slot, facts=(facts,)),))
    entry: dict[str, Any] = wire.item_json(item, wire.KeyMap())["slots"][0]
    return entry
