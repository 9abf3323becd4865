"""The emulator's data and rules, without HTTP: datasets, storage configs, items, validation.

Validation follows v7-contract.md; a violation raises ``Invalid`` naming the field, which the
server turns into a 422 with a JSON body.
"""

from __future__ import annotations

import itertools
import posixpath
import time
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

KNOWN_TYPES = {"image", "video", "pdf", "dicom"}
READONLY_TYPES = {"image", "video", "pdf"}
# V7 infers a type from the file name's extension (darwin-py's SUPPORTED_IMAGE/VIDEO_EXTENSIONS,
# plus what V7's pipelines read). The emulator keeps its own table, as the server would: it
# does not borrow the planner's, so a planner mistake is not mirrored by the emulator.
EXT_TYPES = {
    **dict.fromkeys(
        (".png", ".jpeg", ".jpg", ".jfif", ".jpe", ".tif", ".tiff", ".bmp", ".svs", ".webp"),
        "image",
    ),
    **dict.fromkeys((".ndpi", ".rvg", ".qoi", ".gif"), "image"),
    **dict.fromkeys((".avi", ".bpm", ".mov", ".mp4", ".mkv", ".hevc", ".m4v"), "video"),
    ".pdf": "pdf",
    ".dcm": "dicom",
}
READONLY_VIDEO_REQUIRED = (
    "width",
    "height",
    "native_fps",
    "visible_frames",
    "total_frames",
    "hls_segments",
    "storage_sections_key_prefix",
    "storage_thumbnail_key",
    "storage_frames_manifest_key",
)


class Invalid(Exception):
    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = f"{field}: {message}" if field else message
        self.status = status


class NotFound(Exception):
    pass


@dataclass
class StorageConfig:
    name: str
    provider: str = "aws"
    bucket: str = "demo-bucket"
    prefix: str = "thumbnails"
    readonly: bool = False
    default: bool = False
    region: str | None = "us-east-1"

    def public(self) -> dict[str, Any]:
        doc = asdict(self)
        if doc["region"] is None:
            del doc["region"]
        return doc


@dataclass
class Dataset:
    id: int
    slug: str
    name: str = ""

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slug": self.slug,
            "name": self.name or self.slug,
            "num_items": 0,
            "progress": 0.0,  # darwin-py reads it when it lists datasets
        }


@dataclass
class Store:
    team: str = "emulator-team"
    datasets: dict[str, Dataset] = field(default_factory=dict)
    storage: dict[str, StorageConfig] = field(default_factory=dict)
    # (dataset_id, path, name) → item document; per-dataset insertion order for listings.
    items: dict[tuple[int, str, str], dict[str, Any]] = field(default_factory=dict)
    order: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    max_items_per_request: int = 500
    # Put the existing item's "id" into an ALREADY_EXISTS entry of blocked_items (see
    # EmulatorConfig.blocked_item_ids: V7 does not document it for register_existing).
    blocked_item_ids: bool = False
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def default(cls) -> Store:
        s = cls()
        s.add_dataset("demo-dataset")
        s.add_storage(StorageConfig("s3-rw", default=True))
        s.add_storage(StorageConfig("s3-ro", readonly=True))
        return s

    def add_dataset(self, slug: str, name: str = "", id: int | None = None) -> Dataset:
        ds = Dataset(id if id is not None else len(self.datasets) + 1, slug, name)
        self.datasets[slug] = ds
        self.order.setdefault(ds.id, [])
        return ds

    def add_storage(self, cfg: StorageConfig) -> None:
        self.storage[cfg.name] = cfg

    def clear_items(self) -> None:
        self.items.clear()
        for lst in self.order.values():
            lst.clear()

    # --- registration ------------------------------------------------------------------------

    def check_envelope(self, body: Any, readonly_endpoint: bool) -> tuple[Dataset, list[Any]]:
        if not isinstance(body, dict):
            raise Invalid("", "request body must be a JSON object", 400)
        ds_slug = body.get("dataset_slug")
        if not isinstance(ds_slug, str) or not ds_slug:
            raise Invalid("dataset_slug", "is required")
        st_slug = body.get("storage_slug")
        if not isinstance(st_slug, str) or not st_slug:
            raise Invalid("storage_slug", "is required")
        ds = self.datasets.get(ds_slug)
        if ds is None:
            raise NotFound(f"dataset '{ds_slug}' not found")
        st = self.storage.get(st_slug)
        if st is None:
            raise NotFound(f"storage configuration '{st_slug}' not found")
        if st.readonly and not readonly_endpoint:
            raise Invalid(
                "storage_slug", f"'{st_slug}' is read-only: use register_existing_readonly"
            )
        # The read-only endpoint is also how locally processed videos are registered on
        # read-write storage (v7-contract.md, "Locally processed video"): both are accepted.
        if "options" in body and not isinstance(body["options"], dict):
            raise Invalid("options", "must be an object")
        items = body.get("items")
        if not isinstance(items, list) or not items:
            raise Invalid("items", "must be a non-empty list")
        if len(items) > self.max_items_per_request:
            raise Invalid("items", f"too many items: {len(items)} > {self.max_items_per_request}")
        for i, item in enumerate(items):
            self._check_item(f"items[{i}]", item, readonly_endpoint)
        return ds, items

    def _check_item(self, where: str, item: Any, readonly: bool) -> None:
        if not isinstance(item, dict):
            raise Invalid(where, "must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise Invalid(f"{where}.name", "is required")
        path = item.get("path", "/")
        if not isinstance(path, str) or not path.startswith("/"):
            raise Invalid(f"{where}.path", "must be a string starting with '/'")
        if "slots" in item:
            slots = item["slots"]
            if not isinstance(slots, list) or not slots:
                raise Invalid(f"{where}.slots", "must be a non-empty list")
            seen: dict[str, str] = {}
            for j, slot in enumerate(slots):
                sw = f"{where}.slots[{j}]"
                if not isinstance(slot, dict):
                    raise Invalid(sw, "must be an object")
                sname = slot.get("slot_name")
                if not isinstance(sname, str) or not sname:
                    raise Invalid(f"{sw}.slot_name", "is required")
                t = self._check_file(sw, slot, slot.get("file_name"), readonly)
                prev = seen.get(sname)
                if prev is not None and (readonly or not (prev == "dicom" and t == "dicom")):
                    raise Invalid(f"{sw}.slot_name", f"duplicate slot name '{sname}'")
                seen[sname] = t
                if "extract_views" in slot and sname != "0":
                    raise Invalid(f"{sw}.extract_views", "only allowed in slot '0'")
        else:
            if "storage_key" not in item:
                raise Invalid(f"{where}.storage_key", "is required (or give slots)")
            t = self._check_file(where, item, name, readonly)
            if "extract_views" in item:
                raise Invalid(f"{where}.extract_views", "only allowed in slot '0'")

    def _check_file(self, where: str, d: dict[str, Any], file_name: Any, readonly: bool) -> str:
        key = d.get("storage_key")
        if not isinstance(key, str) or not key:
            raise Invalid(f"{where}.storage_key", "is required")
        if key.startswith("/"):
            raise Invalid(f"{where}.storage_key", "must not start with '/'")
        t = d.get("type")
        if t is None:
            ext = posixpath.splitext(file_name)[1].lower() if isinstance(file_name, str) else ""
            t = EXT_TYPES.get(ext)
            if t is None:
                raise Invalid(
                    f"{where}.type", "is required when the file name has no known extension"
                )
        if t not in KNOWN_TYPES:
            raise Invalid(f"{where}.type", f"unknown type {t!r}")
        if readonly and t == "dicom":
            raise Invalid(f"{where}.type", "read-only storage does not accept DICOM")
        if readonly and (key.lower().endswith(".dcm") or str(file_name).lower().endswith(".dcm")):
            # A .dcm sent as an image/video: V7 cannot show it from read-only storage.
            raise Invalid(
                f"{where}.storage_key", "read-only storage does not accept DICOM: convert it first"
            )
        if readonly and t not in READONLY_TYPES:
            raise Invalid(f"{where}.type", f"{t!r} not allowed for read-only storage")
        if "fps" in d:
            fps = d["fps"]
            if t != "video":
                raise Invalid(f"{where}.fps", "only allowed for videos")
            ok = fps == "native" or (
                isinstance(fps, int | float) and not isinstance(fps, bool) and fps >= 0
            )
            if not ok:
                raise Invalid(f"{where}.fps", 'must be a number >= 0 or "native"')
        if readonly and t == "image":
            if (
                not isinstance(d.get("storage_thumbnail_key"), str)
                or not d["storage_thumbnail_key"]
            ):
                raise Invalid(f"{where}.storage_thumbnail_key", "is required for read-only images")
            for dim in ("height", "width"):
                v = d.get(dim)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise Invalid(f"{where}.{dim}", "must be a positive integer")
        if readonly and t == "video" and ("hls_segments" in d or "sections" not in d):
            for req in READONLY_VIDEO_REQUIRED:
                if req not in d:
                    raise Invalid(f"{where}.{req}", "is required for a read-only video slot")
        return str(t)

    def register(self, ds: Dataset, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Store what is new; refuse per item what exists (ALREADY_EXISTS)."""
        done: list[dict[str, Any]] = []
        blocked: list[dict[str, Any]] = []
        now = time.time()
        for item in items:
            path = item.get("path", "/")
            name = item["name"]
            slots = item.get("slots") or [
                {
                    **{f: v for f, v in item.items() if f not in ("path", "name")},
                    "slot_name": "0",
                    "file_name": name,
                }
            ]
            k = (ds.id, path, name)
            if k in self.items:
                entry: dict[str, Any] = {
                    "name": name,
                    "path": path,
                    "slots": [
                        {"slot_name": s.get("slot_name", "0"), "reason": "ALREADY_EXISTS"}
                        for s in slots
                    ],
                }
                if self.blocked_item_ids:
                    entry = {"id": self.items[k]["id"], **entry}
                blocked.append(entry)
                continue
            doc = {
                "id": str(uuid.UUID(int=next(self._ids) | (0x0190 << 112))),
                "name": name,
                "path": path,
                "dataset_id": ds.id,
                # Every field as received (read-only sizes, thumbnails, video artifacts), so a
                # test can check what V7 would have been told.
                "slots": [
                    {
                        **s,
                        "slot_name": s.get("slot_name", "0"),
                        "type": s.get("type"),
                        "file_name": s.get("file_name", name),
                    }
                    for s in slots
                ],
                "created_at": now,
            }
            self.items[k] = doc
            self.order[ds.id].append(doc)
            done.append(doc)
        return {"items": done, "blocked_items": blocked}

    def list_items(
        self,
        dataset_id: int,
        size: int,
        start: int,
        *,
        names: Collection[str] = (),
        paths: Collection[str] = (),
    ) -> dict[str, Any]:
        """One page of a dataset's items in registration order, optionally only those whose
        name is in ``names`` and whose folder path is in ``paths`` (exact, case-sensitive;
        an empty filter matches everything). ``start`` is an offset into the filtered rows."""
        rows = self.order.get(dataset_id, [])
        if names or paths:
            wanted_names, wanted_paths = set(names), {norm_path(p) for p in paths}
            rows = [
                r
                for r in rows
                if (not wanted_names or r["name"] in wanted_names)
                and (not wanted_paths or norm_path(r["path"]) in wanted_paths)
            ]
        page = rows[start : start + size]
        nxt = start + size if start + size < len(rows) else None
        return {"items": page, "page": {"count": len(rows), "next": nxt}}


def norm_path(path: str) -> str:
    """A folder as V7 compares it: leading slash, no trailing slash, "/" for the root."""
    p = path.strip() or "/"
    if not p.startswith("/"):
        p = "/" + p
    return p.rstrip("/") or "/"
