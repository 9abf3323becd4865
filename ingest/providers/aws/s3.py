"""Amazon S3 (and any S3-compatible store) through aiobotocore.

One client for the whole run, with explicit timeouts, bounded retries and a connection pool
sized for the listing fan-out. Credentials come from the AWS default chain or a named profile;
they never appear in messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

from aiohttp import ClientPayloadError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from ingest.config import SourceConfig
from ingest.errors import AccessDenied, BucketNotFound, ObjectNotFound, SourceError, SourceRetryable
from ingest.log import redact, without_userinfo
from ingest.model import ObjectInfo
from ingest.providers import Page, Shard, read_chunks, write_chunks
from ingest.providers.aws import s3_xml
from ingest.providers.aws.client import AwsClient, ClientSpec, credentials_problem
from ingest.providers.aws.s3_xml import fast_timestamp
from ingest.providers.cap import RequestCap
from ingest.providers.transient import retry_transient

__all__ = ["S3Source", "fast_timestamp"]

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 5  # botocore's "standard" retries: attempts in all, the first included
MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
PART_BYTES = 16 * 1024 * 1024
_NOT_FOUND = {"NoSuchBucket", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}


def _install_list_parser(client: Any) -> None:
    # ListObjectsV2 pages are parsed by ingest.providers.aws.s3_xml (one walk of the tree
    # instead of botocore's per-element shape walk and its second parse for the "200 with an
    # error" check); anything unusual still goes to botocore.
    s3_xml.install(client.meta.events)


def _objects(contents: list[dict[str, Any]]) -> list[ObjectInfo]:
    # An aware datetime's isoformat() costs about as much as the rest of the conversion, and
    # objects written together share their LastModified: format each distinct one once a page.
    iso: dict[Any, str] = {}
    out = []
    for o in contents:
        modified = o.get("LastModified")
        if modified is None:
            text = ""
        else:
            text = iso.get(modified) or iso.setdefault(modified, modified.isoformat())
        out.append(
            ObjectInfo(
                key=o["Key"],
                size=int(o.get("Size", 0)),
                etag=str(o.get("ETag", "")).strip('"'),
                last_modified=text,
            )
        )
    return out


# An object's body breaking off after its headers: botocore's retries stop at the headers.
_BODY_ERRORS = (ResponseStreamingError, ReadTimeoutError, IncompleteReadError, ClientPayloadError)


class BodyBroken(Exception):
    """The body of a GET broke off mid-stream; ``cause`` is the SDK's error. Retried here
    (``ingest/providers/transient.py``), then mapped like any other error."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _body(read: Awaitable[bytes]) -> bytes:
    try:
        return await read
    except _BODY_ERRORS as e:
        raise BodyBroken(e) from e


class S3Source:
    provider = "aws"

    def __init__(
        self,
        cfg: SourceConfig,
        *,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
    ) -> None:
        self.bucket = cfg.bucket
        self.cfg = cfg
        spec = ClientSpec(
            "s3",
            connect_timeout_s=CONNECT_TIMEOUT_S,
            read_timeout_s=READ_TIMEOUT_S,
            max_attempts=MAX_ATTEMPTS,
            region=cfg.region,
            profile=cfg.profile,
            endpoint_url=cfg.endpoint_url,
            access_key_id=aws_access_key_id,
            secret_access_key=aws_secret_access_key,
            max_pool_connections=max(10, cfg.list_concurrency * 2),
            # botocore parses every LastModified through dateutil: a quarter of the engine's
            # CPU at a million keys. S3 sends ISO 8601, which the standard library parses ~20x
            # faster; anything else goes to botocore's own parser.
            timestamp_parser=fast_timestamp,
        )
        self.cap = RequestCap(cfg.max_requests_per_s, ("aws", cfg.endpoint_url, cfg.bucket))
        self._client = AwsClient(spec, on_open=self._on_open)

    def _on_open(self, client: Any) -> None:
        _install_list_parser(client)
        if self.cap.active:
            # Every HTTP request of this client, botocore's retries and multipart parts too.
            client.meta.events.register("before-send.s3", self._before_send)

    async def _before_send(self, **_: Any) -> None:
        await self.cap.wait()  # None: botocore sends the request itself

    def storage_key(self, key: str) -> str:
        return key

    async def _s3(self) -> Any:
        return await self._client.get()

    async def close(self) -> None:
        await self._client.close()

    def _where(self) -> str:
        return f" at {without_userinfo(self.cfg.endpoint_url)}" if self.cfg.endpoint_url else ""

    def _map(self, e: Exception, what: str) -> SourceError:
        problem = credentials_problem(e, self.cfg.profile)
        if problem is not None:
            return AccessDenied(f"bucket '{self.bucket}': {problem}")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchKey":
                return ObjectNotFound(f"{what}: no such object in bucket '{self.bucket}'")
            if code in _NOT_FOUND:
                return BucketNotFound(f"bucket '{self.bucket}' does not exist{self._where()}")
            if code in _DENIED or status == 403:
                return AccessDenied(
                    f"access denied to bucket '{self.bucket}'{self._where()} ({code}): check the "
                    "AWS credentials and the bucket policy"
                )
            return SourceRetryable(f"{what}: S3 error {code or status}")
        if isinstance(e, EndpointConnectionError):
            return SourceRetryable(f"cannot reach S3{self._where()}")
        text = str(e)
        if self.cfg.endpoint_url:  # botocore's messages carry the URL it was given
            text = text.replace(self.cfg.endpoint_url, without_userinfo(self.cfg.endpoint_url))
        return SourceRetryable(f"{what}: {type(e).__name__}: {redact(text)[:200]}")

    async def check_access(self) -> None:
        s3 = await self._s3()
        try:
            await s3.head_bucket(Bucket=self.bucket)
            await s3.list_objects_v2(Bucket=self.bucket, MaxKeys=1, Prefix=self.cfg.prefix)
        except (ClientError, BotoCoreError) as e:
            raise self._map(e, "check access") from None

    def checkpoint_key(self, checkpoint: str) -> str:
        return checkpoint  # the last key listed

    async def list_pages(self, shard: Shard, checkpoint: str = "") -> AsyncIterator[Page]:
        s3 = await self._s3()
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": shard.prefix,
            "MaxKeys": self.cfg.page_size,
        }
        if not shard.recursive:
            params["Delimiter"] = "/"
        if checkpoint:
            params["StartAfter"] = checkpoint
        last = checkpoint
        while True:
            try:
                resp = await s3.list_objects_v2(**params)
            except (ClientError, BotoCoreError) as e:
                raise self._map(e, f"list '{shard.prefix}'") from None
            objects = _objects(resp.get("Contents", []))
            prefixes = [p["Prefix"] for p in resp.get("CommonPrefixes", [])]
            if objects:
                last = objects[-1].key
            truncated = bool(resp.get("IsTruncated"))
            yield Page(objects, prefixes, last)
            if not truncated:
                return
            params.pop("StartAfter", None)
            params["ContinuationToken"] = resp["NextContinuationToken"]

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        s3 = await self._s3()
        try:
            return await self._read_range(s3, key, start, end)
        except BodyBroken as e:
            raise self._map(e.cause, f"read '{key}'") from None
        except (ClientError, BotoCoreError) as e:
            raise self._map(e, f"read '{key}'") from None

    @retry_transient(lambda e: isinstance(e, BodyBroken))
    async def _read_range(self, s3: Any, key: str, start: int, end: int) -> bytes:
        resp = await s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        async with resp["Body"] as body:
            return bytes(await _body(body.read()))

    async def download(self, key: str, dest: Path) -> None:
        s3 = await self._s3()
        try:
            await self._download(s3, key, dest)
        except BodyBroken as e:
            raise self._map(e.cause, f"download '{key}'") from None
        except (ClientError, BotoCoreError) as e:
            raise self._map(e, f"download '{key}'") from None

    @retry_transient(lambda e: isinstance(e, BodyBroken))
    async def _download(self, s3: Any, key: str, dest: Path) -> None:
        """The whole object again on a retry: ``dest`` is rewritten from the start."""
        resp = await s3.get_object(Bucket=self.bucket, Key=key)
        async with resp["Body"] as body:
            await write_chunks(read_chunks(lambda n: _body(body.read(n))), dest)

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None:
        s3 = await self._s3()
        extra: dict[str, Any] = {"ContentType": content_type}
        if content_encoding:
            extra["ContentEncoding"] = content_encoding
        try:
            if isinstance(data, Path):
                size = (await asyncio.to_thread(data.stat)).st_size
                if size > MULTIPART_THRESHOLD_BYTES:
                    await self._multipart(s3, key, data, extra)
                    return
                body = await asyncio.to_thread(data.read_bytes)
            else:
                body = data
            await s3.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
        except (ClientError, BotoCoreError) as e:
            raise self._map(e, f"upload '{key}'") from None

    async def _multipart(self, s3: Any, key: str, path: Path, extra: dict[str, Any]) -> None:
        mpu = await s3.create_multipart_upload(Bucket=self.bucket, Key=key, **extra)
        parts = []
        try:
            f = await asyncio.to_thread(path.open, "rb")
            try:
                n = 1
                while chunk := await asyncio.to_thread(f.read, PART_BYTES):
                    r = await s3.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=mpu["UploadId"],
                        PartNumber=n,
                        Body=chunk,
                    )
                    parts.append({"ETag": r["ETag"], "PartNumber": n})
                    n += 1
            finally:
                await asyncio.to_thread(f.close)
            await s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=mpu["UploadId"],
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=mpu["UploadId"])
            raise
