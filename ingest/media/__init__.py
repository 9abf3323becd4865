"""Media processing for read-only storage: thumbnails and exact sizes (``thumbnail.py``).

Kept import-light on purpose: importing ``ingest.media`` for ``MediaError`` does not pull in
Pillow; the heavy modules are imported where they are used.
"""

from __future__ import annotations

from ingest.errors import IngestError

__all__ = ["MediaError"]


class MediaError(IngestError):
    """One object could not be turned into a thumbnail (corrupt, truncated, not an image, too big).

    ``final`` (the default): reading the same bytes again gives the same answer, so the worker
    does not retry it by itself. Not final: the bucket could not be read or written, a decoder
    process crashed, a time limit ran out — worth another try later. ``str(err)`` is a short
    human reason fit for a report column, e.g. ``"truncated image file"``.
    """

    def __init__(self, reason: str, *, final: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final
