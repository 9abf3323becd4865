"""GCS credentials checked before work: the metadata server probed (longer in a Kubernetes pod,
where it is often not ready in the first seconds) and gcloud's ADC file read like a key file.
The metadata server is a real local HTTP server answering as told."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from ingest.config import SourceConfig
from ingest.errors import AccessDenied
from ingest.providers.gcp.gcs import GCSSource

pytestmark = pytest.mark.timeout(60)


class Metadata:
    """Answers the service-account query with the statuses given, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.asked = 0
        self.host = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers.get("Metadata-Flavor") == "Google"
        self.asked += 1
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="sa@project.iam.gserviceaccount.com")


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "STORAGE_EMULATOR_HOST",
        "KUBERNETES_SERVICE_HOST",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    return tmp_path / "gcloud"


async def _serve(metadata: Metadata) -> AsyncIterator[Metadata]:
    app = web.Application()
    app.router.add_get(
        "/computeMetadata/v1/instance/service-accounts/default/email", metadata.handle
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    metadata.host = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield metadata
    finally:
        await runner.cleanup()


def _source() -> GCSSource:
    return GCSSource(SourceConfig(provider="gcp", bucket="b"))


@pytest.mark.parametrize("in_kubernetes", [True, False])
async def test_a_metadata_server_not_ready_yet_is_waited_for_in_a_pod(
    no_credentials: Path, monkeypatch: pytest.MonkeyPatch, in_kubernetes: bool
) -> None:
    async for md in _serve(Metadata([503, 503])):
        monkeypatch.setenv("GCE_METADATA_HOST", md.host)
        if in_kubernetes:
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
            await _source().check_credentials()
            assert md.asked == 3
        else:  # a VM's metadata server answers at once: one try
            with pytest.raises(AccessDenied, match="did not answer"):
                await _source().check_credentials()
            assert md.asked == 1


async def test_a_pod_without_a_service_account_fails_without_waiting(
    no_credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for md in _serve(Metadata([404])):
        monkeypatch.setenv("GCE_METADATA_HOST", md.host)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        with pytest.raises(AccessDenied, match="workload identity"):
            await _source().check_credentials()
        assert md.asked == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json", "the file is not a JSON key file"),
        ('{"client_id": "x"}', 'not a Google credentials file (no "type")'),
    ],
)
async def test_a_broken_adc_file_is_named(
    no_credentials: Path, content: str, expected: str
) -> None:
    no_credentials.mkdir()  # noqa: ASYNC240 - test setup
    (no_credentials / "application_default_credentials.json").write_text(content, "utf-8")
    with pytest.raises(AccessDenied) as e:
        await _source().check_credentials()
    assert "gcloud's application-default credentials" in str(e.value)
    assert expected in str(e.value) and "application-default login" in str(e.value)
