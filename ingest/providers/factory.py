"""Open the configured adapters: the bucket (``open_source``, ``open_bucket``) and the worker's
object-event queue (``open_events``). Imports are lazy: a run only loads its own provider's SDK,
and a worker without events loads no queue SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ingest.config import Config, SourceConfig
from ingest.errors import ConfigError
from ingest.providers import EventSource, Source


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


@asynccontextmanager
async def open_events(cfg: Config) -> AsyncIterator[EventSource | None]:
    """The configured event source, or None when ``worker.events = "none"``. Nothing is opened
    on the network until the first ``receive``."""
    kind = cfg.worker.events
    if kind == "none":
        yield None
        return
    source: EventSource
    # Validated in ingest.config (provider pairing, queue URL / name).
    if kind == "sqs":
        from ingest.providers.aws.sqs import SqsEventSource

        source = SqsEventSource(cfg)
    elif kind == "azure_queue":
        from ingest.providers.azure.queue import AzureQueueEventSource

        source = AzureQueueEventSource(cfg)
    else:
        raise ConfigError(f"config: worker.events = {kind!r} is not supported")
    try:
        yield source
    finally:
        await source.close()
