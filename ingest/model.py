"""Domain types shared by every stage: what a listing yields, what the planner emits, states.

Kept free of I/O so the planner, batcher and ledger can be tested without any server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    """Object / item states (see docs: architecture.md, "Object states")."""

    DISCOVERED = "DISCOVERED"
    PLANNED = "PLANNED"
    PROCESSING = "PROCESSING"
    SENT = "SENT"
    REGISTERED = "REGISTERED"
    BLOCKED = "BLOCKED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


TERMINAL_STATES = frozenset({State.REGISTERED, State.BLOCKED, State.FAILED, State.SKIPPED})


class Media(enum.StrEnum):
    """Work an item needs before it is sent (stored in the ledger; "" = none)."""

    NONE = ""
    IMAGE = "image"
    VIDEO = "video"
    UPLOAD = "upload"  # local files: uploaded to the bucket first (then thumbnails if read-only)


class ItemType(enum.StrEnum):
    IMAGE = "image"
    VIDEO = "video"
    PDF = "pdf"
    DICOM = "dicom"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object of a bucket listing. `key` is the provider's key (no bucket, no container)."""

    key: str
    size: int
    etag: str = ""
    last_modified: str = ""  # ISO 8601, as the provider reports it


@dataclass(frozen=True, slots=True)
class Skip:
    """An object the planner will not register, with the reason a report shows."""

    obj: ObjectInfo
    reason: str


@dataclass(frozen=True, slots=True)
class ItemPlan:
    """One dataset item to register.

    `payload` is the exact JSON object sent in the request's `items` list.
    `keys` are the source objects the item is made of (one for a single-slot item).
    """

    path: str
    name: str
    payload: dict[str, Any]
    keys: tuple[str, ...]
    # Serialized size estimate, used by the batcher's byte limit; 0 = compute lazily.
    size_hint: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Media work still to do before the item can be sent: "" none, "image" (thumbnails and
    # sizes for read-only storage), "video" (local ffmpeg processing, maybe images too).
    media: Media = Media.NONE
    # Send through register_existing_readonly (read-only storage, or locally processed video).
    readonly_endpoint: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the registrar learned about one item."""

    path: str
    name: str
    state: State
    v7_id: str = ""
    reason: str = ""
    retryable: bool = False
