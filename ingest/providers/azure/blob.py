"""Azure Blob Storage through azure-storage-blob's aio client.

``source.bucket`` is the CONTAINER; the storage account comes from the credentials, tried in
this order (``auth.py``, shared with the queue event source): a connection string in the env
variable named by ``source.connection_string_env``, ``source.account_url`` + the account key in
$AZURE_STORAGE_KEY, ``source.account_url`` + DefaultAzureCredential (managed identity, workload
identity, az login...). V7's storage_key is ``container/blob`` (v7-contract.md).

Checkpoint: a small JSON object with the service's continuation marker *and* the last key. The
marker resumes exactly where the next page starts (Azure has no "start after" for List Blobs);
the last key makes a checkpoint taken at the end of a shard (no marker left) resume exactly too:
the shard is listed again and everything up to that key dropped.

Reads return the stored bytes (``decompress=False``): the SDK otherwise inflates blobs uploaded
with ``Content-Encoding: gzip``, and ranges would not match the stored object.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from ingest.config import SourceConfig
from ingest.errors import (
    AccessDenied,
    BucketNotFound,
    ObjectNotFound,
    SourceError,
    SourceRetryable,
)
from ingest.model import ObjectInfo
from ingest.providers import Page, Shard, write_chunks
from ingest.providers.azure.auth import AccountAuth, connection_string_env
from ingest.providers.cap import RequestCap

CHUNK_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
_DENIED_CODES = {
    "AuthenticationFailed",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "AuthorizationResourceTypeMismatch",
    "InsufficientAccountPermissions",
    "AccountIsDisabled",
}


def _encode(last: str, marker: str) -> str:
    return json.dumps({"k": last, "m": marker}, ensure_ascii=False, separators=(",", ":"))


def _decode(checkpoint: str) -> tuple[str, str]:
    if not checkpoint:
        return "", ""
    try:
        d = json.loads(checkpoint)
        return str(d.get("k", "")), str(d.get("m", ""))
    except (ValueError, AttributeError):
        raise SourceError(f"not an Azure listing checkpoint: {checkpoint[:80]!r}") from None


class CappedTransport(AioHttpTransport):  # type: ignore[misc]  # (lazily exported: Any)
    """azure-core's aiohttp transport, waiting for the bucket's request cap before each send.
    The transport is the pipeline's last step, so azure-core's retries count too (the blob
    SDK builds its own policy list and takes no extra policies through a public argument)."""

    def __init__(self, cap: RequestCap, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cap = cap

    async def send(self, request: Any, **config: Any) -> Any:
        await self.cap.wait()
        return await super().send(request, **config)


class AzureSource:
    provider = "azure"

    def __init__(self, cfg: SourceConfig) -> None:
        self.bucket = cfg.bucket  # the container
        self.cfg = cfg
        self._service: BlobServiceClient | None = None
        self._container: ContainerClient | None = None
        self._auth = AccountAuth(cfg)
        self._lock = asyncio.Lock()
        self.cap = RequestCap(
            cfg.max_requests_per_s,
            ("azure", cfg.account_url or cfg.endpoint_url or cfg.connection_string_env, cfg.bucket),
        )

    @property
    def _where(self) -> str:
        return self._auth.where

    def storage_key(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    async def _cc(self) -> ContainerClient:
        async with self._lock:
            if self._container is None:
                self._service = self._open_service()
                self._container = self._service.get_container_client(self.bucket)
            return self._container

    def _open_service(self) -> BlobServiceClient:
        opts: dict[str, Any] = {
            "connection_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
        }
        if self.cap.active:
            opts["transport"] = CappedTransport(self.cap, **opts)
        return self._auth.open(
            url=self.cfg.account_url or self.cfg.endpoint_url,
            missing=(
                f"Azure source needs credentials: set ${connection_string_env(self.cfg)}"
                " or source.account_url (with $AZURE_STORAGE_KEY or an Azure identity)"
            ),
            from_connection_string=lambda conn: BlobServiceClient.from_connection_string(
                conn, **opts
            ),
            from_url=lambda url, credential: BlobServiceClient(url, credential=credential, **opts),
        )

    async def close(self) -> None:
        if self._service is not None:
            await self._service.close()
            self._service = self._container = None
        await self._auth.close()

    def _map(self, e: Exception, what: str, *, bucket_level: bool = False) -> SourceError:
        status = int(getattr(e, "status_code", 0) or 0)
        # The SDK's error_code is a StorageErrorCode enum: str() gives its qualified name, the
        # wire code ("ContainerNotFound") is its value.
        raw = getattr(e, "error_code", "") or ""
        code = str(getattr(raw, "value", raw))
        if isinstance(e, ResourceNotFoundError) or status == 404:
            if bucket_level or code == "ContainerNotFound":
                return BucketNotFound(
                    f"Azure container '{self.bucket}' does not exist{self._where}"
                )
            return ObjectNotFound(f"{what}: no such blob in Azure container '{self.bucket}'")
        denied = status in (401, 403) or code in _DENIED_CODES
        if isinstance(e, ClientAuthenticationError) or denied:
            return AccessDenied(
                f"access denied to Azure container '{self.bucket}'{self._where} "
                f"({code or status}): check the account key / connection string or the "
                "identity's role (Storage Blob Data Reader, or Contributor to upload)"
            )
        if isinstance(e, ServiceRequestError):
            return SourceRetryable(f"cannot reach Azure Blob Storage{self._where}")
        if isinstance(e, HttpResponseError):
            return SourceRetryable(f"{what}: Azure error {code or status}")
        return SourceRetryable(f"{what}: {type(e).__name__}")

    async def check_access(self) -> None:
        """Lists one blob: the data-plane right a run needs (properties need more than Reader)."""
        cc = await self._cc()
        try:
            pages = cc.list_blobs(name_starts_with=self.cfg.prefix or None, results_per_page=1)
            async for page in pages.by_page():
                async for _ in page:
                    break
                break
        except AzureError as e:
            raise self._map(e, "check access", bucket_level=True) from None

    def checkpoint_key(self, checkpoint: str) -> str:
        return _decode(checkpoint)[0]

    async def list_pages(self, shard: Shard, checkpoint: str = "") -> AsyncIterator[Page]:
        cc = await self._cc()
        after, marker = _decode(checkpoint)
        prefix = shard.prefix or None
        n = self.cfg.page_size
        if shard.recursive:
            paged: Any = cc.list_blobs(name_starts_with=prefix, results_per_page=n)
        else:
            paged = cc.walk_blobs(name_starts_with=prefix, delimiter="/", results_per_page=n)
        pages = paged.by_page(continuation_token=marker or None)
        last = after
        try:
            async for page in pages:
                objects: list[ObjectInfo] = []
                prefixes: list[str] = []
                async for item in page:
                    if not hasattr(item, "size"):  # BlobPrefix: a sub-folder
                        prefixes.append(str(item.name))
                        continue
                    if after and item.name <= after:
                        continue
                    objects.append(
                        ObjectInfo(
                            key=item.name,
                            size=int(item.size or 0),
                            etag=str(item.etag or "").strip('"'),
                            last_modified=item.last_modified.isoformat()
                            if item.last_modified
                            else "",
                        )
                    )
                if objects:
                    last = objects[-1].key
                yield Page(objects, prefixes, _encode(last, pages.continuation_token or ""))
        except AzureError as e:
            raise self._map(e, f"list '{shard.prefix}'", bucket_level=True) from None

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        cc = await self._cc()
        try:
            stream = await cc.download_blob(key, offset=start, length=end - start, decompress=False)
            return bytes(await stream.readall())
        except AzureError as e:
            raise self._map(e, f"read '{key}'") from None

    async def download(self, key: str, dest: Path) -> None:
        cc = await self._cc()
        try:
            stream = await cc.download_blob(key, decompress=False)
            await write_chunks(stream.chunks(), dest)
        except AzureError as e:
            raise self._map(e, f"download '{key}'") from None

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None:
        cc = await self._cc()
        settings = ContentSettings(content_type=content_type, content_encoding=content_encoding)
        try:
            if isinstance(data, bytes):
                await cc.upload_blob(key, data, overwrite=True, content_settings=settings)
                return
            size = (await asyncio.to_thread(data.stat)).st_size
            await cc.upload_blob(
                key,
                _read_chunks(data),
                length=size,
                overwrite=True,
                content_settings=settings,
            )
        except AzureError as e:
            raise self._map(e, f"upload '{key}'") from None


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    """The file in chunks, read off the event loop (the SDK would read a file object inline)."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
            yield chunk
    finally:
        await asyncio.to_thread(f.close)
