"""Retries for the storage requests no SDK retries by itself (backoff, full jitter).

What each SDK already does, so that no request is retried twice over:
- botocore: "standard" retry mode, 5 attempts in all (``total_max_attempts``, ``aws/client.py``)
  — every API call up to its response headers. Not retried: an object's body breaking off
  mid-stream (a reset, a read timeout); S3 reads retry that here.
- gcloud-aio-storage: a resumable upload's PUT is tried 5 times on any error *answer*
  (ClientResponseError, 1, 2, 4, 8 s apart), nothing else is retried. gcloud-aio-auth tries
  each token fetch 5 times (tenacity). So listing pages, reads, downloads and one-request
  uploads of GCS retry here (5 tries); a resumable upload only once more, and only on a
  dropped connection or a timeout (its answers were retried already: 5 x 5 PUTs otherwise).
- azure-core: a RetryPolicy in every pipeline (exponential, 3 retries), and azure-storage-blob
  retries a download's broken chunks itself: nothing to add.

TLS failures (a certificate not trusted, a handshake refused) are never retried: they do not
change by themselves.

Preflight (``check_access``) is not retried: it should say at once what is wrong, and the
worker already retries preflight with its own back-off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import backoff

log = logging.getLogger("ingest.providers")

MAX_TRIES = 5  # the first try included, as botocore counts
MAX_TIME_S = 60.0  # no retry starts after this long
BASE_S = 0.5  # waits: full jitter over 0.5, 1, 2, 4 … s
CAP_S = 8.0

F = TypeVar("F", bound=Callable[..., Any])


def _log_retry(details: Any) -> None:
    log.debug(
        "storage request failed; retrying",
        extra={
            "call": getattr(details["target"], "__qualname__", "?"),
            "tries": details["tries"],
            "wait_s": round(details["wait"], 2),
            "error": type(details.get("exception")).__name__,
        },
    )


def retry_transient(
    is_transient: Callable[[BaseException], bool], *, max_tries: int = MAX_TRIES
) -> Callable[[F], F]:
    """Retry the decorated coroutine function on errors ``is_transient`` accepts."""
    decorator: Callable[[F], F] = backoff.on_exception(
        backoff.expo,
        Exception,
        giveup=lambda e: not is_transient(e),
        max_tries=max_tries,
        max_time=MAX_TIME_S,
        jitter=backoff.full_jitter,
        factor=BASE_S,
        max_value=CAP_S,
        on_backoff=_log_retry,
        logger=None,
    )
    return decorator
