"""Where a command's output goes (stdout or an ``-o`` file): a failed write or close is said in
one line, and a reader of stdout that went away (``ingest report | head``) is told apart from
any other broken pipe (stderr, a socket), which is no reason to exit quietly."""

from __future__ import annotations

from typing import Any

from ingest.errors import FatalError


class OutputGone(Exception):  # a condition, not a failure: exits 141 quietly
    """stdout's reader is gone."""


class Sink:
    """A stream (text or binary) wrapped: its OSErrors become OutputGone (a broken pipe on
    stdout) or a FatalError naming ``name``; everything else is the stream's own."""

    def __init__(self, stream: Any, name: str) -> None:
        self._stream = stream
        self.name = name

    def _failed(self, e: OSError) -> Exception:
        if isinstance(e, BrokenPipeError) and self.name == "stdout":
            return OutputGone()
        return FatalError(f"cannot write {self.name}: {e.strerror or e}")

    def write(self, data: Any) -> int:
        try:
            return int(self._stream.write(data))
        except OSError as e:
            raise self._failed(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise self._failed(e) from None

    def close(self) -> None:
        try:
            self._stream.close()
        except OSError as e:
            raise self._failed(e) from None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._stream, attr)
