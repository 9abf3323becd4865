"""One contract for every Source adapter, run against real emulators: moto (S3),
fake-gcs-server (GCS), Azurite (Azure Blob) and a temporary directory (local).

Each backend seeds its store through its own plain client, never through the adapter under
test, and reads metadata back the same way.
"""

from __future__ import annotations

import gzip
import os
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ingest.config import Config, SourceConfig, load
from ingest.errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    ObjectNotFound,
    PreflightError,
)
from ingest.preflight import check_v7
from ingest.providers import Page, Shard, Source
from ingest.providers.aws.s3 import S3Source
from ingest.providers.azure.auth import account_name
from ingest.providers.azure.blob import AzureSource
from ingest.providers.fanout import discover_shards, iter_shard_pages
from ingest.providers.gcp.gcs import GCSSource
from ingest.providers.local import LocalSource
from tests.conftest import s3_client
from tests.support.e2e import free_port
from tests.support.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    AzuriteServer,
    azure_create_container,
    azure_seed,
    gcs_create_bucket,
    gcs_seed,
)

# A 1000-character key in 200-character segments (a local file name may not exceed 255 bytes).
LONG_KEY = "long/" + "/".join(["s" * 199] * 4) + "/" + "e" * 195
assert len(LONG_KEY) == 1000

KEYS = [
    "a!.txt",  # '!' sorts before '/': must come before everything under a/
    "a.txt",
    "a/1.jpg",
    "a/2.jpg",
    "a/b/3.jpg",
    "a/b/c/4.jpg",
    "a0.txt",
    "b/x y z.png",
    "b/ünïcödé/ñ.png",
    "b/ünïcödé/日本語.jpg",
    "c/d/e/f/g.txt",
    "folder with spaces/file with spaces.jpg",
    "top.png",
    "z/1",
    "z/10",
    "z/2",
    "z/3",
    "z/4",
    "z/5",
    "zz",
    LONG_KEY,
]
PAGE = 3


def body(key: str) -> bytes:
    """Distinct content per key, so a read of the wrong object or range cannot pass."""
    return (key * 3).encode()[:40] + uuid.uuid5(uuid.NAMESPACE_URL, key).bytes


@dataclass
class Backend:
    name: str
    create: Callable[[str], None]  # create an empty bucket / container / directory
    seed: Callable[[str, dict[str, bytes]], None]
    make: Callable[[str, int], Source]
    # (content type, content encoding) as the store recorded them; None: not stored (local).
    meta: Callable[[str, str], tuple[str, str] | None]
    denied: Callable[[str], Source] | None = None
    notes: dict[str, str] = field(default_factory=dict)


# --- backends --------------------------------------------------------------------------------


def _s3_backend(url: str) -> Backend:
    def create(bucket: str) -> None:
        s3_client(url).create_bucket(Bucket=bucket)

    def seed(bucket: str, objects: dict[str, bytes]) -> None:
        s3 = s3_client(url)
        for k, v in objects.items():
            s3.put_object(Bucket=bucket, Key=k, Body=v)

    def make(bucket: str, page: int, key_id: str = "testing") -> Source:
        cfg = SourceConfig(provider="aws", bucket=bucket, endpoint_url=url, page_size=page)
        return S3Source(cfg, aws_access_key_id=key_id, aws_secret_access_key="testing")

    def meta(bucket: str, key: str) -> tuple[str, str]:
        h = s3_client(url).head_object(Bucket=bucket, Key=key)
        return str(h.get("ContentType", "")), str(h.get("ContentEncoding", ""))

    return Backend("s3", create, seed, make, meta, lambda b: make(b, PAGE, "AKIANOTAREALKEY0000"))


def _gcs_backend(url: str) -> Backend:
    def make(bucket: str, page: int) -> Source:
        return GCSSource(
            SourceConfig(provider="gcp", bucket=bucket, endpoint_url=url, page_size=page)
        )

    def meta(bucket: str, key: str) -> tuple[str, str]:
        import json
        import urllib.parse
        import urllib.request

        q = urllib.parse.quote(key, safe="")
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{q}", timeout=10) as r:
            m = json.loads(r.read())
        return str(m.get("contentType", "")), str(m.get("contentEncoding", ""))

    return Backend(
        "gcs",
        lambda b: gcs_create_bucket(url, b),
        lambda b, objs: gcs_seed(url, b, objs),
        make,
        meta,
    )


def _azure_backend(server: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> Backend:
    env = f"TEST_AZ_CONN_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(env, server.connection_string)
    bad_env = env + "_BAD"
    # Same account, wrong key: Azurite checks the SharedKey signature and answers 403.
    monkeypatch.setenv(
        bad_env,
        re.sub(r"AccountKey=[^;]+", "AccountKey=" + "A" * 86 + "==", server.connection_string),
    )

    def make(bucket: str, page: int, conn_env: str = env) -> Source:
        return AzureSource(
            SourceConfig(
                provider="azure", bucket=bucket, page_size=page, connection_string_env=conn_env
            )
        )

    def meta(container: str, key: str) -> tuple[str, str]:
        from azure.storage.blob import BlobServiceClient

        svc = BlobServiceClient.from_connection_string(server.connection_string)
        p = svc.get_blob_client(container, key).get_blob_properties()
        cs = p.content_settings
        return str(cs.content_type or ""), str(cs.content_encoding or "")

    return Backend(
        "azure",
        lambda c: azure_create_container(server, c),
        lambda c, objs: azure_seed(server, c, objs),
        make,
        meta,
        lambda c: make(c, PAGE, bad_env),
    )


def _local_backend(root: Path) -> Backend:
    def path(bucket: str) -> Path:
        return root / bucket

    def create(bucket: str) -> None:
        path(bucket).mkdir()

    def seed(bucket: str, objects: dict[str, bytes]) -> None:
        for k, v in objects.items():
            p = path(bucket).joinpath(*k.split("/"))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(v)

    def make(bucket: str, page: int) -> Source:
        return LocalSource(SourceConfig(provider="local", bucket=str(path(bucket)), page_size=page))

    def denied(bucket: str) -> Source:
        if os.geteuid() == 0:
            pytest.skip("running as root: file permissions cannot deny access")
        path(bucket).chmod(0)
        return make(bucket, PAGE)

    return Backend("local", create, seed, make, lambda b, k: None, denied)


@pytest.fixture(params=["s3", "gcs", "azure", "local"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    name = request.param
    if name == "s3":
        yield _s3_backend(request.getfixturevalue("moto_url"))
    elif name == "gcs":
        yield _gcs_backend(request.getfixturevalue("fake_gcs_url"))
    elif name == "azure":
        yield _azure_backend(request.getfixturevalue("azurite"), monkeypatch)
    else:
        yield _local_backend(tmp_path)
        for p in tmp_path.rglob("*"):  # undo a chmod 0 so tmp_path can be cleaned up
            if p.is_dir():
                p.chmod(0o755)


@pytest.fixture
def seeded(backend: Backend, bucket_name: str) -> str:
    backend.create(bucket_name)
    backend.seed(bucket_name, {k: body(k) for k in KEYS})
    return bucket_name


@asynccontextmanager
async def opened(source: Source) -> AsyncIterator[Source]:
    try:
        yield source
    finally:
        await source.close()


async def pages(source: Source, shard: Shard, checkpoint: str = "") -> list[Page]:
    return [p async for p in source.list_pages(shard, checkpoint)]


def keys_of(ps: list[Page]) -> list[str]:
    return [o.key for p in ps for o in p.objects]


# --- listing ---------------------------------------------------------------------------------


async def test_recursive_listing_pages_in_key_order(backend: Backend, seeded: str) -> None:
    async with opened(backend.make(seeded, PAGE)) as src:
        ps = await pages(src, Shard(""))
    assert keys_of(ps) == sorted(KEYS)
    assert all(len(p.objects) <= PAGE for p in ps)
    assert len([p for p in ps if p.objects]) >= len(KEYS) // PAGE
    objs = {o.key: o for p in ps for o in p.objects}
    assert all(objs[k].size == len(body(k)) for k in KEYS)
    assert all(o.etag and o.last_modified for o in objs.values())


async def test_one_level_listing_returns_sub_prefixes(backend: Backend, seeded: str) -> None:
    async with opened(backend.make(seeded, PAGE)) as src:
        top = await pages(src, Shard("", recursive=False))
        b = await pages(src, Shard("b/", recursive=False))
    assert keys_of(top) == sorted(k for k in KEYS if "/" not in k)
    prefixes = sorted({k.split("/")[0] + "/" for k in KEYS if "/" in k})
    assert sorted(p for page in top for p in page.prefixes) == prefixes
    assert keys_of(b) == ["b/x y z.png"]
    assert [p for page in b for p in page.prefixes] == ["b/ünïcödé/"]


async def test_prefix_listing(backend: Backend, seeded: str) -> None:
    async with opened(backend.make(seeded, PAGE)) as src:
        assert keys_of(await pages(src, Shard("a/"))) == sorted(
            k for k in KEYS if k.startswith("a/")
        )
        # A prefix that ends inside a name, as on S3: "z/1" matches z/1 and z/10.
        assert keys_of(await pages(src, Shard("z/1"))) == ["z/1", "z/10"]
        assert keys_of(await pages(src, Shard("b/ünïcödé/"))) == [
            "b/ünïcödé/ñ.png",
            "b/ünïcödé/日本語.jpg",
        ]
        assert keys_of(await pages(src, Shard("long/"))) == [LONG_KEY]
        assert keys_of(await pages(src, Shard("nothing-here/"))) == []


@pytest.mark.parametrize("prefix", ["", "a/"])
async def test_resume_from_every_checkpoint(backend: Backend, seeded: str, prefix: str) -> None:
    """A checkpoint from any page (the last one included) resumes with exactly the keys after
    that page: no duplicate, no gap."""
    expected = sorted(k for k in KEYS if k.startswith(prefix))
    async with opened(backend.make(seeded, PAGE)) as src:
        full = await pages(src, Shard(prefix))
        assert len(full) >= 2
        seen: list[str] = []
        for page in full:
            seen.extend(o.key for o in page.objects)
            assert page.checkpoint
            rest = keys_of(await pages(src, Shard(prefix), page.checkpoint))
            assert seen + rest == expected, f"resume after {seen[-1]!r}"
            # The sync merge resumes the ledger's side after the same key.
            assert src.checkpoint_key(page.checkpoint) == seen[-1]


async def test_resume_with_a_new_source_object(backend: Backend, seeded: str) -> None:
    """A checkpoint survives the process: a fresh adapter resumes from it."""
    async with opened(backend.make(seeded, PAGE)) as src:
        it = src.list_pages(Shard(""))
        first = [await anext(it), await anext(it)]
        await it.aclose()  # type: ignore[attr-defined]
    async with opened(backend.make(seeded, PAGE)) as src2:
        rest = keys_of(await pages(src2, Shard(""), first[-1].checkpoint))
    assert keys_of(first) + rest == sorted(KEYS)


# --- objects ---------------------------------------------------------------------------------


async def test_read_range(backend: Backend, seeded: str) -> None:
    k = "b/ünïcödé/日本語.jpg"
    data = body(k)
    async with opened(backend.make(seeded, PAGE)) as src:
        assert await src.read_range(k, 0, 5) == data[:5]
        assert await src.read_range(k, 3, 17) == data[3:17]
        assert await src.read_range(k, len(data) - 1, len(data)) == data[-1:]
        assert await src.read_range(LONG_KEY, 2, 9) == body(LONG_KEY)[2:9]
        with pytest.raises(ObjectNotFound):
            await src.read_range("a/missing.jpg", 0, 4)


async def test_download_to_file(backend: Backend, seeded: str, tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    async with opened(backend.make(seeded, PAGE)) as src:
        await src.download("folder with spaces/file with spaces.jpg", dest)
        assert dest.read_bytes() == body("folder with spaces/file with spaces.jpg")
        with pytest.raises(ObjectNotFound):
            await src.download("a/missing.jpg", tmp_path / "never.bin")


async def test_upload_bytes_and_files_with_content_type(
    backend: Backend, seeded: str, tmp_path: Path
) -> None:
    """Bytes, a gzip-encoded artifact and a multi-MiB file (GCS: resumable, streamed from disk;
    Azure: staged blocks) round-trip byte for byte with the content type and encoding set."""
    big = os.urandom(6 * 1024 * 1024 + 123)
    big_file = tmp_path / "big.bin"
    big_file.write_bytes(big)
    peaks = gzip.compress(b"\x80\x81\x7f" * 1000)
    async with opened(backend.make(seeded, PAGE)) as src:
        await src.upload("up/thumb é.jpg", b"\xff\xd8jpeg", "image/jpeg")
        await src.upload("up/audio_peaks.gz", peaks, "application/octet-stream", "gzip")
        await src.upload("up/segments/high/000000001.ts", big_file, "video/mp2t")
        await src.download("up/audio_peaks.gz", tmp_path / "peaks")
        await src.download("up/segments/high/000000001.ts", tmp_path / "big.out")
        assert await src.read_range("up/thumb é.jpg", 0, 6) == b"\xff\xd8jpeg"
        listed = keys_of(await pages(src, Shard("up/")))
    # The stored (still compressed) bytes come back: no transcoding on the way.
    assert (tmp_path / "peaks").read_bytes() == peaks
    assert (tmp_path / "big.out").read_bytes() == big
    assert listed == ["up/audio_peaks.gz", "up/segments/high/000000001.ts", "up/thumb é.jpg"]
    if backend.name == "local":
        assert backend.meta(seeded, "up/thumb é.jpg") is None  # a directory keeps no metadata
        return
    assert backend.meta(seeded, "up/thumb é.jpg") == ("image/jpeg", "")
    assert backend.meta(seeded, "up/audio_peaks.gz") == ("application/octet-stream", "gzip")
    assert backend.meta(seeded, "up/segments/high/000000001.ts") == ("video/mp2t", "")


@asynccontextmanager
async def _refusing_server() -> AsyncIterator[str]:
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        err = {"code": 403, "message": "caller does not have storage.objects.list access"}
        return web.json_response({"error": err}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- failures --------------------------------------------------------------------------------


async def test_missing_bucket(backend: Backend, bucket_name: str) -> None:
    async with opened(backend.make(bucket_name, PAGE)) as src:
        with pytest.raises(BucketNotFound, match=re.escape(bucket_name)):
            await src.check_access()
        with pytest.raises(BucketNotFound):
            await pages(src, Shard(""))


async def test_access_denied(backend: Backend, seeded: str) -> None:
    """S3: moto with IAM authentication on and an unknown access key (InvalidAccessKeyId).
    Azure: Azurite with a wrong account key (SharedKey signature refused, 403).
    GCS: fake-gcs-server never checks credentials, so a one-route aiohttp server answers every
    request with GCS's 403 body (aioresponses does not work with the installed aiohttp 3.13:
    ClientResponse gained a required ``stream_writer`` argument).
    Local: a directory with mode 000 (skipped as root, who ignores permissions)."""
    if backend.name == "gcs":
        async with _refusing_server() as url:
            cfg = SourceConfig(provider="gcp", bucket=seeded, endpoint_url=url, page_size=PAGE)
            async with opened(GCSSource(cfg)) as src:
                with pytest.raises(AccessDenied, match=re.escape(seeded)):
                    await src.check_access()
                with pytest.raises(AccessDenied):
                    await src.read_range("a.txt", 0, 1)
        return
    assert backend.denied is not None
    if backend.name == "s3":
        from moto.core.authorization import enable_iam_authentication

        with enable_iam_authentication():
            async with opened(backend.denied(seeded)) as src:
                with pytest.raises(AccessDenied, match=re.escape(seeded)):
                    await src.check_access()
        return
    async with opened(backend.denied(seeded)) as src:
        with pytest.raises(AccessDenied, match=re.escape(seeded)) as e:
            await src.check_access()
        with pytest.raises(AccessDenied):
            await pages(src, Shard(""))
    assert "AccountKey" not in str(e.value) and "A" * 20 not in str(e.value)


async def test_storage_key(backend: Backend, bucket_name: str) -> None:
    src = backend.make(bucket_name, PAGE)
    expected = f"{bucket_name}/a/b.jpg" if backend.name == "azure" else "a/b.jpg"
    assert src.storage_key("a/b.jpg") == expected
    assert (
        src.provider
        == {"s3": "aws", "gcs": "gcp", "azure": "azure", "local": "local"}[backend.name]
    )
    await src.close()


# --- fan-out ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "depth"), [("", 1), ("", 2), ("", 0), ("b/", 1)])
async def test_fanout_lists_every_key_once(
    backend: Backend, seeded: str, prefix: str, depth: int
) -> None:
    async with opened(backend.make(seeded, PAGE)) as src:
        shards = await discover_shards(src, prefix, depth)
        got: Counter[str] = Counter()
        lasts = 0
        async for sp in iter_shard_pages(src, shards, {}, set(), concurrency=4):
            got.update(o.key for o in sp.page.objects)
            lasts += sp.last
    assert got == Counter(k for k in KEYS if k.startswith(prefix))
    assert lasts == len(shards)
    assert len({s.id for s in shards}) == len(shards)
    if depth >= 1 and prefix == "":
        assert Shard("a/", recursive=False) in shards or Shard("a/") in shards


# --- Azure account / preflight -----------------------------------------------------------------


def test_azure_account_name_from_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_CONN", "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=k==")
    assert account_name(SourceConfig(provider="azure", connection_string_env="X_CONN")) == "acme"
    monkeypatch.setenv("X_CONN", "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;")
    assert account_name(SourceConfig(connection_string_env="X_CONN")) == AZURITE_ACCOUNT
    cfg = SourceConfig(
        connection_string_env="UNSET_VAR_X", account_url="https://acme2.blob.core.windows.net/"
    )
    assert account_name(cfg) == "acme2"
    assert account_name(SourceConfig(connection_string_env="UNSET_VAR_X")) == ""


class _V7:
    """The three read-only V7 calls preflight makes, answering with one storage config."""

    def __init__(self, storage: dict[str, Any]) -> None:
        self.storage = storage

    async def token_info(self) -> dict[str, Any]:
        return {"selected_team": {"slug": "team"}}

    async def datasets(self) -> list[dict[str, Any]]:
        return [{"id": 1, "slug": "ds", "name": "ds"}]

    async def storage_configs(self, team: str) -> list[dict[str, Any]]:
        return [{"name": "st", "readonly": False, **self.storage}]


def _cfg(**source: Any) -> Config:
    cfg = Config()
    cfg.v7.dataset, cfg.v7.storage = "ds", "st"
    for k, v in source.items():
        setattr(cfg.source, k, v)
    return cfg


async def test_preflight_checks_provider_bucket_and_azure_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "c2VjcmV0LWtleS1kby1ub3QtbGVhaw=="
    monkeypatch.setenv("X_CONN", f"AccountName=other;AccountKey={secret};")
    with pytest.raises(PreflightError, match=r"provider 'gcp'.*source.provider = 'aws'"):
        await check_v7(_cfg(bucket="b"), _V7({"provider": "gcp", "bucket": "b"}))
    with pytest.raises(PreflightError, match=r"bucket 'b1'.*source.bucket = 'b2'"):
        await check_v7(_cfg(provider="gcp", bucket="b2"), _V7({"provider": "gcp", "bucket": "b1"}))
    az = _cfg(provider="azure", bucket="container", connection_string_env="X_CONN")
    with pytest.raises(PreflightError, match=r"account 'acct'.*account 'other'") as e:
        await check_v7(az, _V7({"provider": "azure", "bucket": "acct"}))
    assert secret not in str(e.value) and "\n" not in str(e.value)
    # Matching account: the container name is not compared with V7's bucket (the account).
    monkeypatch.setenv("X_CONN", f"AccountName=acct;AccountKey={secret};")
    target = await check_v7(az, _V7({"provider": "azure", "bucket": "acct"}))
    assert target.storage_name == "st"


# --- credentials and configuration ---------------------------------------------------------------


async def test_gcs_emulator_from_env(
    fake_gcs_url: str, bucket_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE_EMULATOR_HOST alone (no endpoint_url) points the adapter at the emulator."""
    gcs_create_bucket(fake_gcs_url, bucket_name)
    gcs_seed(fake_gcs_url, bucket_name, {"k/1": b"1"})
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs_url)
    async with opened(GCSSource(SourceConfig(provider="gcp", bucket=bucket_name))) as src:
        await src.check_access()
        assert keys_of(await pages(src, Shard(""))) == ["k/1"]


async def test_azure_account_url_and_key(
    azurite: AzuriteServer, bucket_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """account_url + $AZURE_STORAGE_KEY, no connection string; a wrong key is AccessDenied."""
    azure_create_container(azurite, bucket_name)
    azure_seed(azurite, bucket_name, {"k/1": b"1"})
    monkeypatch.setenv("AZURE_STORAGE_KEY", AZURITE_KEY)
    cfg = SourceConfig(
        provider="azure",
        bucket=bucket_name,
        account_url=azurite.blob_url,
        connection_string_env="UNSET_VAR_X",
    )
    async with opened(AzureSource(cfg)) as src:
        await src.check_access()
        assert keys_of(await pages(src, Shard(""))) == ["k/1"]
    monkeypatch.setenv("AZURE_STORAGE_KEY", "B" * 86 + "==")
    async with opened(AzureSource(cfg)) as src:
        with pytest.raises(AccessDenied, match=AZURITE_ACCOUNT) as e:
            await src.check_access()
    assert "B" * 20 not in str(e.value)


async def test_azure_without_credentials_is_a_config_error() -> None:
    cfg = SourceConfig(provider="azure", bucket="c", connection_string_env="UNSET_VAR_X")
    with pytest.raises(ConfigError, match=r"source\.account_url"):
        await AzureSource(cfg).check_access()


@pytest.mark.parametrize("name", ["gcs-readwrite.toml", "azure-readonly.toml"])
def test_example_configs_load(name: str) -> None:
    cfg = load(Path(__file__).resolve().parents[1] / "config" / name)
    assert cfg.source.provider in ("gcp", "azure") and cfg.source.bucket
