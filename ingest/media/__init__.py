"""Media work: thumbnails and exact sizes (``thumbnail.py``), local video cutting
(``video.py`` + ``ffmpeg.py``), read-only DICOM conversion (``dicom.py`` pixels and order,
``convert.py`` PNGs and series videos) and the stage that adds their facts to items
(``stage.py``).

Kept import-light on purpose: importing ``ingest.media`` for ``MediaError`` does not pull in
Pillow; the heavy modules are imported where they are used.
"""

from __future__ import annotations

from ingest.errors import MediaError

__all__ = ["MediaError"]
