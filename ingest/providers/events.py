"""Object events for the worker: S3 event notifications in SQS, Azure Blob events in a queue.

The worker long-polls an ``EventSource`` for ``Delivery`` objects (one per queue message, each
with the object events it carried, possibly none), records the objects in the ledger, and only
then acks the deliveries: at-least-once. A message that cannot be parsed (a "poison" message) is
delivered with no events so that it is acked and never blocks the queue; a warning says why.

- ``sqs``: S3 event notifications (``Records[]``, or the same JSON inside an SNS envelope) in an
  SQS queue, read with aiobotocore (long polling, up to 10 messages per call). The region comes
  from the queue URL when it names one, else ``source.region``; credentials as for the S3
  source (the AWS default chain or ``source.profile``).
- ``azure_queue``: Azure Blob events (Event Grid or CloudEvents schema) that an Event Grid
  subscription delivers to a storage queue of the source's account (base64 JSON text), read with
  ``azure.storage.queue.aio.QueueClient``. Azure queues have no long polling: ``receive`` polls
  with a growing pause until ``wait_s`` is up. Credentials as for the Azure source: the
  connection string env variable (it must name the queue endpoint: ``QueueEndpoint=`` or
  ``EndpointSuffix=``), else ``worker.events_endpoint_url`` or ``source.account_url`` with its
  ``.blob.`` host turned into ``.queue.``, with $AZURE_STORAGE_KEY or DefaultAzureCredential.

Only events for ``source.bucket`` (the container for Azure) and keys under ``source.prefix`` are
returned; the rest are dropped, their messages still delivered (and so acked). Keys are exactly
what the source's listing yields; ETags are normalised like the sources do (quotes stripped).
An event carries no object Last-Modified (only the event's own time), so ``last_modified`` is "".

SDK imports are lazy, as in ``ingest.providers.factory``: a worker without events loads neither.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar
from urllib.parse import unquote, unquote_plus, urlparse

from ingest.config import Config
from ingest.errors import AccessDenied, ConfigError, SourceError, SourceRetryable
from ingest.model import ObjectInfo

if TYPE_CHECKING:
    from azure.storage.queue.aio import QueueClient

log = logging.getLogger("ingest.worker.events")

ObjectEventKind = Literal["created", "deleted"]
T = TypeVar("T")

SQS_MAX_MESSAGES = 10  # per ReceiveMessage / DeleteMessageBatch call
SQS_MAX_WAIT_S = 20  # longest long poll SQS allows
AZURE_MAX_MESSAGES = 32  # per Get Messages call
AZURE_POLL_MIN_S = 0.1  # pause between empty polls, doubling up to the max
AZURE_POLL_MAX_S = 1.0
AZURE_SERVER_TIMEOUT_S = 30  # the service's own per-operation timeout
AZURE_DELETE_CONCURRENCY = 16
# A received message stays invisible this long: it is redelivered if not acked by then (the
# worker acks after registering, which may wait on V7's rate limits).
VISIBILITY_TIMEOUT_S = 300
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = SQS_MAX_WAIT_S + 20  # longer than the longest long poll
# Every call is also bounded as a whole (SDK retries included) by this much more than its poll.
CALL_BUDGET_S = 60.0
RETRIES = 2  # transport retries inside one call; the worker retries beyond that
MAX_REASONS_LOGGED = 3

_SQS_URL = re.compile(r"^https?://[^/]+/[^/]+/[^/]+/?$")
_SQS_REGION = re.compile(
    r"^(?:sqs\.([a-z0-9-]+)\.amazonaws\.com|([a-z0-9-]+)\.queue\.amazonaws\.com)"
)
_AZURE_QUEUE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")
_AZURE_SUBJECT = "/blobServices/default/containers/"


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    kind: ObjectEventKind
    obj: ObjectInfo  # key as the source lists it; etag without quotes; size 0 on deletes


@dataclass
class Delivery:
    events: list[ObjectEvent]  # may be empty: a test event, another bucket, a poison message
    receipt: object  # opaque, passed back to ack()


class EventSource(Protocol):
    async def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """At most ``max_messages`` deliveries; waits up to ``wait_s`` for the first; [] then."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete the messages (only after the ledger recorded their objects)."""
        ...

    async def close(self) -> None: ...


class _Malformed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- parsing (pure: no I/O besides one log line per faulty message) -----------------------------


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        # The decoder's message names a position, never the content.
        raise _Malformed(f"{what} is not JSON ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise _Malformed(f"{what} is nested too deeply") from None


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is not a JSON object")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{what} is missing or not a string")
    return value


def _size(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Malformed(f"{what} is not an integer")
    try:
        n = int(value)
    except ValueError:
        raise _Malformed(f"{what} is not an integer") from None
    if n < 0:
        raise _Malformed(f"{what} is negative")
    return n


def _etag(value: Any) -> str:
    return str(value or "").strip('"')


def _report(kind: str, message_id: str, problems: list[str]) -> None:
    if not problems:
        return
    more = len(problems) - MAX_REASONS_LOGGED
    reason = "; ".join(problems[:MAX_REASONS_LOGGED]) + (f"; {more} more" if more > 0 else "")
    log.warning(
        "%s event message skipped in part or whole: %s",
        kind,
        reason,
        extra={"message_id": message_id} if message_id else None,
    )


def _s3_kind(event_name: str) -> ObjectEventKind | None:
    name = event_name.removeprefix("s3:")
    if name.startswith("ObjectCreated:"):
        return "created"
    if name.startswith(("ObjectRemoved:", "LifecycleExpiration:Delete")):
        return "deleted"
    return None  # restore, tagging, ACL, replication, transition...: nothing to register


def _s3_record(rec: Any, bucket: str, prefix: str) -> ObjectEvent | None:
    rec = _dict(rec, "record")
    kind = _s3_kind(_str(rec.get("eventName"), "eventName"))
    if kind is None:
        return None
    s3 = _dict(rec.get("s3"), "s3")
    name = _str(_dict(s3.get("bucket"), "s3.bucket").get("name"), "s3.bucket.name")
    if name != bucket:
        return None
    obj = _dict(s3.get("object"), "s3.object")
    raw = _str(obj.get("key"), "s3.object.key")
    try:
        # S3 form-encodes the key: '+' is a space, a literal '+' is %2B.
        key = unquote_plus(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise _Malformed("s3.object.key is not percent-encoded UTF-8") from None
    if not key.startswith(prefix):
        return None
    size = _size(obj.get("size"), "s3.object.size")
    return ObjectEvent(kind, ObjectInfo(key=key, size=size, etag=_etag(obj.get("eTag"))))


def _parse_s3(body: str, bucket: str, prefix: str, problems: list[str]) -> list[ObjectEvent]:
    doc = _dict(_loads(body, "body"), "body")
    if doc.get("Type") == "Notification" and "Message" in doc:  # SNS envelope
        message = doc["Message"]
        if not isinstance(message, str):
            raise _Malformed("SNS Message is not a string")
        doc = _dict(_loads(message, "SNS Message"), "SNS Message")
    if doc.get("Event") == "s3:TestEvent":
        log.debug("S3 test event for bucket %r ignored", doc.get("Bucket"))
        return []
    records = doc.get("Records")
    if not isinstance(records, list):
        raise _Malformed("no Records list: not an S3 event notification")
    out: list[ObjectEvent] = []
    for i, rec in enumerate(records):
        try:
            event = _s3_record(rec, bucket, prefix)
        except _Malformed as e:
            problems.append(f"record {i}: {e.reason}")
            continue
        if event is not None:
            out.append(event)
    return out


def parse_s3_message(
    body: str, bucket: str, prefix: str, *, message_id: str = ""
) -> list[ObjectEvent]:
    """The object events of one SQS message body for ``bucket`` under ``prefix``.

    Accepts an S3 event notification, or one wrapped in an SNS envelope; the S3 test event and
    events of other buckets or prefixes give []. A malformed body or record gives no event for
    it and one warning with the reasons (never the body)."""
    problems: list[str] = []
    try:
        events = _parse_s3(body, bucket, prefix, problems)
    except _Malformed as e:
        problems.append(e.reason)
        events = []
    _report("S3", message_id, problems)
    return events


_AZURE_KINDS: dict[str, ObjectEventKind] = {
    "Microsoft.Storage.BlobCreated": "created",
    "Microsoft.Storage.BlobDeleted": "deleted",
}


def _azure_location(event: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    """(container, blob name): from the subject (the name as is), else from data.url."""
    subject = event.get("subject")
    if subject is not None:
        subject = _str(subject, "subject")
        if not subject.startswith(_AZURE_SUBJECT):
            raise _Malformed("subject is not a blob subject")
        container, _, rest = subject[len(_AZURE_SUBJECT) :].partition("/")
        name = rest.removeprefix("blobs/")
        if not container or name == rest or not name:
            raise _Malformed("subject is not a blob subject")
        return container, name
    url = urlparse(_str(data.get("url"), "subject and data.url"))
    path = url.path.lstrip("/")
    host = url.hostname or ""
    if host.count(".") < 2 or host.replace(".", "").isdigit():
        _, _, path = path.partition("/")  # an emulator's URL: /account/container/blob
    container, _, name = path.partition("/")
    if not container or not name:
        raise _Malformed("data.url is not a blob URL")
    return unquote(container), unquote(name)


def _azure_event(event: Any, container: str, prefix: str) -> ObjectEvent | None:
    event = _dict(event, "event")
    # Event Grid schema: eventType; CloudEvents schema: type.
    kind = _AZURE_KINDS.get(_str(event.get("eventType", event.get("type")), "eventType"))
    if kind is None:
        return None  # another event type (directories, tiers, subscription validation...)
    data = _dict(event.get("data", {}), "data")
    if kind == "created" and data.get("api") == "CreateFile":
        # Hierarchical namespace: CreateFile makes an empty file; FlushWithClose, which
        # commits the content, sends its own BlobCreated.
        return None
    blob_container, name = _azure_location(event, data)
    if blob_container != container or not name.startswith(prefix):
        return None
    size = _size(data.get("contentLength"), "data.contentLength")
    return ObjectEvent(kind, ObjectInfo(key=name, size=size, etag=_etag(data.get("eTag"))))


def _azure_doc(text: str) -> Any:
    stripped = text.strip()
    if not stripped:
        raise _Malformed("empty message")
    if stripped[0] in "{[":
        return _loads(stripped, "message")
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise _Malformed("message is neither JSON nor base64") from None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("base64 message is not UTF-8 text") from None
    return _loads(decoded, "base64-decoded message")


def _parse_azure(text: str, container: str, prefix: str, problems: list[str]) -> list[ObjectEvent]:
    doc = _azure_doc(text)
    events = doc if isinstance(doc, list) else [doc]
    out: list[ObjectEvent] = []
    for i, item in enumerate(events):
        try:
            event = _azure_event(item, container, prefix)
        except _Malformed as e:
            problems.append(f"event {i}: {e.reason}" if isinstance(doc, list) else e.reason)
            continue
        if event is not None:
            out.append(event)
    return out


def parse_azure_message(
    text: str, container: str, prefix: str, *, message_id: str = ""
) -> list[ObjectEvent]:
    """The object events of one storage-queue message for ``container`` under ``prefix``.

    The text is base64 of JSON (what an Event Grid subscription writes) or the JSON itself; the
    JSON is one event or an array of events, in the Event Grid or CloudEvents schema. Only
    BlobCreated / BlobDeleted count. A malformed message or event gives no event for it and one
    warning with the reasons (never the text)."""
    problems: list[str] = []
    try:
        events = _parse_azure(text, container, prefix, problems)
    except _Malformed as e:
        problems.append(e.reason)
        events = []
    _report("Azure", message_id, problems)
    return events


# --- sources -------------------------------------------------------------------------------------


async def _bounded(aw: Awaitable[T], budget_s: float) -> T:
    async with asyncio.timeout(budget_s):
        return await aw


class SqsEventSource:
    """S3 event notifications from an SQS queue (``worker.events_queue`` is the queue URL)."""

    def __init__(
        self,
        cfg: Config,
        *,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        visibility_timeout_s: int = VISIBILITY_TIMEOUT_S,
        retries: int = RETRIES,
    ) -> None:
        self.queue_url = cfg.worker.events_queue
        if not _SQS_URL.match(self.queue_url):
            raise ConfigError(
                "config: worker.events_queue must be the SQS queue URL "
                "(https://sqs.<region>.amazonaws.com/<account id>/<queue name>)"
            )
        self.bucket = cfg.source.bucket
        self.prefix = cfg.source.prefix
        self.endpoint_url = cfg.worker.events_endpoint_url
        self.profile = cfg.source.profile
        region = cfg.source.region
        if not self.endpoint_url:
            m = _SQS_REGION.match(urlparse(self.queue_url).hostname or "")
            if m:
                region = m.group(1) or m.group(2)
        self.region = region
        self.visibility_timeout_s = visibility_timeout_s
        self.retries = retries
        self._creds = (aws_access_key_id, aws_secret_access_key)
        self._client: Any = None
        self._ctx: Any = None
        self._lock = asyncio.Lock()

    async def _sqs(self) -> Any:
        async with self._lock:
            if self._client is None:
                from aiobotocore.session import AioSession
                from botocore.config import Config as BotoConfig

                session = AioSession(profile=self.profile or None)
                kwargs: dict[str, Any] = {
                    "region_name": self.region or None,
                    "config": BotoConfig(
                        connect_timeout=CONNECT_TIMEOUT_S,
                        read_timeout=READ_TIMEOUT_S,
                        retries={"mode": "standard", "max_attempts": 1 + self.retries},
                    ),
                }
                if self.endpoint_url:
                    kwargs["endpoint_url"] = self.endpoint_url
                if self._creds[0]:
                    kwargs["aws_access_key_id"] = self._creds[0]
                    kwargs["aws_secret_access_key"] = self._creds[1]
                self._ctx = session.create_client("sqs", **kwargs)
                self._client = await self._ctx.__aenter__()
            return self._client

    async def close(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._client = self._ctx, None, None
            await ctx.__aexit__(None, None, None)

    def _map(self, e: BaseException, what: str) -> SourceError:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"SQS queue '{self.queue_url}'"
        if isinstance(e, TimeoutError):
            return SourceRetryable(f"{what} {where}: no answer in time")
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return AccessDenied(
                f"{what} {where}: no AWS credentials found (environment, profile, instance role)"
            )
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if "NonExistentQueue" in code or code.endswith("QueueDoesNotExist"):
                return SourceError(f"{where} does not exist: check worker.events_queue")
            if status == 403 or code in (
                "AccessDenied",
                "InvalidClientTokenId",
                "KMS.AccessDenied",
            ):
                return AccessDenied(
                    f"access denied to {where} ({code or status}): the credentials need "
                    "sqs:ReceiveMessage and sqs:DeleteMessage"
                )
            return SourceRetryable(f"{what} {where}: SQS error {code or status}")
        return SourceRetryable(f"{what} {where}: cannot reach SQS ({type(e).__name__})")

    async def _call(self, what: str, aw: Awaitable[Any], budget_s: float) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await _bounded(aw, budget_s)
        except (ClientError, BotoCoreError, TimeoutError) as e:
            raise self._map(e, what) from None

    async def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        out: list[Delivery] = []
        if max_messages < 1:
            return out
        sqs = await self._sqs()
        wait = min(SQS_MAX_WAIT_S, max(0, math.ceil(wait_s)))
        while len(out) < max_messages:
            n = min(SQS_MAX_MESSAGES, max_messages - len(out))
            try:
                resp = await self._call(
                    "receive from",
                    sqs.receive_message(
                        QueueUrl=self.queue_url,
                        MaxNumberOfMessages=n,
                        WaitTimeSeconds=wait,
                        VisibilityTimeout=self.visibility_timeout_s,
                    ),
                    wait + CALL_BUDGET_S,
                )
            except SourceError as e:
                if not out:
                    raise
                # What was received is delivered; the next receive will meet the error again.
                log.warning("%s (after %d messages)", e, len(out))
                break
            messages = resp.get("Messages", [])
            for m in messages:
                events = parse_s3_message(
                    str(m.get("Body", "")),
                    self.bucket,
                    self.prefix,
                    message_id=m.get("MessageId", ""),
                )
                out.append(Delivery(events, str(m["ReceiptHandle"])))
            if len(messages) < n:
                break
            wait = 0  # the queue has more: take it without waiting
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        sqs = await self._sqs()
        failed: list[str] = []
        for i in range(0, len(deliveries), SQS_MAX_MESSAGES):
            chunk = deliveries[i : i + SQS_MAX_MESSAGES]
            entries = [{"Id": str(j), "ReceiptHandle": str(d.receipt)} for j, d in enumerate(chunk)]
            resp = await self._call(
                "delete from",
                sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries),
                CALL_BUDGET_S,
            )
            failed += [str(f.get("Code", "?")) for f in resp.get("Failed", [])]
        if failed:
            # Typically an expired receipt (the message became visible again): it will be
            # delivered again, which at-least-once allows.
            log.warning(
                "%d event messages not deleted from SQS queue '%s' (%s): they will be "
                "delivered again",
                len(failed),
                self.queue_url,
                ", ".join(sorted(set(failed))),
            )


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
        if not _AZURE_QUEUE_NAME.match(self.queue_name):
            raise ConfigError(
                f"config: worker.events_queue = {self.queue_name!r} is not an Azure queue name "
                "(3-63 lowercase letters, digits and single hyphens)"
            )
        self.cfg = cfg
        self.container = cfg.source.bucket
        self.prefix = cfg.source.prefix
        self.visibility_timeout_s = visibility_timeout_s
        self.retries = retries
        self._credential: Any = None
        self._where = f"Azure queue '{self.queue_name}'"
        # No I/O yet: a missing endpoint or a bad connection string fails here, at startup.
        self._queue: QueueClient | None = self._open_queue()

    def _open_queue(self) -> QueueClient:
        from azure.storage.queue.aio import QueueClient

        from ingest.providers.azure.blob import ACCOUNT_KEY_ENV, _account_from_url, account_name

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
        env = sc.connection_string_env
        conn = os.environ.get(env, "") if env else ""
        if conn:
            account = account_name(sc)
            if account:
                self._where += f" in account '{account}'"
            try:
                return QueueClient.from_connection_string(conn, self.queue_name, **opts)
            except ValueError:
                # The SDK's message may quote the string, and the string holds the key.
                raise ConfigError(f"${env} is not a valid Azure connection string") from None
        url = self.cfg.worker.events_endpoint_url
        if not url and sc.account_url and ".blob." in sc.account_url:
            url = sc.account_url.replace(".blob.", ".queue.", 1)
        if not url:
            raise ConfigError(
                'worker.events = "azure_queue" needs the queue endpoint: set '
                f"${env or 'AZURE_STORAGE_CONNECTION_STRING'}, source.account_url "
                "(https://<account>.blob.core.windows.net) or worker.events_endpoint_url"
            )
        account = _account_from_url(url)
        self._where += f" in account '{account}'"
        key = os.environ.get(ACCOUNT_KEY_ENV, "")
        if key:
            credential: Any = {"account_name": account, "account_key": key}
        else:
            from azure.identity.aio import DefaultAzureCredential

            credential = self._credential = DefaultAzureCredential()
        return QueueClient(url, self.queue_name, credential=credential, **opts)

    def _q(self) -> QueueClient:
        if self._queue is None:
            raise SourceError(f"{self._where}: the event source is closed")
        return self._queue

    async def close(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            await queue.close()
        if self._credential is not None:
            credential, self._credential = self._credential, None
            await credential.close()

    def _map(self, e: BaseException, what: str) -> SourceError:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
        )

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
        from azure.core.exceptions import AzureError

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
        from azure.core.exceptions import AzureError, HttpResponseError

        queue = self._q()
        gate = asyncio.Semaphore(AZURE_DELETE_CONCURRENCY)
        stale: list[str] = []
        errors: list[SourceError] = []

        async def delete(message: Any) -> None:
            async with gate:
                try:
                    await _bounded(
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


@contextlib.asynccontextmanager
async def open_events(cfg: Config) -> AsyncIterator[EventSource | None]:
    """The configured event source, or None when ``worker.events = "none"``. Nothing is opened
    on the network until the first ``receive``."""
    kind = cfg.worker.events
    if kind == "none":
        yield None
        return
    source: SqsEventSource | AzureQueueEventSource
    if kind == "sqs":
        if cfg.source.provider != "aws":
            raise ConfigError('config: worker.events = "sqs" needs source.provider = "aws"')
        source = SqsEventSource(cfg)
    elif kind == "azure_queue":
        if cfg.source.provider != "azure":
            raise ConfigError(
                'config: worker.events = "azure_queue" needs source.provider = "azure"'
            )
        source = AzureQueueEventSource(cfg)
    else:
        raise ConfigError(f"config: worker.events = {kind!r} is not supported")
    try:
        yield source
    finally:
        await source.close()
