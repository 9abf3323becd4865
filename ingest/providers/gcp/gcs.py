"""Google Cloud Storage through gcloud-aio-storage (aiohttp).

Credentials: ``source.credentials_file``, else GOOGLE_APPLICATION_CREDENTIALS, else the metadata
server (GKE workload identity / GCE), all through gcloud-aio's ``Token``. With an emulator
(``source.endpoint_url`` or STORAGE_EMULATOR_HOST) no credentials are sent at all.

Checkpoint: the last object key of the page. A resume lists with ``startOffset`` = that key
(inclusive, so the key itself is dropped): exact, and valid for as long as the bucket exists,
unlike a page token.

Reads ask for the *stored* bytes (``Accept-Encoding: gzip``): without it GCS transcodes objects
uploaded with ``Content-Encoding: gzip`` and range offsets would not match the stored object.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from gcloud.aio.storage import Storage

from ingest.config import SourceConfig
from ingest.errors import AccessDenied, BucketNotFound, ObjectNotFound, SourceError, SourceRetryable
from ingest.log import without_userinfo
from ingest.model import ObjectInfo
from ingest.providers import Page, Shard, read_chunks, write_chunks
from ingest.providers.cap import RequestCap
from ingest.providers.transient import retry_transient

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# Above this a file goes up as one resumable upload streamed from disk; below, in one request.
STREAM_UPLOAD_BYTES = 5 * 1024 * 1024
REQUEST_TIMEOUT_S = 60
# Seconds added per MiB to an upload's timeout (gcloud-aio's is for the whole request).
UPLOAD_S_PER_MIB = 1
_RAW = {"Accept-Encoding": "gzip"}
# Partial response: a listing page shrinks to the fields an ObjectInfo needs.
_FIELDS = "nextPageToken,prefixes,items(name,size,etag,md5Hash,updated)"


CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
METADATA_HOST_ENV = ("GCE_METADATA_HOST", "GCE_METADATA_ROOT")  # gcloud-aio-auth's names
METADATA_PROBE_TIMEOUT_S = 3.0
# In a Kubernetes pod (GKE workload identity) the metadata server is often not ready in the
# pod's first seconds: probes go on for this long there (a GCE VM's answers at once).
KUBERNETES_ENV = "KUBERNETES_SERVICE_HOST"
METADATA_READY_S = 10.0
METADATA_RETRY_WAIT_S = 0.5
CREDENTIALS_FIX = (
    f"set source.credentials_file or {CREDENTIALS_ENV} to a service-account key file, run "
    "`gcloud auth application-default login`, or run on GKE with workload identity (or on a "
    "GCE VM with a service account)"
)


def adc_file() -> Path:
    """gcloud's application-default credentials file (``gcloud auth application-default
    login``), where gcloud-aio-auth looks after the explicit file and before the metadata
    server."""
    root = os.environ.get("CLOUDSDK_CONFIG") or str(Path.home() / ".config" / "gcloud")
    return Path(root) / "application_default_credentials.json"


def _key_file_problem(path: str, where: str) -> str | None:
    """Why the credentials file named by ``where`` cannot be used, or None. The value itself
    is never shown: people put the key's JSON itself in GOOGLE_APPLICATION_CREDENTIALS."""
    if path.lstrip().startswith("{"):
        return (
            f"{where} holds JSON, not a path: save the key to a file and set {where} to the "
            "file's path"
        )
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{where}: the file it names does not exist"
    except (OSError, UnicodeDecodeError) as e:
        return f"{where}: the file cannot be read ({getattr(e, 'strerror', None) or e})"
    except ValueError:
        return f"{where}: the file is not a JSON key file"
    if not isinstance(doc, dict) or "type" not in doc:
        return f'{where}: the file is not a Google credentials file (no "type")'
    return None


def _transient(e: BaseException) -> bool:
    """Worth another try: throttled (429), a timeout (408) or server error, a dropped
    connection or a body cut short. Not: 401/403/404 and other answers that will not change."""
    if isinstance(e, aiohttp.ClientResponseError):
        return e.status in (408, 429) or e.status >= 500
    if isinstance(e, aiohttp.ClientSSLError):  # certificate errors too: they do not go away
        return False
    return isinstance(e, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError)


def _transient_unanswered(e: BaseException) -> bool:
    """A resumable upload's PUT was retried by gcloud-aio on every error answer already: only
    a dropped connection or a timeout is worth one more try of the whole upload."""
    return not isinstance(e, aiohttp.ClientResponseError) and _transient(e)


RESUMABLE_TRIES = 2  # the whole resumable upload, on top of gcloud-aio's 5 tries of its PUT


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # aiohttp discourages subclasses

    class CappedSession(aiohttp.ClientSession):
        """Waits for the cap *before* aiohttp's request starts: a wait inside the request (a
        trace hook) would eat its total timeout, and one longer than that timeout left the
        request with no time limit at all (aiohttp 3.14)."""

        def __init__(self, cap: RequestCap, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._cap = cap

        async def _request(self, *args: Any, **kwargs: Any) -> aiohttp.ClientResponse:
            await self._cap.wait()
            return await super()._request(*args, **kwargs)


class GCSSource:
    provider = "gcp"

    def __init__(self, cfg: SourceConfig) -> None:
        self.bucket = cfg.bucket
        self.cfg = cfg
        self._root = cfg.endpoint_url or os.environ.get(EMULATOR_ENV, "")
        self._storage: Storage | None = None
        self._session: aiohttp.ClientSession | None = None  # ours, only under a cap
        self._lock = asyncio.Lock()
        self.cap = RequestCap(cfg.max_requests_per_s, ("gcp", self._root, cfg.bucket))

    def storage_key(self, key: str) -> str:
        return key

    async def _gcs(self) -> Storage:
        async with self._lock:
            if self._storage is None:
                session: Any = self._capped_session()  # gcloud-aio types it by its build
                if self._root:
                    root = self._root if "://" in self._root else f"http://{self._root}"
                    self._storage = Storage(
                        api_root=root.rstrip("/"), api_is_dev=True, session=session
                    )
                else:
                    self._storage = Storage(
                        service_file=self.cfg.credentials_file or None, session=session
                    )
            return self._storage

    def _capped_session(self) -> aiohttp.ClientSession | None:
        """Under ``source.max_requests_per_s``: a session whose every request (token fetches
        included) first waits for the cap; else None (gcloud-aio's own session)."""
        if not self.cap.active:
            return None
        # gcloud-aio verifies certificates except against an emulator (api_is_dev): the same.
        connector = aiohttp.TCPConnector(ssl=not self._root)
        self._session = CappedSession(self.cap, connector=connector)
        return self._session

    async def close(self) -> None:
        if self._storage is not None:
            await self._storage.close()
            self._storage = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _where(self) -> str:
        return f" at {without_userinfo(self._root)}" if self._root else ""

    def _map(self, e: Exception, what: str, *, bucket_level: bool = False) -> SourceError:
        if isinstance(e, aiohttp.ClientResponseError):
            if e.status == 404:
                if bucket_level:
                    return BucketNotFound(
                        f"GCS bucket '{self.bucket}' does not exist{self._where()}"
                    )
                return ObjectNotFound(f"{what}: no such object in GCS bucket '{self.bucket}'")
            if e.status in (401, 403):
                return AccessDenied(
                    f"access denied to GCS bucket '{self.bucket}'{self._where()} ({e.status}): "
                    "check GOOGLE_APPLICATION_CREDENTIALS / workload identity and the bucket's "
                    "IAM (storage.objects.list and storage.objects.get)"
                )
            return SourceRetryable(f"{what}: GCS error {e.status}")
        if isinstance(e, aiohttp.ClientConnectionError):
            return SourceRetryable(f"cannot reach GCS{self._where()}")
        if isinstance(e, TimeoutError):
            return SourceRetryable(f"{what}: GCS request timed out")
        return SourceRetryable(f"{what}: {type(e).__name__}")

    async def check_credentials(self) -> None:
        """Fail fast, naming the fix, when no credential source can work: gcloud-aio would
        otherwise retry the metadata server for ~12 s and then say only "cannot reach GCS".
        Same order as gcloud-aio-auth: the explicit file, gcloud's ADC file, the metadata
        server (workload identity, GCE)."""
        if self._root:
            return  # an emulator takes no credentials
        explicit = [
            (self.cfg.credentials_file, "source.credentials_file"),
            (os.environ.get(CREDENTIALS_ENV, ""), CREDENTIALS_ENV),
        ]
        for path, where in explicit:
            if path:
                problem = await asyncio.to_thread(_key_file_problem, path, where)
                if problem:
                    raise AccessDenied(f"GCS bucket '{self.bucket}': {problem}")
                return
        adc = adc_file()
        if await asyncio.to_thread(adc.is_file):
            where = f"gcloud's application-default credentials {adc}"
            problem = await asyncio.to_thread(_key_file_problem, str(adc), where)
            if problem:
                raise AccessDenied(
                    f"GCS bucket '{self.bucket}': {problem} (run `gcloud auth "
                    "application-default login` again)"
                )
            return
        host = next((os.environ[k] for k in METADATA_HOST_ENV if os.environ.get(k)), "")
        host = host or "metadata.google.internal"
        budget_s = METADATA_READY_S if os.environ.get(KUBERNETES_ENV) else 0.0
        if not await _metadata_server_answers(host, budget_s):
            raise AccessDenied(
                f"no Google Cloud credentials for GCS bucket '{self.bucket}' (no key file, no "
                f"gcloud application-default login, and the metadata server {host} did not "
                f"answer): {CREDENTIALS_FIX}"
            )

    async def check_access(self) -> None:
        """Lists one key: objectViewer-style roles may list and read but not get the bucket."""
        await self.check_credentials()
        gcs = await self._gcs()
        try:
            await gcs.list_objects(
                self.bucket,
                params={"maxResults": "1", "prefix": self.cfg.prefix},
                timeout=REQUEST_TIMEOUT_S,
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._map(e, "check access", bucket_level=True) from None

    def checkpoint_key(self, checkpoint: str) -> str:
        return checkpoint  # the last key listed

    async def list_pages(self, shard: Shard, checkpoint: str = "") -> AsyncIterator[Page]:
        gcs = await self._gcs()
        params: dict[str, str] = {"maxResults": str(self.cfg.page_size), "fields": _FIELDS}
        if shard.prefix:
            params["prefix"] = shard.prefix
        if not shard.recursive:
            params["delimiter"] = "/"
        if checkpoint:
            params["startOffset"] = checkpoint
        last = checkpoint
        # fake-gcs-server repeats a sub-prefix on several pages (it pages by objects only):
        # duplicates would become duplicate shards, so each prefix is reported once.
        seen: set[str] = set()
        while True:
            try:
                resp = await self._list_page(gcs, params)
            except (aiohttp.ClientError, TimeoutError) as e:
                raise self._map(e, f"list '{shard.prefix}'", bucket_level=True) from None
            objects = [
                ObjectInfo(
                    key=o["name"],
                    size=int(o.get("size", 0)),
                    etag=str(o.get("etag") or o.get("md5Hash") or ""),
                    last_modified=str(o.get("updated", "")),
                )
                for o in resp.get("items", [])
                # startOffset is inclusive: the checkpoint key itself was already yielded.
                if not (checkpoint and o["name"] == checkpoint)
            ]
            if objects:
                last = objects[-1].key
            token = resp.get("nextPageToken")
            prefixes = [p for p in resp.get("prefixes", []) if p not in seen]
            seen.update(prefixes)
            yield Page(objects, prefixes, last)
            if not token:
                return
            params["pageToken"] = str(token)

    @retry_transient(_transient)
    async def _list_page(self, gcs: Storage, params: dict[str, str]) -> dict[str, Any]:
        resp: dict[str, Any] = await gcs.list_objects(
            self.bucket, params=dict(params), timeout=REQUEST_TIMEOUT_S
        )
        return resp

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        gcs = await self._gcs()
        try:
            return await self._read_range(gcs, key, start, end)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._map(e, f"read '{key}'") from None

    @retry_transient(_transient)
    async def _read_range(self, gcs: Storage, key: str, start: int, end: int) -> bytes:
        data: bytes = await gcs.download(
            self.bucket,
            key,
            headers={**_RAW, "Range": f"bytes={start}-{end - 1}"},
            timeout=REQUEST_TIMEOUT_S,
        )
        return data

    async def download(self, key: str, dest: Path) -> None:
        gcs = await self._gcs()
        try:
            await self._download(gcs, key, dest)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._map(e, f"download '{key}'") from None

    @retry_transient(_transient)
    async def _download(self, gcs: Storage, key: str, dest: Path) -> None:
        """The whole object again on a retry: ``dest`` is rewritten from the start."""
        stream = await gcs.download_stream(
            self.bucket, key, headers=dict(_RAW), timeout=REQUEST_TIMEOUT_S
        )
        async with stream:
            await write_chunks(read_chunks(stream.read), dest)

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None:
        gcs = await self._gcs()
        try:
            await self._upload(gcs, key, data, content_type, content_encoding)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._map(e, f"upload '{key}'") from None

    async def _upload(
        self,
        gcs: Storage,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None,
    ) -> None:
        """Idempotent (same key, same bytes), so a retry is safe; a file is reopened."""
        metadata: dict[str, Any] | None = (
            {"contentEncoding": content_encoding} if content_encoding else None
        )
        if isinstance(data, bytes):
            await self._upload_one(gcs, key, data, content_type, metadata)
            return
        size = (await asyncio.to_thread(data.stat)).st_size
        if size <= STREAM_UPLOAD_BYTES:
            body = await asyncio.to_thread(data.read_bytes)
            await self._upload_one(gcs, key, body, content_type, metadata)
            return
        await self._upload_resumable(gcs, key, data, size, content_type, metadata)

    @retry_transient(_transient)
    async def _upload_one(
        self,
        gcs: Storage,
        key: str,
        body: bytes,
        content_type: str,
        metadata: dict[str, Any] | None,
    ) -> None:
        """One request (gcloud-aio retries none of it)."""
        await gcs.upload(
            self.bucket,
            key,
            body,
            content_type=content_type,
            metadata=metadata,
            timeout=self._upload_timeout(len(body)),
        )

    @retry_transient(_transient_unanswered, max_tries=RESUMABLE_TRIES)
    async def _upload_resumable(
        self,
        gcs: Storage,
        key: str,
        path: Path,
        size: int,
        content_type: str,
        metadata: dict[str, Any] | None,
    ) -> None:
        """The open file streamed (aiohttp reads it in its executor, in chunks)."""
        f = await asyncio.to_thread(path.open, "rb")
        try:
            await gcs.upload(
                self.bucket,
                key,
                f,
                content_type=content_type,
                metadata=metadata,
                force_resumable_upload=True,
                timeout=self._upload_timeout(size),
            )
        finally:
            await asyncio.to_thread(f.close)

    @staticmethod
    def _upload_timeout(size: int) -> int:
        return REQUEST_TIMEOUT_S + UPLOAD_S_PER_MIB * (size // (1024 * 1024))


async def _metadata_server_answers(host: str, budget_s: float = 0.0) -> bool:
    """Whether the GCE / GKE metadata server answers a service-account query. One try of
    METADATA_PROBE_TIMEOUT_S, and more for ``budget_s`` while it is not ready yet (no answer,
    a refused connection, a 5xx); a 4xx is final (no service account). gcloud-aio itself
    would retry it for much longer and then say only "cannot reach GCS"."""
    url = f"http://{host}/computeMetadata/v1/instance/service-accounts/default/email"
    timeout = aiohttp.ClientTimeout(total=METADATA_PROBE_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(url, headers={"Metadata-Flavor": "Google"}) as resp:
                    if resp.status == 200:
                        return True
                    if resp.status < 500:
                        return False
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            if loop.time() + METADATA_RETRY_WAIT_S >= deadline:
                return False
            await asyncio.sleep(METADATA_RETRY_WAIT_S)
