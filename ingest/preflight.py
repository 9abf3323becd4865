"""Checks before any listing: the key, the dataset, the storage configuration, the bucket.

Each failure is a PreflightError with one line that names the fix. Nothing here writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ingest.config import API_KEY_ENV, Config
from ingest.errors import (
    AccessDenied,
    AuthError,
    BucketNotFound,
    NotFoundError,
    PreflightError,
    Retry,
    SourceRetryable,
    Unreachable,
    V7Error,
)
from ingest.providers import Source


class V7Api(Protocol):
    async def token_info(self) -> dict[str, Any]: ...
    async def datasets(self) -> list[dict[str, Any]]: ...
    async def storage_configs(self, team: str) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Target:
    """What preflight learned: where and how to register."""

    team: str
    dataset_id: int
    dataset_slug: str
    storage_name: str
    readonly: bool
    storage: dict[str, Any]


def _names(rows: list[dict[str, Any]], field: str) -> str:
    names = sorted(str(r.get(field, "")) for r in rows)
    shown = ", ".join(names[:10]) + (" …" if len(names) > 10 else "")
    return shown or "none"


async def check_v7(cfg: Config, api: V7Api) -> Target:
    base = cfg.base_url
    try:
        info = await api.token_info()
    except AuthError:
        raise PreflightError(
            f"V7 refused the API key (401) at {base}: check {API_KEY_ENV}"
        ) from None
    except Retry as e:
        raise Unreachable(f"V7 at {base} is not reachable: {e}") from None
    except V7Error as e:
        raise PreflightError(f"V7 token check failed at {base}: {e}") from None
    team = cfg.v7.team or str((info.get("selected_team") or {}).get("slug", ""))
    if not team:
        raise PreflightError("the API key has no selected team: set v7.team in the config")

    try:
        datasets = await api.datasets()
        configs = await api.storage_configs(team)
    except NotFoundError:
        raise PreflightError(f"team '{team}' not found or not accessible with this key") from None
    except V7Error as e:
        raise PreflightError(f"V7 request failed during preflight: {e}") from None

    ds = next((d for d in datasets if d.get("slug") == cfg.v7.dataset), None)
    if ds is None:
        raise PreflightError(
            f"dataset '{cfg.v7.dataset}' not found in team '{team}' "
            f"(available: {_names(datasets, 'slug')}): fix v7.dataset"
        )
    sc = next((c for c in configs if c.get("name") == cfg.v7.storage), None)
    if sc is None:
        raise PreflightError(
            f"storage configuration '{cfg.v7.storage}' not found in team '{team}' "
            f"(available: {_names(configs, 'name')}): fix v7.storage"
        )
    readonly = bool(sc.get("readonly", False))
    if cfg.v7.mode == "readwrite" and readonly:
        raise PreflightError(
            f"storage configuration '{cfg.v7.storage}' is read-only in V7 but v7.mode = "
            '"readwrite": use mode "readonly" (or "auto")'
        )
    if cfg.v7.mode == "readonly" and not readonly:
        raise PreflightError(
            f"storage configuration '{cfg.v7.storage}' is read-write in V7 but v7.mode = "
            '"readonly": use mode "readwrite" (or "auto")'
        )
    provider = str(sc.get("provider", ""))
    # The bucket V7 reads: the source's, or for a local directory the upload destination's.
    where = "upload" if cfg.source.provider == "local" else "source"
    bucket_cfg = cfg.bucket_source
    if provider and provider != bucket_cfg.provider:
        raise PreflightError(
            f"storage configuration '{cfg.v7.storage}' is for provider '{provider}' but "
            f"{where}.provider = '{bucket_cfg.provider}': set {where}.provider = '{provider}' "
            "or pick another v7.storage"
        )
    v7_bucket = str(sc.get("bucket", ""))
    # For Azure, V7's `bucket` is the storage account, not the container: compared below.
    if v7_bucket and bucket_cfg.provider in ("aws", "gcp") and v7_bucket != bucket_cfg.bucket:
        raise PreflightError(
            f"storage configuration '{cfg.v7.storage}' points at bucket '{v7_bucket}' but "
            f"{where}.bucket = '{bucket_cfg.bucket}': V7 could not read these objects (fix "
            f"{where}.bucket or v7.storage)"
        )
    if v7_bucket and bucket_cfg.provider == "azure":
        # V7's `bucket` is the storage account; ours comes from the credentials (names only).
        from ingest.providers.azure.auth import account_name

        account = account_name(bucket_cfg)
        if account and account != v7_bucket:
            raise PreflightError(
                f"storage configuration '{cfg.v7.storage}' is for Azure storage account "
                f"'{v7_bucket}' but the source credentials point at account '{account}': fix "
                "source.account_url / the connection string, or v7.storage"
            )
    return Target(
        team=team,
        dataset_id=int(ds.get("id", 0)),
        dataset_slug=cfg.v7.dataset,
        storage_name=cfg.v7.storage,
        readonly=readonly,
        storage=sc,
    )


async def check_source(source: Source) -> None:
    try:
        await source.check_access()
    except (BucketNotFound, AccessDenied) as e:
        raise PreflightError(str(e)) from None
    except SourceRetryable as e:
        raise Unreachable(f"bucket {source.bucket!r} is not reachable: {e}") from None
