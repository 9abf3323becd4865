"""Which media failures are final (the worker leaves them to `ingest retry`) and which are
worth another try later: the bucket side failing is never the object's fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ingest.config import SourceConfig
from ingest.errors import SourceRetryable
from ingest.media import MediaError
from ingest.media.stage import MediaStage
from ingest.sources.local import LocalSource


class NoCache:
    def object_meta(self, key: str) -> tuple[str, int]:
        return "etag", 10

    def cached_media(self, bucket: str, key: str, etag: str, kind: str) -> Any:
        return None

    def cache_media(self, bucket: str, key: str, etag: str, kind: str, result: Any) -> None:
        pass


class FlakyBucket(LocalSource):
    """A directory whose reads fail the way a bucket under an outage does (no emulator
    produces a 503 on demand)."""

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        raise SourceRetryable("HTTP 503 SlowDown")


def _stage(source: LocalSource) -> MediaStage:
    return MediaStage(
        source,
        NoCache(),
        artifact_prefix="_ingest",
        storage_name="st",
        thumbnails=None,
        videos=None,
        video_options=None,
        max_image_bytes=1 << 20,
    )


async def test_bucket_errors_are_not_final_and_bad_bytes_are(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"0123456789")
    cfg = SourceConfig(provider="local", bucket=str(tmp_path))
    with pytest.raises(MediaError) as outage:
        await _stage(FlakyBucket(cfg))._read("a.jpg", 10)
    assert not outage.value.final and "503" in outage.value.reason
    with pytest.raises(MediaError) as gone:
        await _stage(LocalSource(cfg))._read("missing.jpg", 10)
    assert not gone.value.final  # it may be put back; a sync tells vanished from not
    with pytest.raises(MediaError) as empty:
        await _stage(LocalSource(cfg))._read("a.jpg", 0)
    assert empty.value.final
    assert await _stage(LocalSource(cfg))._read("a.jpg", 10) == b"0123456789"
