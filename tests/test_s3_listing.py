"""The fast ListObjectsV2 parser (ingest/providers/aws/s3_xml.py).

Three layers: the parser against botocore's own on hand-written bodies (the edge cases of XML
that a key can hit); the S3 source against moto over a socket, compared key for key with a
plain aiobotocore client; and error pages from a one-route aiohttp server over a socket
(error XML with a 4xx/5xx status, S3's "200 with an error inside", a truncated body), which
must map and retry exactly as botocore alone does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from botocore.loaders import Loader
from botocore.model import ServiceModel
from botocore.parsers import RestXMLParser

from ingest.config import SourceConfig
from ingest.errors import AccessDenied, BucketNotFound, SourceRetryable
from ingest.providers import Page, Shard
from ingest.providers.aws import s3_xml
from ingest.providers.aws.s3 import S3Source
from ingest.providers.aws.s3_xml import fast_timestamp, parse_list_objects_v2
from tests.conftest import s3_client
from tests.support.e2e import free_port

NS = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def _shape() -> Any:
    model = ServiceModel(Loader().load_service_model("s3", "service-2"), "s3")
    return model.operation_model("ListObjectsV2").output_shape


OUTPUT = _shape()


def botocore_parse(body: bytes) -> dict[str, Any]:
    """What botocore's parser makes of a 200 body (the payload members only)."""
    parser = RestXMLParser(timestamp_parser=fast_timestamp)
    parsed = parser.parse({"body": body, "headers": {}, "status_code": 200}, OUTPUT)
    parsed.pop("ResponseMetadata", None)
    return dict(parsed)


def page(inner: str, ns: str = NS, decl: str = '<?xml version="1.0" encoding="UTF-8"?>') -> bytes:
    return f"{decl}<ListBucketResult{ns}>{inner}</ListBucketResult>".encode()


def obj(key: str, size: int = 3, extra: str = "") -> str:
    return (
        f"<Contents><Key>{key}</Key><LastModified>2026-11-25T05:24:17.393Z</LastModified>"
        f"<ETag>&quot;abc&quot;</ETag>{extra}<Size>{size}</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
    )


HEAD = "<Name>b</Name><Prefix></Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>"

SAME_AS_BOTOCORE = {
    "entities": page(HEAD + obj("a&amp;b &lt;c&gt; &quot;d&quot; &apos;e&apos;") + obj("f")),
    "character references": page(HEAD + obj("&#x65E5;&#26412;&#xD;&#9;x") + obj("y&#x1F600;")),
    "cdata": page(HEAD + obj("<![CDATA[a<b>&c]]>")),
    "crlf in text": page(HEAD + obj("line1\r\nline2\rline3")),
    "unicode and spaces": page(HEAD + obj(" b/ünïcödé/日本語 x.jpg ") + obj("😀/\u00a0")),
    "long key": page(HEAD + obj("k/" + "é" * 1020)),
    "no namespace": page(HEAD + obj("a"), ns=""),
    "no declaration": page(HEAD + obj("a"), decl=""),
    "pretty printed": page("\n  " + HEAD.replace("><", ">\n  <") + "\n  " + obj("a") + "\n"),
    "empty page": page(
        "<Name>b</Name><Prefix>nothing/</Prefix><KeyCount>0</KeyCount>"
        "<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"
    ),
    "truncated with token": page(
        HEAD + "<IsTruncated>true</IsTruncated><ContinuationToken>t0</ContinuationToken>"
        "<NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>"
        + obj("a")
        + obj("b")
        + "<StartAfter>0</StartAfter>"
    ),
    "delimiter and prefixes": page(
        "<Name>b</Name><Prefix>a/</Prefix><Delimiter>/</Delimiter><KeyCount>3</KeyCount>"
        "<MaxKeys>3</MaxKeys><IsTruncated>false</IsTruncated>"
        + obj("a/x")
        + "<CommonPrefixes><Prefix>a/b&amp;c/</Prefix></CommonPrefixes>"
        "<CommonPrefixes><Prefix>a/ü/</Prefix></CommonPrefixes>"
    ),
    "url encoding type": page(
        "<Name>b</Name><Prefix>a%2F</Prefix><EncodingType>url</EncodingType>" + obj("a%2Fb+c%26")
    ),
    "checksums": page(
        HEAD
        + obj(
            "a",
            extra="<ChecksumAlgorithm>CRC32</ChecksumAlgorithm>"
            "<ChecksumAlgorithm>SHA256</ChecksumAlgorithm><ChecksumType>FULL_OBJECT"
            "</ChecksumType>",
        )
    ),
    "empty elements": page(
        "<Name/><Prefix></Prefix>"
        + obj("", size=0).replace("<ETag>&quot;abc&quot;</ETag>", "<ETag/>")
    ),
    "unknown elements are ignored": page(HEAD + "<Future>x<Deep>y</Deep></Future>" + obj("a")),
    "other timestamp forms": page(
        obj("a").replace("2026-11-25T05:24:17.393Z", "2024-02-29T23:59:59+02:00")
        + obj("b").replace("2026-11-25T05:24:17.393Z", "Mon, 01 Jan 2024 00:00:00 GMT")
    ),
}


@pytest.mark.parametrize("name", sorted(SAME_AS_BOTOCORE))
def test_same_result_as_botocore(name: str) -> None:
    body = SAME_AS_BOTOCORE[name]
    fast = parse_list_objects_v2(body)
    assert fast is not None, "the fast path should take this page"
    assert fast == botocore_parse(body)


FALLS_BACK = {
    "error document": b'<?xml version="1.0"?><Error><Code>InternalError</Code></Error>',
    "truncated body": page(HEAD + obj("a"))[:-40],
    "empty body": b"",
    "not xml": b"<html>502 Bad Gateway",
    "owner (FetchOwner)": page(obj("a", extra="<Owner><ID>1</ID></Owner>")),
    "restore status": page(
        obj(
            "a",
            extra="<RestoreStatus><IsRestoreInProgress>true</IsRestoreInProgress></RestoreStatus>",
        )
    ),
    "contents without key": page("<Contents><Size>1</Size></Contents>"),
    "repeated key": page(obj("a", extra="<Key>b</Key>")),
    "size not a number": page(obj("a").replace("<Size>3</Size>", "<Size>x</Size>")),
    "bad timestamp": page(obj("a").replace("2026-11-25T05:24:17.393Z", "yesterday")),
    "repeated scalar": page("<IsTruncated>true</IsTruncated><IsTruncated>false</IsTruncated>"),
    "other root": b"<ListAllMyBucketsResult/>",
}


@pytest.mark.parametrize("name", sorted(FALLS_BACK))
def test_unusual_pages_fall_back_to_botocore(name: str) -> None:
    assert parse_list_objects_v2(FALLS_BACK[name]) is None


def test_fast_path_leaves_other_responses_alone() -> None:
    body = FALLS_BACK["error document"]
    for status, b in [(200, body), (500, body), (404, page(HEAD)), (200, None)]:
        response = {"status_code": status, "body": b, "headers": {}}
        custom: dict[str, Any] = {}
        assert not s3_xml.fast_list_handler(response, custom)
        assert response["body"] is b and custom == {}


# --- against moto, over a socket -------------------------------------------------------------

ODD_KEYS = [
    "amp/&amp;/a&b",
    "lt/<tag>/x>y",
    "quotes/\"double\" 'single'",
    "pct/100% sure+plus=eq?q#h",
    "sp/ leading and trailing ",
    "uni/ünïcödé/日本語/😀.jpg",
    "uni/\u00a0nbsp\u2028sep",
    "ctl/tab\there",
    "long/" + "x" * 1019,
    "long/" + "é" * 500,  # 1005 bytes in UTF-8
    "z",
]


def _source(url: str, bucket: str, page_size: int) -> S3Source:
    cfg = SourceConfig(provider="aws", bucket=bucket, endpoint_url=url, page_size=page_size)
    return S3Source(cfg, aws_access_key_id="testing", aws_secret_access_key="testing")


async def _reference(url: str, bucket: str, **params: Any) -> list[dict[str, Any]]:
    """Every page a plain aiobotocore client (botocore's parser, no hook) returns."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=fast_timestamp
    )
    out = []
    async with session.create_client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as s3:
        while True:
            resp = await s3.list_objects_v2(Bucket=bucket, **params)
            out.append(resp)
            if not resp.get("IsTruncated"):
                return out
            params.pop("StartAfter", None)
            params["ContinuationToken"] = resp["NextContinuationToken"]


@pytest.fixture
def fast_pages(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the pages the fast parser took (so a test cannot pass on botocore's parser)."""
    taken: list[int] = []
    real = s3_xml.parse_list_objects_v2

    def counting(body: bytes) -> dict[str, Any] | None:
        parsed = real(body)
        if parsed is not None:
            taken.append(len(parsed.get("Contents", [])))
        return parsed

    monkeypatch.setattr(s3_xml, "parse_list_objects_v2", counting)
    return taken


async def _pages(src: S3Source, shard: Shard, checkpoint: str = "") -> list[Page]:
    return [p async for p in src.list_pages(shard, checkpoint)]


async def test_odd_keys_match_plain_aiobotocore(
    moto_url: str, bucket_name: str, fast_pages: list[int]
) -> None:
    s3 = s3_client(moto_url)
    s3.create_bucket(Bucket=bucket_name)
    for i, k in enumerate(ODD_KEYS):
        s3.put_object(Bucket=bucket_name, Key=k, Body=b"x" * i)
    src = _source(moto_url, bucket_name, 2)
    try:
        ps = await _pages(src, Shard(""))
    finally:
        await src.close()
    ref = await _reference(moto_url, bucket_name, Prefix="", MaxKeys=2)
    expected = [o for r in ref for o in r.get("Contents", [])]
    got = [o for p in ps for o in p.objects]
    assert [o.key for o in got] == sorted(ODD_KEYS) == [o["Key"] for o in expected]
    for o, e in zip(got, expected, strict=True):
        assert o.size == e["Size"] and o.etag == e["ETag"].strip('"')
        assert o.last_modified == e["LastModified"].isoformat()
    assert [p.checkpoint for p in ps] == [r["Contents"][-1]["Key"] for r in ref]
    assert len(ps) == len(ref) == 6 and sum(fast_pages) == len(ODD_KEYS)


async def test_truncated_pages_resume_and_prefixes(
    moto_url: str, bucket_name: str, fast_pages: list[int]
) -> None:
    s3 = s3_client(moto_url)
    s3.create_bucket(Bucket=bucket_name)
    keys = [f"d/{i:03d}" for i in range(7)] + ["d/sub&1/x", "d/sub<2>/y", "d/ü/z", "e"]
    for k in keys:
        s3.put_object(Bucket=bucket_name, Key=k, Body=b"1")
    src = _source(moto_url, bucket_name, 3)
    try:
        full = await _pages(src, Shard("d/"))
        after = await _pages(src, Shard("d/"), "d/004")
        level = await _pages(src, Shard("d/", recursive=False))
        nothing = await _pages(src, Shard("none/"))
    finally:
        await src.close()
    assert [o.key for p in full for o in p.objects] == sorted(k for k in keys if k < "e")
    assert all(len(p.objects) <= 3 for p in full) and len(full) == 4
    assert [o.key for p in after for o in p.objects] == [
        "d/005",
        "d/006",
        "d/sub&1/x",
        "d/sub<2>/y",
        "d/ü/z",
    ]
    assert [o.key for p in level for o in p.objects] == [f"d/{i:03d}" for i in range(7)]
    assert sorted(x for p in level for x in p.prefixes) == ["d/sub&1/", "d/sub<2>/", "d/ü/"]
    assert len(nothing) == 1 and nothing[0].objects == [] and nothing[0].checkpoint == ""
    assert fast_pages  # the pages went through the fast parser


async def test_denied_listing_maps_to_access_denied(moto_url: str, bucket_name: str) -> None:
    from moto.core.authorization import enable_iam_authentication

    s3_client(moto_url).create_bucket(Bucket=bucket_name)
    cfg = SourceConfig(provider="aws", bucket=bucket_name, endpoint_url=moto_url, page_size=5)
    key_id = "AKIANOTAREALKEY0000"
    with enable_iam_authentication():
        src = S3Source(cfg, aws_access_key_id=key_id, aws_secret_access_key="s3cr3t-value")
        try:
            with pytest.raises(AccessDenied, match=bucket_name) as e:
                await _pages(src, Shard(""))
        finally:
            await src.close()
    assert key_id not in str(e.value) and "s3cr3t" not in str(e.value)


# --- error bodies over a socket ----------------------------------------------------------------


def _error(code: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>m</Message><RequestId>r</RequestId></Error>"
    ).encode()


@asynccontextmanager
async def _server(
    answer: Callable[[web.Request], web.Response],
) -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.method)
        return answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def _xml(status: int, body: bytes) -> Callable[[web.Request], web.Response]:
    return lambda r: web.Response(status=status, body=body, content_type="application/xml")


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's retries without their sleeps: same attempts, seconds less per test."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0)


async def _list_error(status: int, body: bytes) -> tuple[Exception, str, int]:
    """The error list_pages raises against a server answering every request with ``body``,
    its message (the server's URL taken out) and how many requests were sent."""
    async with _server(_xml(status, body)) as (url, seen):
        src = S3Source(
            SourceConfig(provider="aws", bucket="bkt", endpoint_url=url, page_size=5),
            aws_access_key_id="AKIASECRETKEYID0000",
            aws_secret_access_key="s3cr3t-value",
        )
        try:
            await _pages(src, Shard("p/"))
        except Exception as e:
            return e, str(e).replace(url, "URL"), len(seen)
        finally:
            await src.close()
    raise AssertionError("no error raised")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (404, _error("NoSuchBucket"), BucketNotFound),
        (403, _error("AccessDenied"), AccessDenied),
        (403, _error("SignatureDoesNotMatch"), AccessDenied),
        (403, _error("InvalidAccessKeyId"), AccessDenied),
        (503, _error("SlowDown"), SourceRetryable),
        (200, _error("InternalError"), SourceRetryable),  # S3's "200 with an error inside"
        (200, page(HEAD + obj("a"))[:-30], SourceRetryable),  # a body cut short
    ],
)
async def test_error_pages_map_as_botocore_alone(
    status: int, body: bytes, error: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same class, same message, same number of attempts (botocore's retries) as the source
    without the fast parser; no credential in the message."""
    got, message, attempts = await _list_error(status, body)
    monkeypatch.setattr(s3_xml, "install", lambda events: None)
    want, want_message, want_attempts = await _list_error(status, body)
    assert type(got) is type(want) is error
    assert message == want_message and attempts == want_attempts
    assert (attempts > 1) == (error is SourceRetryable)
    assert "AKIASECRETKEYID" not in str(got) and "s3cr3t" not in str(got)


async def test_other_operations_keep_the_200_error_check() -> None:
    """The fast path replaces botocore's "200 with an error" handler on the source's client;
    every other operation still goes through it (a PutObject answered 200 + <Error> retries)."""
    async with _server(_xml(200, _error("InternalError"))) as (url, seen):
        src = S3Source(
            SourceConfig(provider="aws", bucket="bkt", endpoint_url=url),
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        try:
            with pytest.raises(SourceRetryable):
                await src.upload("k", b"x", "application/octet-stream")
        finally:
            await src.close()
    assert len(seen) > 1 and set(seen) == {"PUT"}
