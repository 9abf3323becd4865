"""Shared fixtures: one moto S3 server per test session (each test uses its own bucket) and a
V7 emulator process per test."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.e2e import Emulator, emulator_process, free_port
from tests.support.emulators import *  # noqa: F403
from tests.support.postgres import *  # noqa: F403

# moto's server logs every request through werkzeug: keep test output readable.
logging.getLogger("werkzeug").setLevel(logging.WARNING)

# Tests that start or talk to real servers or processes (storage emulators, the V7 emulator,
# ffmpeg, the CLI) are end to end; the rest are fast unit tests. `pytest -m "not e2e"` runs
# only the fast part (README, "Development").
E2E_FIXTURES = frozenset(
    {"moto_url", "emulator", "fake_gcs_url", "azurite", "azurite_queue", "postgres_url"}
)
E2E_MODULES = frozenset(
    {
        "test_cli_errors",
        "test_deploy",
        "test_e2e",
        "test_faults",
        "test_media_e2e",
        "test_providers_e2e",
        "test_regressions",
        "test_sync",
        "test_video",
        "test_worker",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in E2E_MODULES or fixtures & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def seed_bucket(url: str, bucket: str, keys: list[str], body: bytes = b"x" * 32) -> None:
    s3 = s3_client(url)
    s3.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=body), keys))


@pytest.fixture
def bucket_name() -> str:
    return f"b-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with emulator_process() as emu:
        yield emu
