"""One lifecycle for every long command (`run`, `sync`, `retry`, `worker`): signals, the grace
period and the exit codes, in one place.

SIGINT/SIGTERM once → a graceful stop (no new work; requests and uploads in flight finish;
queued items stay PLANNED); again, or when the grace period (if any) runs out → the task is
cancelled at once and the command exits 130. The ledger makes the next start resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from ingest.errors import Aborted

log = logging.getLogger("ingest")

EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration or a failed preflight check
EXIT_INCOMPLETE = 3  # finished, but items failed or were blocked
EXIT_FATAL = 4  # a fatal error stopped the run (or the worker lost its lease)
EXIT_BUSY = 5  # another run, sync or worker of the same job holds the lease
EXIT_INTERRUPTED = 130

T = TypeVar("T")


class Lifecycle:
    """Owns the signal handlers of one command; ``forced`` tells the caller to exit 130."""

    def __init__(self, on_stop: Callable[[], None], *, grace_period_s: float | None = None):
        self._on_stop = on_stop
        self._grace_s = grace_period_s
        self.stopping = False
        self.forced = False
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _force(self, why: str) -> None:
        if self.forced:
            return
        self.forced = True
        log.error(f"{why}: exiting now; the next start resumes from the ledger")
        if self._task is not None:
            self._task.cancel()

    def signal(self, name: str) -> None:
        """What a signal does (also callable directly, e.g. by tests or a lost lease)."""
        if self.stopping:
            self._force(f"second {name}")
            return
        self.stopping = True
        log.warning(
            f"{name}: finishing in-flight work (signal again to abort)",
            extra={"grace_period_s": self._grace_s},
        )
        self._on_stop()
        if self._grace_s is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(
                self._grace_s, self._force, "grace period over (worker.grace_period_s)"
            )

    @contextlib.contextmanager
    def installed(self) -> Iterator[Lifecycle]:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        done = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.signal, sig.name)
                done.append(sig)
        try:
            yield self
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for sig in done:
                loop.remove_signal_handler(sig)

    async def run(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` with the handlers installed. A forced stop raises ``Aborted`` (exit
        130), not a bare CancelledError that would end the process with a traceback."""
        with self.installed():
            try:
                return await aw
            except asyncio.CancelledError:
                if not self.forced:
                    raise
                if self._task is not None:
                    self._task.uncancel()
                raise Aborted("stopped at once; run again to resume") from None
