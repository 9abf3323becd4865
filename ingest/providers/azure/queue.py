"""Azure Blob events from a storage queue, read with azure-storage-queue's aio client.

``worker.events = "azure_queue"``: Azure Blob events (Event Grid or CloudEvents schema) that an
Event Grid subscription delivers to the storage queue ``worker.events_queue`` of the source's
account (base64 JSON text), read with ``azure.storage.queue.aio.QueueClient`` and parsed by
``ingest.providers.events.parse_azure_message``. Azure queues have no long polling:
``receive`` polls with a growing pause until ``wait_s`` is up. Credentials as for the Azure
source: the connection string env variable (it must name the queue endpoint: ``QueueEndpoint=``
or ``EndpointSuffix=``), else ``worker.events_endpoint_url`` or ``source.account_url`` with its
``.blob.`` host turned into ``.queue.``, with $AZURE_STORAGE_KEY or DefaultAzureCredential.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.storage.queue.aio import QueueClient

from ingest.config import Config
from ingest.errors import AccessDenied, SourceError, SourceRetryable
from ingest.providers import Delivery
from ingest.providers.azure.auth import AccountAuth, connection_string_env
from ingest.providers.events import (
    CALL_BUDGET_S,
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    RETRIES,
    VISIBILITY_TIMEOUT_S,
    bounded,
    log,
    parse_azure_message,
)

AZURE_MAX_MESSAGES = 32  # per Get Messages call
AZURE_POLL_MIN_S = 0.1  # pause between empty polls, doubling up to the max
AZURE_POLL_MAX_S = 1.0
AZURE_SERVER_TIMEOUT_S = 30  # the service's own per-operation timeout
AZURE_DELETE_CONCURRENCY = 16


def _azure_code(e: BaseException) -> str:
    """The service's error code: ``error_code`` is a str enum whose str() is its Python name
    (StorageErrorCode.QUEUE_NOT_FOUND), not the code (QueueNotFound)."""
    code = getattr(e, "error_code", None) or ""
    return str(getattr(code, "value", code))


class AzureQueueEventSource:
    """Azure Blob events from a storage queue (``worker.events_queue`` is the queue name)."""

    def __init__(
        self,
        cfg: Config,
        *,
        visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
        retries: int = RETRIES,
    ) -> None:
        self.queue_name = cfg.worker.events_queue
        self.cfg = cfg
        self.container = cfg.source.bucket
        self.prefix = cfg.source.prefix
        self.visibility_timeout_s = visibility_timeout_s
        self.retries = retries
        self._auth = AccountAuth(cfg.source)
        # No I/O yet: a missing endpoint or a bad connection string fails here, at startup.
        self._queue: QueueClient | None = self._open_queue()

    def _open_queue(self) -> QueueClient:
        sc = self.cfg.source
        opts: dict[str, Any] = {
            "connection_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            # The aio client builds its own (async) ExponentialRetry from these; the SDK's
            # default waits 15 s before the first retry.
            "retry_total": self.retries,
            "initial_backoff": 1,
            "increment_base": 2,
            "random_jitter_range": 1,
        }
        url = self.cfg.worker.events_endpoint_url
        if not url and sc.account_url and ".blob." in sc.account_url:
            url = sc.account_url.replace(".blob.", ".queue.", 1)
        return self._auth.open(
            url=url,
            missing=(
                'worker.events = "azure_queue" needs the queue endpoint: set '
                f"${connection_string_env(sc)}, source.account_url "
                "(https://<account>.blob.core.windows.net) or worker.events_endpoint_url"
            ),
            from_connection_string=lambda conn: QueueClient.from_connection_string(
                conn, self.queue_name, **opts
            ),
            from_url=lambda url, credential: QueueClient(
                url, self.queue_name, credential=credential, **opts
            ),
        )

    @property
    def _where(self) -> str:
        return f"Azure queue '{self.queue_name}'{self._auth.where}"

    def _q(self) -> QueueClient:
        if self._queue is None:
            raise SourceError(f"{self._where}: the event source is closed")
        return self._queue

    async def close(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            await queue.close()
        await self._auth.close()

    def _map(self, e: BaseException, what: str) -> SourceError:
        if isinstance(e, TimeoutError):
            return SourceRetryable(f"{what} {self._where}: no answer in time")
        status = int(getattr(e, "status_code", 0) or 0)
        code = _azure_code(e)
        if isinstance(e, ResourceNotFoundError) or code == "QueueNotFound":
            return SourceError(f"{self._where} does not exist: check worker.events_queue")
        if isinstance(e, ClientAuthenticationError) or status in (401, 403):
            return AccessDenied(
                f"access denied to {self._where} ({code or status}): check the account key / "
                "connection string or the identity's role (Storage Queue Data Message Processor)"
            )
        if isinstance(e, HttpResponseError) and status:
            return SourceRetryable(f"{what} {self._where}: Azure error {code or status}")
        return SourceRetryable(f"{what} {self._where}: cannot reach the queue service")

    async def _fetch(self, queue: QueueClient, n: int) -> list[Any]:
        got: list[Any] = []
        try:
            async with asyncio.timeout(CALL_BUDGET_S):
                pages = queue.receive_messages(
                    messages_per_page=min(AZURE_MAX_MESSAGES, n),
                    max_messages=n,
                    visibility_timeout=self.visibility_timeout_s,
                    timeout=AZURE_SERVER_TIMEOUT_S,
                )
                async for message in pages:
                    got.append(message)
        except (AzureError, TimeoutError) as e:
            error = self._map(e, "receive from")
            if not got:
                raise error from None
            log.warning("%s (after %d messages)", error, len(got))
        return got

    async def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        if max_messages < 1:
            return []
        queue = self._q()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        pause = AZURE_POLL_MIN_S
        while True:
            messages = await self._fetch(queue, max_messages)
            left = deadline - loop.time()
            if messages or left <= 0:
                break
            await asyncio.sleep(min(pause, left))  # no long polling on Azure queues
            pause = min(pause * 2, AZURE_POLL_MAX_S)
        out: list[Delivery] = []
        for m in messages:
            text = m.content if isinstance(m.content, str) else ""
            events = parse_azure_message(text, self.container, self.prefix, message_id=str(m.id))
            out.append(Delivery(events, m))
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        queue = self._q()
        gate = asyncio.Semaphore(AZURE_DELETE_CONCURRENCY)
        stale: list[str] = []
        errors: list[SourceError] = []

        async def delete(message: Any) -> None:
            async with gate:
                try:
                    await bounded(
                        queue.delete_message(message, timeout=AZURE_SERVER_TIMEOUT_S),
                        CALL_BUDGET_S,
                    )
                except HttpResponseError as e:
                    # 404 MessageNotFound / 400 PopReceiptMismatch: the receipt expired.
                    code = _azure_code(e)
                    if e.status_code in (400, 404) and code != "QueueNotFound":
                        stale.append(code or str(e.status_code))
                    else:
                        errors.append(self._map(e, "delete from"))
                except (AzureError, TimeoutError) as e:
                    errors.append(self._map(e, "delete from"))

        await asyncio.gather(*(delete(d.receipt) for d in deliveries))
        if stale:
            log.warning(
                "%d event messages not deleted from %s (%s): they will be delivered again",
                len(stale),
                self._where,
                ", ".join(sorted(set(stale))),
            )
        if errors:
            first = errors[0]
            raise type(first)(f"{first} ({len(errors)} of {len(deliveries)} messages)")
