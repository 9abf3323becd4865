"""Storage requests: the fixed cap (``source.max_requests_per_s``, aiolimiter) and the retries
of what no SDK retries (backoff), against real emulators (moto, fake-gcs-server, Azurite)
behind a recording proxy (``tests/support/proxy.py``) that counts every request as it arrives
and injects the faults the emulators cannot produce."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from ingest.config import SourceConfig
from ingest.errors import BucketNotFound, SourceRetryable
from ingest.providers import Shard, Source
from ingest.providers.aws.s3 import S3Source
from ingest.providers.azure.blob import AzureSource
from ingest.providers.cap import DEPTH_S, RequestCap, limiter_shape
from ingest.providers.gcp.gcs import GCSSource
from ingest.providers.transient import MAX_TRIES
from tests.conftest import seed_bucket
from tests.support.emulators import (
    AzuriteServer,
    azure_create_container,
    azure_seed,
    gcs_create_bucket,
    gcs_seed,
)
from tests.support.proxy import Proxy, proxy_to

pytestmark = pytest.mark.timeout(180)

CAP = 20.0  # requests per second
KEYS = [f"cap/{i:03d}.bin" for i in range(40)]
BODY = b"y" * 2000
UPLOADS = 10


def allowed_in(window_s: float) -> int:
    """The most a leaky bucket DEPTH_S deep lets through in ``window_s``, plus two requests
    of slack: the proxy records an arrival when its handler runs, which a busy machine can
    delay and bunch."""
    return int(CAP * (window_s + DEPTH_S)) + 2


async def exercise(source: Source) -> int:
    """What a run does to a bucket: list it page by page, read every object, write
    thumbnails — reads and writes at once. Returns the objects listed."""
    listed = 0
    async for page in source.list_pages(Shard("cap/")):
        listed += len(page.objects)
    await asyncio.gather(
        *(source.read_range(k, 0, 100) for k in KEYS),
        *(source.upload(f"thumbs/{i}.jpg", b"t" * 300, "image/jpeg") for i in range(UPLOADS)),
    )
    return listed


async def capped(make: Callable[[str, float], Source], upstream: str) -> None:
    """The work through a recording proxy, under the cap: no window of time holds more
    requests than the cap lets through, and all of them took as long as the cap implies.
    (Without the limiter, the window check fails for all three providers: tried.)"""
    async with proxy_to(upstream) as proxy:
        source = make(proxy.url, CAP)
        try:
            assert await exercise(source) == len(KEYS)
        finally:
            await source.close()
    n = proxy.count()
    assert n >= len(KEYS) + UPLOADS + 4  # at least: reads, writes, 4 listing pages
    for window in (0.5, 1.0, 2.0):
        assert proxy.max_in_window(window) <= allowed_in(window), (window, proxy.arrivals)
    times = sorted(t for t, _m, _p in proxy.arrivals)
    assert times[-1] - times[0] >= (n - allowed_in(0)) / CAP


async def test_s3_requests_stay_under_the_cap(moto_url: str) -> None:
    bucket = f"cap-{uuid.uuid4().hex[:10]}"
    seed_bucket(moto_url, bucket, KEYS, body=BODY)

    def make(url: str, cap: float) -> Source:
        cfg = SourceConfig(
            provider="aws", bucket=bucket, endpoint_url=url, page_size=10, max_requests_per_s=cap
        )
        return S3Source(cfg, aws_access_key_id="testing", aws_secret_access_key="testing")

    await capped(make, moto_url)


async def test_gcs_requests_stay_under_the_cap(fake_gcs_url: str) -> None:
    bucket = f"cap-{uuid.uuid4().hex[:10]}"
    gcs_create_bucket(fake_gcs_url, bucket)
    gcs_seed(fake_gcs_url, bucket, {k: BODY for k in KEYS})

    def make(url: str, cap: float) -> Source:
        cfg = SourceConfig(
            provider="gcp", bucket=bucket, endpoint_url=url, page_size=10, max_requests_per_s=cap
        )
        return GCSSource(cfg)

    await capped(make, fake_gcs_url)


async def test_azure_requests_stay_under_the_cap(
    azurite: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = f"cap-{uuid.uuid4().hex[:10]}"
    azure_create_container(azurite, container)
    azure_seed(azurite, container, {k: BODY for k in KEYS})
    upstream, _, account_path = azurite.blob_url.rpartition("/")
    counter = iter(range(1000))

    def make(url: str, cap: float) -> Source:
        env = f"TEST_CAP_CONN_{next(counter)}"
        conn = azurite.connection_string.replace(azurite.blob_url, f"{url}/{account_path}")
        monkeypatch.setenv(env, conn)
        cfg = SourceConfig(
            provider="azure",
            bucket=container,
            page_size=10,
            connection_string_env=env,
            max_requests_per_s=cap,
        )
        return AzureSource(cfg)

    await capped(make, upstream)


# --- retries of what the SDK does not retry ------------------------------------------------------


def _gcs_through(proxy: Proxy, bucket: str) -> GCSSource:
    return GCSSource(SourceConfig(provider="gcp", bucket=bucket, endpoint_url=proxy.url))


async def test_gcs_retries_a_503_and_a_dropped_body(fake_gcs_url: str) -> None:
    bucket = f"rt-{uuid.uuid4().hex[:10]}"
    gcs_create_bucket(fake_gcs_url, bucket)
    gcs_seed(fake_gcs_url, bucket, {"a/1.bin": BODY})
    async with proxy_to(fake_gcs_url) as proxy:
        source = _gcs_through(proxy, bucket)
        try:
            proxy.fail_next = 2
            pages = [p async for p in source.list_pages(Shard("a/"))]
            assert [o.key for p in pages for o in p.objects] == ["a/1.bin"]
            assert proxy.count("GET") == 3  # two 503s, then the page
            proxy.cut_next = 1
            assert await source.read_range("a/1.bin", 0, len(BODY)) == BODY
            assert proxy.count("GET") == 5  # the cut read, then the whole read again
            proxy.fail_next = 1
            await source.upload("a/2.bin", BODY[:100], "application/octet-stream")
            assert proxy.count("POST") == 2  # a 503, then the upload
            assert await source.read_range("a/2.bin", 0, 100) == BODY[:100]
        finally:
            await source.close()


async def test_gcs_gives_up_after_max_tries_and_never_retries_a_404(fake_gcs_url: str) -> None:
    bucket = f"rt-{uuid.uuid4().hex[:10]}"
    gcs_create_bucket(fake_gcs_url, bucket)
    gcs_seed(fake_gcs_url, bucket, {"a/1.bin": BODY})
    async with proxy_to(fake_gcs_url) as proxy:
        source = _gcs_through(proxy, bucket)
        try:
            proxy.fail_next = 100
            with pytest.raises(SourceRetryable, match="GCS error 503"):
                await source.read_range("a/1.bin", 0, 10)
            assert proxy.count() == MAX_TRIES
            proxy.fail_next, proxy.fail_status = 1, 404
            with pytest.raises(BucketNotFound):
                _ = [p async for p in source.list_pages(Shard("a/"))]
            assert proxy.count() == MAX_TRIES + 1
        finally:
            await source.close()


async def test_s3_retries_a_body_cut_short(moto_url: str) -> None:
    """botocore retries a request up to its headers; a body that breaks off after them is
    retried by us (read_range and download)."""
    bucket = f"rt-{uuid.uuid4().hex[:10]}"
    seed_bucket(moto_url, bucket, ["a/1.bin"], body=BODY)
    async with proxy_to(moto_url) as proxy:
        cfg = SourceConfig(provider="aws", bucket=bucket, endpoint_url=proxy.url)
        source = S3Source(cfg, aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            proxy.cut_next = 1
            assert await source.read_range("a/1.bin", 0, len(BODY)) == BODY
            assert proxy.count("GET") == 2
        finally:
            await source.close()


# --- caps below 10/s, and one cap per bucket ------------------------------------------------------


@pytest.mark.parametrize("cap", [1.9, 0.36])
async def test_s3_works_under_a_cap_below_ten_per_second(moto_url: str, cap: float) -> None:
    """aiolimiter refuses to acquire more than its max_rate: a bucket shaped as cap * (1/cap)
    = 0.999… requests failed every request before the fix."""
    bucket = f"cap-{uuid.uuid4().hex[:10]}"
    seed_bucket(moto_url, bucket, ["a/1.bin"], body=BODY)
    async with proxy_to(moto_url) as proxy:
        cfg = SourceConfig(
            provider="aws", bucket=bucket, endpoint_url=proxy.url, max_requests_per_s=cap
        )
        source = S3Source(cfg, aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            await source.check_access()  # two requests
            assert await source.read_range("a/1.bin", 0, 10) == BODY[:10]
        finally:
            await source.close()
    times = sorted(t for t, _m, _p in proxy.arrivals)
    assert len(times) == 3
    assert times[-1] - times[0] >= 2 / cap * 0.75  # the first arrival may lag (connecting)


def test_limiter_holds_at_least_one_request() -> None:
    for cap in (0.01, 0.36, 1.9, 9.99, 10.0, 20.0, 1000.0):
        max_rate, period = limiter_shape(cap)
        assert max_rate >= 1.0
        assert max_rate / period == pytest.approx(cap)


async def test_source_and_upload_on_one_bucket_share_one_cap() -> None:
    """Two clients of the same bucket (``[source]`` and ``[upload]``) together stay under
    the cap; another bucket has its own."""
    key = ("aws", "http://x", f"b-{uuid.uuid4().hex}")
    a, b = RequestCap(4.0, key), RequestCap(4.0, key)
    other = RequestCap(4.0, ("aws", "http://x", "another"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(3):  # 6 requests at 4/s: at least 5 / 4 s after the first
        await a.wait()
        await b.wait()
    assert loop.time() - t0 >= 5 / 4 * 0.9
    t1 = loop.time()
    await other.wait()
    assert loop.time() - t1 < 0.2


async def test_gcs_cap_wait_is_not_part_of_the_request_timeout() -> None:
    """The cap is waited for before aiohttp's timer starts: a wait longer than the request's
    time limit neither eats it (a 0.4 s answer fits a 0.8 s limit after a ~2 s wait) nor
    switches it off (a 3 s answer still times out). Under the old trace hook, the slow request
    got no time limit at all."""
    from aiohttp import ClientTimeout, web

    from ingest.providers.gcp.gcs import CappedSession

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query["after_s"]))  # the server's slowness
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    limit = ClientTimeout(total=0.8)
    loop = asyncio.get_running_loop()
    try:
        async with CappedSession(RequestCap(0.5)) as session:  # a request every 2 s
            async with session.get(f"http://127.0.0.1:{port}/?after_s=0") as resp:
                assert resp.status == 200  # takes the one request the bucket holds
            async with session.get(f"http://127.0.0.1:{port}/?after_s=0.4", timeout=limit) as r:
                assert await r.text() == "ok"
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                async with session.get(f"http://127.0.0.1:{port}/?after_s=3", timeout=limit) as r:
                    await r.text()
            assert loop.time() - t0 < 3.5  # ~1.6 s of waiting for the cap, 0.8 s limit
    finally:
        await runner.cleanup()


# --- retries do not multiply ----------------------------------------------------------------------


async def test_s3_tries_a_failing_request_max_attempts_times_in_all(moto_url: str) -> None:
    """botocore's legacy ``max_attempts`` adds the first try (6 requests for 5): we give
    ``total_max_attempts``."""
    from ingest.providers.aws.s3 import MAX_ATTEMPTS

    bucket = f"rt-{uuid.uuid4().hex[:10]}"
    seed_bucket(moto_url, bucket, ["a/1.bin"], body=BODY)
    async with proxy_to(moto_url) as proxy:
        cfg = SourceConfig(provider="aws", bucket=bucket, endpoint_url=proxy.url)
        source = S3Source(cfg, aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            proxy.fail_next = 100
            with pytest.raises(SourceRetryable):
                await source.read_range("a/1.bin", 0, 10)
            assert proxy.count("GET") == MAX_ATTEMPTS
        finally:
            await source.close()


def test_gcs_never_retries_tls_failures_and_a_resumable_upload_only_unanswered() -> None:
    import ssl

    import aiohttp

    from ingest.providers.gcp.gcs import _transient, _transient_unanswered

    key: Any = None  # the connection key only names the host in messages
    certificate = aiohttp.ClientConnectorCertificateError(key, ssl.SSLCertVerificationError())
    handshake = aiohttp.ClientSSLError(key, ssl.SSLError())
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError())
    answered = aiohttp.ClientResponseError(None, (), status=503)  # type: ignore[arg-type]
    assert not _transient(certificate) and not _transient(handshake)
    assert _transient(refused) and _transient(answered) and _transient(TimeoutError())
    # gcloud-aio tried the resumable PUT 5 times on every answer already
    assert not _transient_unanswered(answered) and not _transient_unanswered(certificate)
    assert _transient_unanswered(refused) and _transient_unanswered(TimeoutError())
