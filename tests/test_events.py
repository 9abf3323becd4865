"""Object events for the worker: the pure parsers (table tests), then the two event sources
against real emulators over sockets: SQS in moto's server, a storage queue in Azurite.

moto's server emits S3 event notifications into SQS itself (``put_bucket_notification_
configuration`` + ``put_object`` / ``delete_object``, including the ``s3:TestEvent``), so the SQS
test drives real S3 → SQS traffic. Azurite has no Event Grid: the Azure test writes Event Grid
shaped messages (base64 JSON, as a storage-queue subscription does) into Azurite's queue service,
built from blobs really uploaded to Azurite's blob service.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ingest.config import Config
from ingest.errors import ConfigError, SourceError, SourceRetryable
from ingest.model import ObjectInfo
from ingest.providers import Delivery, ObjectEvent, Shard
from ingest.providers.aws.s3 import S3Source
from ingest.providers.aws.sqs import SqsEventSource
from ingest.providers.azure.blob import AzureSource
from ingest.providers.azure.queue import AzureQueueEventSource
from ingest.providers.events import parse_azure_message, parse_s3_message
from ingest.providers.factory import open_events
from tests.conftest import s3_client
from tests.support.e2e import free_port
from tests.support.emulators import (
    AZURITE_KEY,
    AzuriteQueueServer,
    AzuriteServer,
    azure_create_container,
    azure_seed,
)

LOGGER = "ingest.worker.events"
# Planted in malformed bodies: a warning must give the reason, never the content.
CANARY = "CANARY-S3CR3T-9f3b"
BUCKET = "bkt"
PREFIX = "in/"


def created(key: str, size: int = 0, etag: str = "") -> ObjectEvent:
    return ObjectEvent("created", ObjectInfo(key, size, etag))


def deleted(key: str, size: int = 0, etag: str = "") -> ObjectEvent:
    return ObjectEvent("deleted", ObjectInfo(key, size, etag))


# --- S3 parsing --------------------------------------------------------------------------------


def s3_record(
    key: str,
    *,
    name: str = "ObjectCreated:Put",
    bucket: str = BUCKET,
    size: Any = 5,
    etag: Any = "5d41402abc4b2a76b9719d911017c592",
) -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "sequencer": "0055AED6DCD90281E5"}
    if size is not None:
        obj["size"] = size
    if etag is not None:
        obj["eTag"] = etag
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-01-01T00:00:00.000Z",
        "eventName": name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj},
    }


def s3_body(*records: dict[str, Any]) -> str:
    return json.dumps({"Records": list(records)})


def sns(message: str) -> str:
    return json.dumps(
        {"Type": "Notification", "MessageId": "m", "TopicArn": "arn:t", "Message": message}
    )


E = "5d41402abc4b2a76b9719d911017c592"

# (id, body, expected events, warns)
S3_CASES: list[tuple[str, str, list[ObjectEvent], bool]] = [
    ("put", s3_body(s3_record("in/a.jpg")), [created("in/a.jpg", 5, E)], False),
    ("space-as-plus", s3_body(s3_record("in/a+b+c.jpg")), [created("in/a b c.jpg", 5, E)], False),
    ("literal-plus", s3_body(s3_record("in/x%2By.txt")), [created("in/x+y.txt", 5, E)], False),
    (
        "unicode",
        s3_body(s3_record("in/%C3%BCn%C3%AF/%E6%97%A5%E6%9C%AC.png")),
        [created("in/ünï/日本.png", 5, E)],
        False,
    ),
    (
        "encoded-slash",  # moto encodes '/', S3 does not: both decode the same
        s3_body(s3_record("in%2Fdir%2Fa+b.jpg")),
        [created("in/dir/a b.jpg", 5, E)],
        False,
    ),
    ("percent-sign", s3_body(s3_record("in/100%25.jpg")), [created("in/100%.jpg", 5, E)], False),
    ("quoted-etag", s3_body(s3_record("in/a", etag='"abc"')), [created("in/a", 5, "abc")], False),
    (
        "multipart-etag",
        s3_body(s3_record("in/a", etag="abc-3")),
        [created("in/a", 5, "abc-3")],
        False,
    ),
    ("string-size", s3_body(s3_record("in/a", size="7")), [created("in/a", 7, E)], False),
    (
        "copy-post-multipart",
        s3_body(
            s3_record("in/1", name="ObjectCreated:Copy"),
            s3_record("in/2", name="ObjectCreated:Post"),
            s3_record("in/3", name="ObjectCreated:CompleteMultipartUpload"),
        ),
        [created("in/1", 5, E), created("in/2", 5, E), created("in/3", 5, E)],
        False,
    ),
    (
        "delete-without-size-or-etag",
        s3_body(s3_record("in/a", name="ObjectRemoved:Delete", size=None, etag=None)),
        [deleted("in/a")],
        False,
    ),
    (
        "delete-marker",
        s3_body(s3_record("in/a", name="ObjectRemoved:DeleteMarkerCreated", size=None, etag=None)),
        [deleted("in/a")],
        False,
    ),
    (
        "lifecycle-expiration",
        s3_body(s3_record("in/a", name="LifecycleExpiration:Delete", size=None, etag=None)),
        [deleted("in/a")],
        False,
    ),
    (
        "s3-prefixed-name",
        s3_body(s3_record("in/a", name="s3:ObjectCreated:Put")),
        [created("in/a", 5, E)],
        False,
    ),
    (
        "irrelevant-events",
        s3_body(
            s3_record("in/a", name="ObjectRestore:Completed"),
            s3_record("in/a", name="ObjectTagging:Put"),
            s3_record("in/a", name="LifecycleTransition"),
        ),
        [],
        False,
    ),
    ("other-bucket", s3_body(s3_record("in/a", bucket="other")), [], False),
    ("other-prefix", s3_body(s3_record("out/a.jpg")), [], False),
    ("prefix-is-not-a-folder", s3_body(s3_record("in")), [], False),
    (
        "sns-envelope",
        sns(s3_body(s3_record("in/a+b.jpg"))),
        [created("in/a b.jpg", 5, E)],
        False,
    ),
    (
        "test-event",
        json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET}),
        [],
        False,
    ),
    (
        "test-event-in-sns",
        sns(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET})),
        [],
        False,
    ),
    ("empty-records", s3_body(), [], False),
    ("malformed-json", '{"Records": [' + CANARY, [], True),
    ("empty-body", "", [], True),
    ("json-not-object", json.dumps([CANARY]), [], True),
    ("no-records", json.dumps({"hello": CANARY}), [], True),
    ("records-not-list", json.dumps({"Records": CANARY}), [], True),
    ("sns-message-not-json", sns(CANARY), [], True),
    ("sns-message-not-string", json.dumps({"Type": "Notification", "Message": {"a": 1}}), [], True),
    (
        "one-bad-record-among-good",
        s3_body(s3_record("in/a"), {"eventName": "ObjectCreated:Put"}, s3_record("in/b")),
        [created("in/a", 5, E), created("in/b", 5, E)],
        True,
    ),
    ("record-not-object", s3_body(CANARY), [], True),  # type: ignore[arg-type]
    ("missing-key", s3_body({**s3_record("in/a"), "s3": {"bucket": {"name": BUCKET}}}), [], True),
    ("bad-size", s3_body(s3_record("in/a", size=CANARY)), [], True),
    ("negative-size", s3_body(s3_record("in/a", size=-1)), [], True),
    ("bool-size", s3_body(s3_record("in/a", size=True)), [], True),
    ("invalid-utf8-key", s3_body(s3_record("in/%FF%FE")), [], True),
    ("deep-nesting", "[" * 100_000 + "]" * 100_000, [], True),
]


@pytest.mark.parametrize(
    ("body", "expected", "warns"),
    [c[1:] for c in S3_CASES],
    ids=[c[0] for c in S3_CASES],
)
def test_parse_s3_message(
    body: str, expected: list[ObjectEvent], warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    assert parse_s3_message(body, BUCKET, PREFIX, message_id="mid-1") == expected
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == (1 if warns else 0)
    assert CANARY not in caplog.text
    if warns:
        assert warnings[0].getMessage().startswith("S3 event message skipped")
        assert getattr(warnings[0], "message_id", "") == "mid-1"


def test_parse_s3_empty_prefix_takes_every_key() -> None:
    body = s3_body(s3_record("a.jpg"), s3_record("in/b.jpg"))
    assert [e.obj.key for e in parse_s3_message(body, BUCKET, "")] == ["a.jpg", "in/b.jpg"]


# --- Azure parsing -----------------------------------------------------------------------------

CONTAINER = "cont"
TOPIC = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Storage/storageAccounts/acct"
AZ_ETAG = "0x8DC1E2F3A4B5C6D"


def eg_event(
    name: str,
    *,
    event_type: str = "Microsoft.Storage.BlobCreated",
    container: str = CONTAINER,
    size: Any = 12,
    etag: Any = AZ_ETAG,
    api: str = "PutBlob",
    subject: bool = True,
) -> dict[str, Any]:
    """An Event Grid schema blob event, as Azure sends it (subject holds the raw blob name)."""
    from urllib.parse import quote

    data: dict[str, Any] = {
        "api": api,
        "blobType": "BlockBlob",
        "url": f"https://acct.blob.core.windows.net/{container}/{quote(name)}",
        "sequencer": "00000000000004420000000000028963",
    }
    if size is not None:
        data["contentLength"] = size
    if etag is not None:
        data["eTag"] = etag
    event: dict[str, Any] = {
        "topic": TOPIC,
        "eventType": event_type,
        "id": str(uuid.uuid4()),
        "data": data,
        "dataVersion": "",
        "metadataVersion": "1",
        "eventTime": "2026-01-01T00:00:00.0000000Z",
    }
    if subject:
        event["subject"] = f"/blobServices/default/containers/{container}/blobs/{name}"
    return event


def b64(doc: Any) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def cloud_event(name: str) -> dict[str, Any]:
    ev = eg_event(name)
    return {
        "specversion": "1.0",
        "type": ev["eventType"],
        "source": ev["topic"],
        "subject": ev["subject"],
        "id": ev["id"],
        "data": ev["data"],
    }


AZURE_CASES: list[tuple[str, str, list[ObjectEvent], bool]] = [
    ("base64", b64(eg_event("in/a.jpg")), [created("in/a.jpg", 12, AZ_ETAG)], False),
    ("raw-json", json.dumps(eg_event("in/a.jpg")), [created("in/a.jpg", 12, AZ_ETAG)], False),
    (
        "json-array",
        json.dumps([eg_event("in/a.jpg"), eg_event("in/b.jpg", size=3)]),
        [created("in/a.jpg", 12, AZ_ETAG), created("in/b.jpg", 3, AZ_ETAG)],
        False,
    ),
    (
        "base64-array",
        b64([eg_event("in/a"), eg_event("in/b", container="other")]),
        [created("in/a", 12, AZ_ETAG)],
        False,
    ),
    ("cloudevents-schema", b64(cloud_event("in/c.png")), [created("in/c.png", 12, AZ_ETAG)], False),
    (
        "spaces-unicode-plus-percent",  # the subject holds the name as is: nothing to decode
        b64(eg_event("in/a b+c %41/ünï 日本.jpg")),
        [created("in/a b+c %41/ünï 日本.jpg", 12, AZ_ETAG)],
        False,
    ),
    (
        "blobs-inside-the-name",
        b64(eg_event("in/x/blobs/y.jpg")),
        [created("in/x/blobs/y.jpg", 12, AZ_ETAG)],
        False,
    ),
    (
        "quoted-etag",
        b64(eg_event("in/a", etag=f'"{AZ_ETAG}"')),
        [created("in/a", 12, AZ_ETAG)],
        False,
    ),
    (
        "deleted",
        b64(eg_event("in/a", event_type="Microsoft.Storage.BlobDeleted", size=None, etag=None)),
        [deleted("in/a")],
        False,
    ),
    (
        "url-fallback-without-subject",
        b64(eg_event("in/a b/ü.jpg", subject=False)),
        [created("in/a b/ü.jpg", 12, AZ_ETAG)],
        False,
    ),
    ("hns-createfile-skipped", b64(eg_event("in/a", api="CreateFile", size=0)), [], False),
    (
        "hns-flushwithclose",
        b64(eg_event("in/a", api="FlushWithClose")),
        [created("in/a", 12, AZ_ETAG)],
        False,
    ),
    ("other-container", b64(eg_event("in/a", container="other")), [], False),
    ("other-prefix", b64(eg_event("out/a")), [], False),
    (
        "other-event-types",
        json.dumps(
            [
                eg_event("in/a", event_type="Microsoft.Storage.BlobTierChanged"),
                eg_event("in/d", event_type="Microsoft.Storage.DirectoryCreated"),
                {"eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "data": {}},
            ]
        ),
        [],
        False,
    ),
    ("empty-array", "[]", [], False),
    ("not-base64", f"%%% {CANARY} %%%", [], True),
    ("base64-not-json", base64.b64encode(CANARY.encode()).decode(), [], True),
    ("base64-not-utf8", base64.b64encode(b"\xff\xfe" + CANARY.encode()).decode(), [], True),
    ("empty-text", "   ", [], True),
    ("malformed-json", "{" + CANARY, [], True),
    ("no-event-type", json.dumps({"subject": CANARY}), [], True),
    ("event-not-object", json.dumps([CANARY]), [], True),
    ("data-not-object", json.dumps({**eg_event("in/a"), "data": CANARY}), [], True),
    ("bad-subject", json.dumps({**eg_event("in/a"), "subject": f"/x/{CANARY}"}), [], True),
    (
        "subject-without-blob-name",
        json.dumps({**eg_event("in/a"), "subject": "/blobServices/default/containers/cont/blobs/"}),
        [],
        True,
    ),
    ("bad-size", b64(eg_event("in/a", size="x" + CANARY)), [], True),
    (
        "one-bad-event-among-good",
        json.dumps([eg_event("in/a"), {"eventType": 5}, eg_event("in/b")]),
        [created("in/a", 12, AZ_ETAG), created("in/b", 12, AZ_ETAG)],
        True,
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "warns"),
    [c[1:] for c in AZURE_CASES],
    ids=[c[0] for c in AZURE_CASES],
)
def test_parse_azure_message(
    text: str, expected: list[ObjectEvent], warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    assert parse_azure_message(text, CONTAINER, PREFIX, message_id="mid-2") == expected
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == (1 if warns else 0)
    assert CANARY not in caplog.text
    if warns:
        assert warnings[0].getMessage().startswith("Azure event message skipped")


def test_parse_azure_emulator_url_fallback() -> None:
    ev = eg_event("x", subject=False)
    ev["data"]["url"] = "http://127.0.0.1:10000/devstoreaccount1/cont/in/a%20b.jpg"
    assert parse_azure_message(b64(ev), CONTAINER, PREFIX) == [created("in/a b.jpg", 12, AZ_ETAG)]


# --- configuration -----------------------------------------------------------------------------


def sqs_config(queue_url: str, endpoint: str, bucket: str, prefix: str = PREFIX) -> Config:
    cfg = Config()
    cfg.source.provider = "aws"
    cfg.source.bucket = bucket
    cfg.source.prefix = prefix
    cfg.worker.events = "sqs"
    cfg.worker.events_queue = queue_url
    cfg.worker.events_endpoint_url = endpoint
    return cfg


def azure_config(queue: str, container: str, prefix: str = PREFIX) -> Config:
    cfg = Config()
    cfg.source.provider = "azure"
    cfg.source.bucket = container
    cfg.source.prefix = prefix
    cfg.worker.events = "azure_queue"
    cfg.worker.events_queue = queue
    return cfg


async def test_open_events_none() -> None:
    async with open_events(Config()) as source:
        assert source is None


@pytest.mark.parametrize(
    ("events", "provider", "queue", "match"),
    [
        ("sqs", "gcp", "http://h/1/q", 'needs source.provider = "aws"'),
        ("azure_queue", "aws", "q-name", 'needs source.provider = "azure"'),
        ("sqs", "aws", "my-queue", "must be the SQS queue URL"),
        ("azure_queue", "azure", "Bad_Name", "not an Azure queue name"),
    ],
)
def test_event_settings_are_validated_with_the_config(
    events: str, provider: str, queue: str, match: str
) -> None:
    from ingest.config import validate

    cfg = Config()
    cfg.source.provider = provider  # type: ignore[assignment]
    cfg.source.bucket = "b"
    cfg.worker.events = events  # type: ignore[assignment]
    cfg.worker.events_queue = queue
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.parametrize(
    ("events", "provider", "queue", "match"),
    [("azure_queue", "azure", "events", "needs the queue endpoint")],
)
async def test_open_events_config_errors(
    events: str, provider: str, queue: str, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    cfg = Config()
    cfg.source.provider = provider  # type: ignore[assignment]
    cfg.source.bucket = "b"
    cfg.worker.events = events  # type: ignore[assignment]
    cfg.worker.events_queue = queue
    with pytest.raises(ConfigError, match=match):
        async with open_events(cfg):
            pass


def test_azure_queue_url_from_account_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_KEY", AZURITE_KEY)
    cfg = azure_config("events", "c")
    cfg.source.account_url = "https://acct.blob.core.windows.net"
    source = AzureQueueEventSource(cfg)
    assert source._q().url == "https://acct.queue.core.windows.net/events"


# --- SQS through moto ----------------------------------------------------------------------------


def sqs_client(url: str) -> Any:
    import boto3

    return boto3.client(
        "sqs",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def sqs_depth(url: str, queue_url: str) -> int:
    attrs = sqs_client(url).get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def new_queue(url: str) -> str:
    return str(sqs_client(url).create_queue(QueueName=f"q-{uuid.uuid4().hex[:12]}")["QueueUrl"])


async def receive_until(
    source: Any, count: int, *, max_messages: int = 10, deadline_s: float = 10.0
) -> list[Delivery]:
    """Deliveries until ``count`` arrived; long polls, never sleeps."""
    got: list[Delivery] = []
    deadline = time.monotonic() + deadline_s
    while len(got) < count and time.monotonic() < deadline:
        got += await source.receive(max_messages, 1.0)
    return got


@pytest.fixture
def sqs_source(moto_url: str, bucket_name: str) -> Iterator[tuple[SqsEventSource, str]]:
    queue_url = new_queue(moto_url)
    cfg = sqs_config(queue_url, moto_url, bucket_name)
    yield (
        SqsEventSource(cfg, aws_access_key_id="testing", aws_secret_access_key="testing"),
        queue_url,
    )


@pytest.fixture
async def sqs(sqs_source: tuple[SqsEventSource, str]) -> AsyncIterator[tuple[SqsEventSource, str]]:
    try:
        yield sqs_source
    finally:
        await sqs_source[0].close()


async def list_source(source: Any, prefix: str) -> dict[str, ObjectInfo]:
    out: dict[str, ObjectInfo] = {}
    try:
        async for page in source.list_pages(Shard(prefix)):
            out.update({o.key: o for o in page.objects})
    finally:
        await source.close()
    return out


async def test_s3_notifications_through_sqs(
    moto_url: str, bucket_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real S3 → SQS notifications from moto, read through open_events (default AWS chain)."""
    s3 = s3_client(moto_url)
    s3.create_bucket(Bucket=bucket_name)
    queue_url = new_queue(moto_url)
    arn = sqs_client(moto_url).get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket_name,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
            ]
        },
    )
    keys = ["in/a b.jpg", "in/ünï 日本/ç+d %.png", "in/gone.txt", "out/other.jpg"]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket_name, Key=key, Body=f"body {i} {key}".encode())
    s3.delete_object(Bucket=bucket_name, Key="in/gone.txt")
    messages = 1 + len(keys) + 1  # the test event, the puts, the delete

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    cfg = sqs_config(queue_url, moto_url, bucket_name)
    async with open_events(cfg) as source:
        assert isinstance(source, SqsEventSource)
        deliveries = await receive_until(source, messages)
        assert len(deliveries) == messages
        events = [e for d in deliveries for e in d.events]
        assert sum(1 for d in deliveries if not d.events) == 2  # test event, out/ prefix

        # What the S3 source lists for the same objects: the worker matches events to it.
        s3_cfg = replace(cfg.source, endpoint_url=moto_url)
        listed = await list_source(
            S3Source(s3_cfg, aws_access_key_id="testing", aws_secret_access_key="testing"),
            PREFIX,
        )
        made = {e.obj.key: e.obj for e in events if e.kind == "created"}
        assert set(made) == {"in/a b.jpg", "in/ünï 日本/ç+d %.png", "in/gone.txt"}
        for key in ("in/a b.jpg", "in/ünï 日本/ç+d %.png"):
            head = s3.head_object(Bucket=bucket_name, Key=key)
            assert made[key].etag == head["ETag"].strip('"') == listed[key].etag
            assert made[key].size == head["ContentLength"] == listed[key].size
        assert [e.obj.key for e in events if e.kind == "deleted"] == ["in/gone.txt"]

        await source.ack(deliveries)
        assert sqs_depth(moto_url, queue_url) == 0
        assert await source.receive(10, 0) == []


def s3_message(key: str, bucket: str) -> str:
    return s3_body(s3_record(urllib.parse.quote_plus(key), bucket=bucket))


async def test_sqs_receive_is_bounded_and_acks_in_batches(
    moto_url: str, sqs: tuple[SqsEventSource, str]
) -> None:
    source, queue_url = sqs
    client = sqs_client(moto_url)
    bucket = source.bucket
    for start in range(0, 25, 10):
        client.send_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "MessageBody": s3_message(f"in/{i:02d}.jpg", bucket)}
                for i in range(start, min(start + 10, 25))
            ],
        )
    first = await source.receive(12, 0)
    assert len(first) == 12  # two calls (10 + 2), never more than asked
    rest = await receive_until(source, 13, max_messages=100)
    assert len(rest) == 13
    keys = sorted(e.obj.key for d in first + rest for e in d.events)
    assert keys == [f"in/{i:02d}.jpg" for i in range(25)]
    await source.ack(first + rest)  # three DeleteMessageBatch calls
    assert sqs_depth(moto_url, queue_url) == 0
    assert await source.receive(0, 0) == []


async def test_sqs_poison_and_sns_messages_are_delivered_and_acked(
    moto_url: str, sqs: tuple[SqsEventSource, str], caplog: pytest.LogCaptureFixture
) -> None:
    source, queue_url = sqs
    client = sqs_client(moto_url)
    client.send_message(QueueUrl=queue_url, MessageBody="{not json " + CANARY)
    client.send_message(
        QueueUrl=queue_url, MessageBody=sns(s3_message("in/via sns+.jpg", source.bucket))
    )
    client.send_message(QueueUrl=queue_url, MessageBody=s3_message("in/x.jpg", "other-bucket"))
    caplog.set_level(logging.WARNING, LOGGER)
    deliveries = await receive_until(source, 3)
    assert sorted(len(d.events) for d in deliveries) == [0, 0, 1]
    assert [e.obj.key for d in deliveries for e in d.events] == ["in/via sns+.jpg"]
    assert len(caplog.records) == 1 and "not JSON" in caplog.records[0].getMessage()
    assert CANARY not in caplog.text
    await source.ack(deliveries)
    assert sqs_depth(moto_url, queue_url) == 0


async def test_sqs_unacked_message_is_delivered_again(
    moto_url: str, sqs_source: tuple[SqsEventSource, str]
) -> None:
    _, queue_url = sqs_source
    cfg = sqs_config(queue_url, moto_url, "bkt")
    source = SqsEventSource(
        cfg, aws_access_key_id="testing", aws_secret_access_key="testing", visibility_timeout_s=1
    )
    try:
        sqs_client(moto_url).send_message(QueueUrl=queue_url, MessageBody=s3_message("in/a", "bkt"))
        (first,) = await source.receive(10, 0)
        assert await source.receive(10, 0) == []  # invisible while the worker holds it
        again = await receive_until(source, 1)  # long polls until the visibility timeout ends
        assert [d.events for d in again] == [first.events]
        # An expired receipt: real SQS reports it as Failed (logged, not raised); moto deletes
        # the message anyway, so the second ack finds nothing left to delete.
        await source.ack([first])
        await source.ack(again)
        assert sqs_depth(moto_url, queue_url) == 0
    finally:
        await source.close()


async def test_sqs_errors(moto_url: str) -> None:
    secret = "SECRETKEY" + uuid.uuid4().hex
    # Nothing listens on this port: retryable, names the queue, never the credentials.
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = sqs_config(f"{dead}/123456789012/events", dead, "bkt")
    source = SqsEventSource(
        cfg, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key=secret, retries=0
    )
    try:
        with pytest.raises(SourceRetryable, match="123456789012/events") as info:
            await source.receive(10, 0)
        assert secret not in str(info.value) and "AKIDEXAMPLE" not in str(info.value)
    finally:
        await source.close()
    # A queue that does not exist: not retryable, names the queue.
    cfg = sqs_config(f"{moto_url}/123456789012/missing-queue", moto_url, "bkt")
    source = SqsEventSource(cfg, aws_access_key_id="testing", aws_secret_access_key=secret)
    try:
        with pytest.raises(SourceError, match=r"missing-queue.*does not exist") as err:
            await source.receive(10, 0)
        assert not err.value.retryable and secret not in str(err.value)
    finally:
        await source.close()


# --- Azure storage queue through Azurite ---------------------------------------------------------


def queue_client(server: AzuriteQueueServer, name: str) -> Any:
    from azure.storage.queue import QueueClient

    return QueueClient.from_connection_string(server.connection_string, name)


def new_azure_queue(server: AzuriteQueueServer) -> str:
    name = f"q-{uuid.uuid4().hex[:12]}"
    queue_client(server, name).create_queue()
    return name


def azure_depth(server: AzuriteQueueServer, name: str) -> int:
    """Messages in the queue, visible or not."""
    return int(queue_client(server, name).get_queue_properties().approximate_message_count)


@pytest.fixture
async def azq(
    azurite_queue: AzuriteQueueServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[AzureQueueEventSource, str]]:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_queue.connection_string)
    name = new_azure_queue(azurite_queue)
    source = AzureQueueEventSource(azure_config(name, CONTAINER))
    try:
        yield source, name
    finally:
        await source.close()


async def test_azure_blob_events_through_a_storage_queue(
    azurite: AzuriteServer,
    azurite_queue: AzuriteQueueServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Blobs really uploaded to Azurite; their Event Grid events (which Azurite cannot emit)
    written as a storage-queue subscription writes them; read through open_events."""
    from azure.storage.blob import BlobServiceClient

    container = f"c-{uuid.uuid4().hex[:12]}"
    azure_create_container(azurite, container)
    blobs = {"in/a b ü.jpg": b"one", "in/x+y/日本 %.png": b"two two", "out/z.jpg": b"3"}
    azure_seed(azurite, container, blobs)
    cc = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        container
    )
    queue = new_azure_queue(azurite_queue)
    qc = queue_client(azurite_queue, queue)
    for name in blobs:
        props = cc.get_blob_client(name).get_blob_properties()
        # Event Grid's eTag has no quotes; the SDK's has.
        ev = eg_event(name, container=container, size=props.size, etag=props.etag.strip('"'))
        qc.send_message(b64(ev))
    qc.send_message(
        b64(
            eg_event("in/gone.jpg", container=container, event_type="Microsoft.Storage.BlobDeleted")
        )
    )
    qc.send_message(b64(eg_event("in/a b ü.jpg", container="another-container")))
    qc.send_message(json.dumps([eg_event("in/raw.jpg", container=container, size=1, etag="e")]))
    qc.send_message("%%% poison " + CANARY)
    messages = len(blobs) + 4

    # The queue client gets the Azurite queue endpoint from the connection string; the blob
    # source needs its own (a test-only split: one real account serves both from one string).
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        azurite_queue.connection_string + f"BlobEndpoint={azurite.blob_url};",
    )
    caplog.set_level(logging.WARNING, LOGGER)
    cfg = azure_config(queue, container)
    async with open_events(cfg) as source:
        assert isinstance(source, AzureQueueEventSource)
        deliveries = await receive_until(source, messages, max_messages=32)
        assert len(deliveries) == messages
        assert sum(1 for d in deliveries if not d.events) == 3  # out/, other container, poison
        events = [e for d in deliveries for e in d.events]
        listed = await list_source(AzureSource(cfg.source), PREFIX)
        made = {e.obj.key: e.obj for e in events if e.kind == "created"}
        assert set(made) == {"in/a b ü.jpg", "in/x+y/日本 %.png", "in/raw.jpg"}
        for key in ("in/a b ü.jpg", "in/x+y/日本 %.png"):
            assert made[key] == ObjectInfo(key, listed[key].size, listed[key].etag)
            assert made[key].size == len(blobs[key])
        assert [e.obj.key for e in events if e.kind == "deleted"] == ["in/gone.jpg"]
        assert len(caplog.records) == 1 and "neither JSON nor base64" in caplog.text
        assert CANARY not in caplog.text

        await source.ack(deliveries)
        assert azure_depth(azurite_queue, queue) == 0
        assert await source.receive(32, 0) == []


async def test_azure_receive_is_bounded(
    azq: tuple[AzureQueueEventSource, str], azurite_queue: AzuriteQueueServer
) -> None:
    source, name = azq
    qc = queue_client(azurite_queue, name)
    for i in range(40):
        qc.send_message(b64(eg_event(f"in/{i:02d}.jpg")))
    first = await source.receive(35, 0)
    assert len(first) == 35  # pages of 32 + 3, never more than asked
    rest = await source.receive(100, 0)
    assert len(rest) == 5
    assert sorted(e.obj.key for d in first + rest for e in d.events) == [
        f"in/{i:02d}.jpg" for i in range(40)
    ]
    await source.ack(first + rest)
    assert azure_depth(azurite_queue, name) == 0


async def test_azure_receive_waits_then_returns_nothing(
    azq: tuple[AzureQueueEventSource, str],
) -> None:
    source, _ = azq
    start = time.monotonic()
    assert await source.receive(10, 0.3) == []
    assert 0.3 <= time.monotonic() - start < 3


async def test_azure_unacked_message_is_delivered_again(
    azurite_queue: AzuriteQueueServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_queue.connection_string)
    name = new_azure_queue(azurite_queue)
    queue_client(azurite_queue, name).send_message(b64(eg_event("in/a")))
    source = AzureQueueEventSource(azure_config(name, CONTAINER), visibility_timeout_s=1)
    try:
        (first,) = await source.receive(10, 0)
        assert await source.receive(10, 0) == []  # invisible while the worker holds it
        again = await receive_until(source, 1)
        assert [d.events for d in again] == [first.events] == [[created("in/a", 12, AZ_ETAG)]]
        caplog.set_level(logging.WARNING, LOGGER)
        await source.ack([first])  # a stale pop receipt: logged, not raised
        assert "(PopReceiptMismatch): they will be delivered again" in caplog.text
        await source.ack(again)
        assert azure_depth(azurite_queue, name) == 0
    finally:
        await source.close()


async def test_azure_errors(
    azurite_queue: AzuriteQueueServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on this port: retryable, names the queue, never the key.
    dead = azurite_queue.connection_string.replace(
        azurite_queue.queue_url.split("/")[2], f"127.0.0.1:{free_port()}"
    )
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", dead)
    source = AzureQueueEventSource(azure_config("events", CONTAINER), retries=0)
    try:
        with pytest.raises(SourceRetryable, match="Azure queue 'events'") as info:
            await source.receive(10, 0)
        assert AZURITE_KEY not in str(info.value)
    finally:
        await source.close()
    # A queue that does not exist: not retryable.
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_queue.connection_string)
    source = AzureQueueEventSource(azure_config("missing-queue", CONTAINER))
    try:
        with pytest.raises(SourceError, match=r"'missing-queue'.*does not exist") as err:
            await source.receive(10, 0)
        assert not err.value.retryable and AZURITE_KEY not in str(err.value)
    finally:
        await source.close()
    # A broken connection string: a config error that does not quote it.
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountKey=" + AZURITE_KEY)
    with pytest.raises(ConfigError) as cerr:
        AzureQueueEventSource(azure_config("events", CONTAINER))
    assert AZURITE_KEY not in str(cerr.value)


class _AckFails:
    """An event queue whose delete fails (an SQS 5xx no emulator gives on demand): one
    delivery of a delete event, then nothing."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self.given = False
        self.acks = 0

    async def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        if self.given:
            if self.acks:
                self.stop()  # the loop came back for more: it survived the failed ack
            await asyncio.sleep(0)
            return []
        self.given = True
        gone = ObjectEvent("deleted", ObjectInfo("k/gone.jpg", 0))
        return [Delivery([gone], receipt="r1")]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.acks += 1
        raise SourceRetryable("SQS DeleteMessageBatch: HTTP 503")

    async def close(self) -> None:
        pass


async def test_a_failed_ack_does_not_end_the_worker_s_event_loop(tmp_path: Path) -> None:
    """Not acked means delivered again (and deduplicated by the ledger): the loop logs it and
    carries on instead of raising into the task group that also runs the sync."""
    from types import SimpleNamespace

    from ingest.ledger import open_ledger
    from ingest.worker.loop import Worker

    cfg = Config()
    cfg.worker.events_wait_s = 0.01
    worker = Worker(cfg)
    events = _AckFails(worker.stop)
    async with open_ledger(str(tmp_path / "l.sqlite"), "job") as ledger:
        engine = SimpleNamespace(ledger=ledger)
        await asyncio.wait_for(worker._events_loop(engine, events), 30)  # type: ignore[arg-type]
    assert events.acks == 1
    assert "events ack" in worker.health.last_error and "503" in worker.health.last_error
