"""Open the configured source adapter. Imports are lazy: a run only loads its own provider's SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ingest.config import Config, SourceConfig
from ingest.errors import ConfigError
from ingest.providers import Source


@asynccontextmanager
async def open_source(cfg: Config) -> AsyncIterator[Source]:
    async with open_bucket(cfg.source) as source:
        yield source


@asynccontextmanager
async def open_bucket(sc: SourceConfig) -> AsyncIterator[Source]:
    """An adapter for any bucket config ([source], or [upload] for a local source)."""
    provider = sc.provider
    source: Source
    if provider == "aws":
        from ingest.providers.aws.s3 import S3Source

        source = S3Source(sc)
    elif provider == "gcp":
        from ingest.providers.gcp.gcs import GCSSource

        source = GCSSource(sc)
    elif provider == "azure":
        from ingest.providers.azure.blob import AzureSource

        source = AzureSource(sc)
    elif provider == "local":
        from ingest.providers.local import LocalSource

        source = LocalSource(sc)
    else:
        raise ConfigError(f"config: source.provider = {provider!r} is not supported yet")
    try:
        yield source
    finally:
        await source.close()
