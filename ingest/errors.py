"""One exception hierarchy for the whole engine. Each error says whether it is *transient*
(``retryable = True``: the same work may succeed later) or *terminal* (it will not, until
something is fixed). A caller decides what to do from the class and that flag alone::

    IngestError
    ├── ConfigError              terminal  the config is wrong: one line naming the fix, exit 2
    ├── PreflightError           terminal  key, team, dataset, storage or bucket refused: exit 2
    │   └── Unreachable          transient V7 or the bucket cannot be reached at all
    ├── LedgerError              terminal  the ledger cannot be opened or used: names the file
    │   └── LedgerBusy           transient locked by another writer for too long
    ├── ClaimLost                transient another process took over work whose claim expired
    ├── LeaseHeld                transient another run of the job holds the lease: exit 5
    ├── Interrupted              transient a graceful stop came while a batch waited
    ├── Aborted                  transient a second signal stopped the command at once: 130
    ├── FatalError               terminal  the run cannot go on
    ├── MediaError               either    one object's media work failed (``final``: terminal)
    ├── V7Error                            the V7 API
    │   ├── Retry                transient (``delay_s``: Retry-After)
    │   │   ├── RateLimited      transient 429 — every sender slows down
    │   │   ├── ServerError      transient 5xx (the server may have committed the batch)
    │   │   └── TransportError   transient reset, refused, timed out
    │   ├── AuthError            terminal  401
    │   ├── NotFoundError        terminal  404
    │   ├── QuotaError           terminal  429 INSUFFICIENT_REMAINING_STORAGE
    │   └── RejectedError        terminal  400/413/422 (the batch is bisected)
    └── SourceError                        the bucket
        ├── SourceRetryable      transient throttled, 5xx, timeouts
        ├── BucketNotFound       terminal
        ├── AccessDenied         terminal
        └── ObjectNotFound       terminal  one object is gone

Foreign exceptions are mapped to these at the edge that meets them (the V7 client, each
bucket adapter, the ledger backend, the worker's HTTP listener: a port in use is a
ConfigError; missing AWS / Google credentials are AccessDenied naming the fix, so preflight
refuses them with exit 2). Messages never contain secrets: API keys and credentials are never
formatted into them.

The CLI turns the error that ended a command into one stderr line and an exit code in one
table, ``ingest.cli._exit_for``: ConfigError and PreflightError → 2 ("error: …"), LeaseHeld
→ 5, Aborted → 130, LedgerError → 2 (LedgerBusy → 4), any other IngestError → 4; and
``ingest.output.OutputGone`` (a write to stdout found its reader gone) → 141, quietly — a
broken pipe anywhere else is not that. A write or close of an ``-o`` file that fails (a full
disk) is a FatalError naming the file. Anything else is a bug and keeps its traceback. An
ExceptionGroup is re-raised whole when any of its errors is foreign (a bug), ends 130 when it
holds an interruption, and is otherwise unwrapped to its first error of ours.
"""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error this package raises on purpose."""

    retryable: bool = False


class ConfigError(IngestError):
    """The configuration is malformed or inconsistent. Fix the config and run again."""


class PreflightError(IngestError):
    """A check before any work failed (credentials, dataset, storage configuration, bucket)."""


class Unreachable(PreflightError):
    """Preflight could not reach V7 or the bucket at all: worth trying again later."""

    retryable = True


class LeaseHeld(IngestError):
    """Another run, sync or worker of the same job holds the ledger's lease: try later."""

    retryable = True


class Interrupted(IngestError):
    """A graceful stop came while a batch waited for a send slot or a retry: it is not sent
    now. Items that never left stay PLANNED; items that may have reached V7 (a 5xx or a reset)
    stay SENT, and the next run's ALREADY_EXISTS for them counts as ours."""

    retryable = True


class LedgerError(IngestError):
    """The ledger cannot be opened or used (not a ledger, newer schema, unwritable, locked
    for too long). Terminal: the message names the file and what to fix."""


class LedgerBusy(LedgerError):
    """The ledger stayed locked by another writer past the busy timeout: try again."""

    retryable = True


class ClaimLost(IngestError):
    """A write for work whose claim this process lost (its lease expired while it was paused,
    and another process took the work over): refused, so nothing is recorded twice. The caller
    drops that work; ``idents`` names the items refused (empty: a listing shard)."""

    retryable = True

    def __init__(self, message: str, idents: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.idents = idents or []


class Aborted(IngestError):
    """A second signal (or the end of the grace period) stopped the command at once: exit 130;
    the next start resumes from the ledger."""

    retryable = True


class FatalError(IngestError):
    """The run cannot continue (e.g. the API key was revoked mid-run)."""


class MediaError(IngestError):
    """One object's media work failed (corrupt or truncated, not an image, too big, no video
    stream). ``final`` (the default): the same bytes give the same answer, so it is terminal
    and the worker does not retry it by itself. Not final: the bucket could not be read or
    written, a decoder process crashed, a time limit ran out — transient. ``reason`` is a
    short human reason fit for a report column, e.g. ``"truncated image file"``."""

    def __init__(self, reason: str, *, final: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final
        self.retryable = not final


# --- V7 side -----------------------------------------------------------------------------


class V7Error(IngestError):
    """An error talking to the V7 API."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Retry(V7Error):
    """Retryable. ``delay_s`` is the minimum wait the server asked for (Retry-After), or None."""

    retryable = True

    def __init__(
        self, message: str, *, status: int | None = None, delay_s: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.delay_s = delay_s


class RateLimited(Retry):
    """HTTP 429 (not a quota error). The whole engine slows down."""


class ServerError(Retry):
    """HTTP 5xx: transient; note the server may have committed the batch before failing."""


class TransportError(Retry):
    """Connection reset, refused, or timed out before a response arrived."""


class AuthError(V7Error):
    """HTTP 401: the API key is wrong or revoked."""


class NotFoundError(V7Error):
    """HTTP 404: unknown team, dataset, storage configuration or path."""


class QuotaError(V7Error):
    """HTTP 429 with errors.code == INSUFFICIENT_REMAINING_STORAGE: not a rate limit."""


class RejectedError(V7Error):
    """HTTP 400/413/422: the payload was refused. ``detail`` is the server's message."""

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message, status=status)
        self.detail = detail or message


# --- storage side --------------------------------------------------------------------------


class SourceError(IngestError):
    """An error talking to the bucket."""


class SourceRetryable(SourceError):
    retryable = True


class BucketNotFound(SourceError):
    """The bucket / container does not exist."""


class AccessDenied(SourceError):
    """The credentials cannot list or read the bucket."""


class ObjectNotFound(SourceError):
    """A single object is missing."""
