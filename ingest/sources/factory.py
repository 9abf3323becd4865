"""Open the configured source adapter. Imports are lazy: a run only loads its own provider's SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ingest.config import Config
from ingest.errors import ConfigError
from ingest.sources import Source


@asynccontextmanager
async def open_source(cfg: Config) -> AsyncIterator[Source]:
    provider = cfg.source.provider
    source: Source
    if provider == "aws":
        from ingest.sources.s3 import S3Source

        source = S3Source(cfg.source)
    elif provider == "gcp":
        from ingest.sources.gcs import GCSSource

        source = GCSSource(cfg.source)
    elif provider == "azure":
        from ingest.sources.azure import AzureSource

        source = AzureSource(cfg.source)
    elif provider == "local":
        from ingest.sources.local import LocalSource

        source = LocalSource(cfg.source)
    else:
        raise ConfigError(f"config: source.provider = {provider!r} is not supported yet")
    try:
        yield source
    finally:
        await source.close()
