"""Object events, the pure part: queue messages parsed into ``ObjectEvent``s, and the delivery
policy both queue adapters share (``aws/sqs.py``, ``azure/queue.py``). No SDK import, no I/O
besides one log line per faulty message.

A message that cannot be parsed (a "poison" message) gives no events, so that its delivery is
acked and never blocks the queue; a warning says why (never the content).

- S3 event notifications (``Records[]``, or the same JSON inside an SNS envelope), as S3 sends
  them to an SQS queue: ``parse_s3_message``.
- Azure Blob events (Event Grid or CloudEvents schema) that an Event Grid subscription delivers
  to a storage queue (base64 JSON text): ``parse_azure_message``.

Only events for the source's bucket (the container for Azure) and keys under its prefix are
returned; the rest are dropped, their messages still delivered (and so acked). Keys are exactly
what the source's listing yields; ETags are normalised like the sources do (quotes stripped).
An event carries no object Last-Modified (only the event's own time), so ``last_modified`` is "".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_plus, urlparse

from ingest.model import ObjectInfo
from ingest.providers import ObjectEvent, ObjectEventKind

# The worker's object-event log: the parsers and both queue adapters write to it.
log = logging.getLogger("ingest.worker.events")

T = TypeVar("T")

# --- the delivery policy of both queue adapters ---------------------------------------------------

# A received message stays invisible this long: it is redelivered if not acked by then (the
# worker acks after registering, which may wait on V7's rate limits).
VISIBILITY_TIMEOUT_S = 300
LONGEST_POLL_S = 20  # the longest server-side wait of one receive (SQS's long poll limit)
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = LONGEST_POLL_S + 20  # longer than the longest long poll
# Every call is also bounded as a whole (SDK retries included) by this much more than its poll.
CALL_BUDGET_S = 60.0
RETRIES = 2  # transport retries inside one call; the worker retries beyond that


async def bounded(aw: Awaitable[T], budget_s: float) -> T:
    """``aw``, or TimeoutError after ``budget_s``."""
    async with asyncio.timeout(budget_s):
        return await aw


# --- parsing --------------------------------------------------------------------------------------

MAX_REASONS_LOGGED = 3
_AZURE_SUBJECT = "/blobServices/default/containers/"


class _Malformed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
