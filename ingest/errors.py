"""One exception hierarchy for the whole engine.

A caller decides what to do from the class alone:

- ``ConfigError`` / ``PreflightError``: fatal before any work; the message is one line naming
  the fix.
- ``V7Error`` subclasses split into *retryable* (``Retry`` and its children: rate limit, 5xx,
  transport) and *final* (auth, not found, quota, rejected payload).
- ``SourceError`` for the bucket side, same split.

Messages never contain secrets: API keys and credentials are never formatted into them.
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


class Interrupted(IngestError):
    """A graceful stop came while a batch waited for a send slot or a retry: it is not sent
    now. Its items stay SENT in the ledger; the next run re-sends them, and ALREADY_EXISTS for
    an item of ours counts as registered, so nothing is lost or doubled."""


class LedgerError(IngestError):
    """The ledger cannot be opened or used (not a ledger, newer schema, unwritable, locked
    for too long). Terminal: the message names the file and what to fix."""


class LedgerBusy(LedgerError):
    """Another process kept the ledger locked for longer than the busy timeout: try again."""

    retryable = True


class FatalError(IngestError):
    """The run cannot continue (e.g. the API key was revoked mid-run)."""


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
