"""A local directory as a bucket: ``source.bucket`` is the directory, keys are '/'-separated
paths relative to it.

Keys come in the same order a bucket lists them (code-point order of the whole key, so
``a.txt`` < ``a/b`` < ``a0``): siblings are sorted with directories compared as ``name/``, which
keeps every directory's keys one contiguous run. The checkpoint is the last key; a resume skips
whole directories that sort before it. Symlinked directories are not followed (no loops).
Uploads write a temporary file and rename it, so a reader never sees half an object. Content
type and encoding are not stored: a file system has nowhere to keep them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

from ingest.config import SourceConfig
from ingest.errors import AccessDenied, BucketNotFound, ObjectNotFound, SourceError
from ingest.model import ObjectInfo
from ingest.providers import CHUNK_BYTES, Page, Shard


class LocalSource:
    provider = "local"

    def __init__(self, cfg: SourceConfig) -> None:
        self.bucket = cfg.bucket
        self.cfg = cfg
        self.root = Path(cfg.bucket).expanduser()

    def storage_key(self, key: str) -> str:
        return key

    async def close(self) -> None:
        return None

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise SourceError(f"invalid key for a local directory: {key!r}")
        return self.root.joinpath(*parts)

    def _map(self, e: OSError, what: str) -> SourceError:
        if isinstance(e, PermissionError):
            return AccessDenied(
                f"access denied to directory '{self.bucket}' ({what}): check its permissions"
            )
        if isinstance(e, FileNotFoundError | NotADirectoryError):
            if not self.root.is_dir():
                return BucketNotFound(f"directory '{self.bucket}' does not exist")
            return ObjectNotFound(f"{what}: no such file in directory '{self.bucket}'")
        return SourceError(f"{what}: {type(e).__name__}: {e.strerror or e}")

    async def check_access(self) -> None:
        def check() -> None:
            if not self.root.is_dir():
                raise BucketNotFound(f"directory '{self.bucket}' does not exist")
            try:
                with os.scandir(self.root) as it:
                    next(it, None)
            except OSError as e:
                raise self._map(e, "check access") from None

        await asyncio.to_thread(check)

    # --- listing -------------------------------------------------------------------------

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC).isoformat(),
        )

    @staticmethod
    def _entries(directory: Path, rel: str) -> list[tuple[str, os.DirEntry[str], bool]]:
        """(key or sub-prefix, entry, is_dir) of one directory, in key order."""
        out: list[tuple[str, os.DirEntry[str], bool]] = []
        with os.scandir(directory) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    out.append((f"{rel}{e.name}/", e, True))
                elif e.is_file():
                    out.append((f"{rel}{e.name}", e, False))
        out.sort(key=lambda t: t[0])
        return out

    def _walk(self, shard: Shard, after: str) -> Iterator[tuple[ObjectInfo | None, str]]:
        """(object, "") or (None, sub-prefix) in key order, keys > ``after`` only."""
        prefix = shard.prefix
        base_rel = prefix[: prefix.rfind("/") + 1]  # the folder part of the prefix, with "/"
        base = self.root.joinpath(*base_rel.split("/")[:-1]) if base_rel else self.root

        def walk(directory: Path, rel: str, top: bool) -> Iterator[tuple[ObjectInfo | None, str]]:
            try:
                entries = self._entries(directory, rel)
            except (FileNotFoundError, NotADirectoryError):
                if top and not self.root.is_dir():
                    raise
                return  # a prefix with nothing under it, or a folder removed meanwhile
            for name, entry, is_dir in entries:
                if not name.startswith(prefix):
                    continue
                if is_dir:
                    # Everything under `name` sorts before `after` unless `after` is inside it.
                    if after and after >= name and not after.startswith(name):
                        continue
                    if shard.recursive:
                        yield from walk(Path(entry.path), name, False)
                    else:
                        yield None, name
                    continue
                if after and name <= after:
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # removed since the directory was read
                yield self._info(name, st), ""

        yield from walk(base, base_rel, True)

    def checkpoint_key(self, checkpoint: str) -> str:
        return checkpoint  # the last key listed

    async def list_pages(self, shard: Shard, checkpoint: str = "") -> AsyncIterator[Page]:
        it = self._walk(shard, checkpoint)
        last = checkpoint
        n = self.cfg.page_size
        while True:
            try:
                batch = await asyncio.to_thread(lambda: list(islice(it, n)))
            except OSError as e:
                raise self._map(e, f"list '{shard.prefix}'") from None
            objects = [o for o, _ in batch if o is not None]
            prefixes = [p for o, p in batch if o is None]
            if objects:
                last = objects[-1].key
            done = len(batch) < n
            if batch or done:
                yield Page(objects, prefixes, last)
            if done:
                return

    # --- objects ---------------------------------------------------------------------------

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))

        try:
            return await asyncio.to_thread(read)
        except OSError as e:
            raise self._map(e, f"read '{key}'") from None

    async def download(self, key: str, dest: Path) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(shutil.copyfile, path, dest)
        except OSError as e:
            raise self._map(e, f"download '{key}'") from None

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None:
        path = self._path(key)

        def write() -> None:
            if not self.root.is_dir():
                raise BucketNotFound(f"directory '{self.bucket}' does not exist")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:50]}.", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    if isinstance(data, bytes):
                        f.write(data)
                    else:
                        with data.open("rb") as src:
                            shutil.copyfileobj(src, f, CHUNK_BYTES)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        try:
            await asyncio.to_thread(write)
        except OSError as e:
            raise self._map(e, f"upload '{key}'") from None
