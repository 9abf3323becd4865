"""Domain types shared by every stage: what a listing yields, what the planner emits, states.

Items are typed from planning to the wire: an ``Item`` holds its ``Slot``s, a slot its
``ObjectInfo``(s) and, once the media stage has run, its media facts. V7's JSON is built in one
place only (``ingest.registrar.wire``), right before a request is sent or a plan is printed.

Keys: ``ObjectInfo.key`` is the *provider* key (what the bucket API takes: no bucket, no
container). Media facts hold *storage keys* (what V7 is told: Azure prefixes the container),
because the media stage is the one that knows where it wrote them.

Kept free of I/O so the planner, batcher and ledger can be tested without any server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union


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
PENDING_STATES = frozenset({State.PLANNED, State.PROCESSING, State.SENT})


class Media(enum.StrEnum):
    """Work an item needs before it is sent (stored in the ledger; "" = none)."""

    NONE = ""
    IMAGE = "image"
    VIDEO = "video"
    UPLOAD = "upload"  # local files: uploaded to the bucket first (then thumbnails if read-only)
    DICOM = "dicom"  # read-only DICOM: converted to a PNG (a slice) or a video (series, frames)


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


# --- media facts: what the media stage learned or wrote (storage keys) -----------------------


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """A read-only image: its exact pixel size and the thumbnail we uploaded."""

    width: int
    height: int
    thumbnail_key: str


@dataclass(frozen=True, slots=True)
class UploadFacts:
    """A local file copied into the bucket: where V7 reads it from."""

    storage_key: str


@dataclass(frozen=True, slots=True)
class Rendition:
    """One HLS rendition: the playlist text (segment lines rewritten to full keys), bitrate."""

    index: str
    bitrate: float


@dataclass(frozen=True, slots=True)
class VideoFacts:
    """A video cut locally with ffmpeg; every key is under its artifact prefix."""

    storage_key: str  # the video V7 plays: the listed object, or the uploaded copy
    width: int
    height: int
    native_fps: float
    visible_frames: int
    total_frames: int
    high: Rendition
    low: Rendition
    sections_prefix: str
    sections_extension: str
    frames_manifest_key: str
    thumbnail_key: str
    size_bytes: int
    low_sections_prefix: str = ""  # "" when preview frames were not extracted
    audio_peaks_key: str = ""  # "" when the video has no audio stream


@dataclass(frozen=True, slots=True)
class ConvertedFacts:
    """Read-only DICOM converted into what V7 can show (it takes no DICOM there).

    ``storage_key`` is what V7 reads: the PNG of a single slice, or the video made of a series
    or a multi-frame file. ``made`` holds its sizes and thumbnail (``ImageFacts``) or its
    artifacts (``VideoFacts``). ``order`` is, per section (slice or frame, 0-based), the index
    into the slot's objects it came from, so a report can say which slice is which section.
    """

    storage_key: str
    made: ImageFacts | VideoFacts
    order: tuple[int, ...] = ()
    # (object index, reason) of the slot's objects not in the conversion: a localizer of
    # another size, another series, a multi-frame file (``ingest.media.convert``)
    left_out: tuple[tuple[int, str], ...] = ()


Facts = Union[ImageFacts, UploadFacts, VideoFacts, ConvertedFacts]  # noqa: UP007 (runtime alias)


@dataclass(frozen=True, slots=True)
class Slot:
    """One slot of an item. A DICOM series is one slot with several objects (its slices, in
    listing order); every other slot holds one object.

    ``name`` is V7's ``slot_name``; ``fps`` is sent for server-side video only. ``facts`` is
    what the media stage added (empty before it ran, and when nothing is needed): the
    ``UploadFacts`` of uploaded local files in object order, an ``ImageFacts`` for a read-only
    image, a ``VideoFacts`` for a video cut locally, a ``ConvertedFacts`` for read-only DICOM
    (the slot's ``type`` and ``file_name`` are then those of the converted image or video).
    """

    name: str
    type: ItemType
    objects: tuple[ObjectInfo, ...]
    file_name: str
    fps: float | int | str | None = None
    extract_views: bool = False
    facts: tuple[Facts, ...] = ()

    @property
    def obj(self) -> ObjectInfo:
        return self.objects[0]

    @property
    def image(self) -> ImageFacts | None:
        for f in self.facts:
            if isinstance(f, ImageFacts):
                return f
            if isinstance(f, ConvertedFacts) and isinstance(f.made, ImageFacts):
                return f.made
        return None

    @property
    def video(self) -> VideoFacts | None:
        for f in self.facts:
            if isinstance(f, VideoFacts):
                return f
            if isinstance(f, ConvertedFacts) and isinstance(f.made, VideoFacts):
                return f.made
        return None

    @property
    def converted(self) -> ConvertedFacts | None:
        """What a read-only DICOM slot was converted into (None: not converted)."""
        return next((f for f in self.facts if isinstance(f, ConvertedFacts)), None)

    @property
    def uploaded(self) -> tuple[str, ...]:
        """Storage keys of the uploaded copies, in object order ("()" when not uploaded)."""
        return tuple(f.storage_key for f in self.facts if isinstance(f, UploadFacts))


@dataclass(frozen=True, slots=True)
class Item:
    """One dataset item to register, identified by ``(path, name)``.

    ``compact``: a single-object item sent in V7's single-slot shorthand (``type`` +
    ``storage_key`` at the top level); otherwise ``slots`` are sent as they are.
    ``media``: work still to do before sending. ``readonly_endpoint``: sent through
    register_existing_readonly (read-only storage, or locally processed video).
    """

    path: str
    name: str
    slots: tuple[Slot, ...]
    compact: bool = False
    media: Media = Media.NONE
    readonly_endpoint: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        """The provider keys of the objects the item is made of, in slot order."""
        return tuple(o.key for s in self.slots for o in s.objects)

    @property
    def ident(self) -> tuple[str, str]:
        return self.path, self.name


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the registrar learned about one item."""

    path: str
    name: str
    state: State
    v7_id: str = ""
    reason: str = ""
    retryable: bool = False
