"""A mixed prefix migrated from Google Cloud Storage (fake-gcs-server) and Azure Blob (Azurite)
in both storage modes: the CLI as a subprocess, the V7 emulator, real images and a real clip.

What V7 is told for an EXIF-rotated JPEG (orientation 6): the size as displayed (stored W x H
becomes H x W). V7's viewer shows a read-only image straight from the bucket in the browser,
which applies EXIF orientation (CSS ``image-orientation: from-image`` is the default), so
annotations are made on the rotated image; see ingest/media/thumbnail.py.
"""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from PIL import Image

from tests.support.e2e import DATASET, Emulator, cli_env, make_clip, run_cli
from tests.support.emulators import (
    AZURITE_ACCOUNT,
    AzuriteServer,
    _azure_service,
    azure_create_container,
    azure_seed,
    gcs_create_bucket,
    gcs_seed,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
]


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return _save(Image.new("RGB", (800, 400), (10, 200, 10)), "JPEG", exif=exif)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (300, 150), c) for c in ((255, 0, 0), (0, 0, 255))]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _clip(tmp: Path) -> bytes:
    return make_clip(tmp / "clip.mp4", size="128x96", duration_s=1)


def _objects(tmp: Path) -> dict[str, bytes]:
    return {
        "mix/rotated.jpg": _rotated_jpeg(),
        "mix/deep.png": _save(Image.new("I;16", (640, 480), 30000), "PNG"),
        "mix/cmyk.jpg": _save(Image.new("CMYK", (500, 250), (0, 255, 255, 0)), "JPEG"),
        "mix/anim.gif": _animated("GIF"),
        "mix/anim.webp": _animated("WEBP"),
        "mix/cut.jpg": _save(Image.new("RGB", (900, 900), (1, 2, 3)), "JPEG")[:600],
        "mix/empty.png": b"",
        "mix/clip.mp4": _clip(tmp),
        "mix/doc.pdf": b"%PDF-1.4 " * 20,
        "mix/scan.dcm": b"DICM" * 40,
        "mix/notes.txt": b"hello",
    }


# name → (width, height) V7 must be told
SIZES = {
    "rotated.jpg": (400, 800),
    "deep.png": (640, 480),
    "cmyk.jpg": (500, 250),
    "anim.gif": (300, 150),
    "anim.webp": (300, 150),
}


@dataclass
class Cloud:
    provider: str  # V7's provider name
    source_toml: str
    storage_bucket: str  # V7's "bucket" (Azure: the account)
    storage_prefix: str  # V7's prefix (Azure: container first)
    key_prefix: str  # what storage keys start with (Azure: the container)
    seed: Callable[[dict[str, bytes]], None]
    read: Callable[[str], bytes]  # a blob/object by provider key
    env: dict[str, str]


def _gcs(url: str) -> Cloud:
    import urllib.parse
    import urllib.request

    bucket = f"b-{uuid.uuid4().hex[:10]}"
    gcs_create_bucket(url, bucket)

    def read(key: str) -> bytes:
        quoted = urllib.parse.quote(key, safe="")
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media") as r:
            return bytes(r.read())

    return Cloud(
        provider="gcp",
        source_toml=f'provider = "gcp"\nbucket = "{bucket}"\nendpoint_url = "{url}"\n',
        storage_bucket=bucket,
        storage_prefix="v7thumbs",
        key_prefix="",
        seed=lambda objs: gcs_seed(url, bucket, objs),
        read=read,
        env={},
    )


def _azure(server: AzuriteServer) -> Cloud:
    container = f"c-{uuid.uuid4().hex[:10]}"
    azure_create_container(server, container)
    cc = _azure_service(server).get_container_client(container)
    return Cloud(
        provider="azure",
        source_toml=f'provider = "azure"\nbucket = "{container}"\n'
        'connection_string_env = "TEST_AZURE_CONN"\n',
        storage_bucket=AZURITE_ACCOUNT,
        storage_prefix=f"{container}/v7thumbs",
        key_prefix=f"{container}/",
        seed=lambda objs: azure_seed(server, container, objs),
        read=lambda key: bytes(cc.download_blob(key).readall()),
        env={"TEST_AZURE_CONN": server.connection_string},
    )


@pytest.fixture(params=["gcs", "azure"])
def cloud(request: pytest.FixtureRequest) -> Cloud:
    if request.param == "gcs":
        return _gcs(request.getfixturevalue("fake_gcs_url"))
    return _azure(request.getfixturevalue("azurite"))


def _config(tmp: Path, emulator: Emulator, cloud: Cloud, storage: str) -> Path:
    path = tmp / "c.toml"
    path.write_text(
        f"""
[v7]
base_url = "{emulator.url}"
dataset = "{DATASET}"
storage = "{storage}"
request_timeout_s = 10

[source]
{cloud.source_toml}prefix = "mix/"

[media]
thumbnail_workers = 1
video_workers = 1

[ledger]
path = "{tmp / "l.sqlite"}"

[output]
progress = false
log_format = "json"
""",
        encoding="utf-8",
    )
    return path


def _report(cfg: Path, env: dict[str, str]) -> dict[str, dict[str, str]]:
    out = run_cli("report", "--config", str(cfg), "--format", "jsonl", env=cli_env(**env))
    return {r["key"]: r for r in map(orjson.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "readwrite"])
def test_mixed_prefix_migrates_in_both_modes(
    tmp_path: Path, emulator: Emulator, cloud: Cloud, readonly: bool
) -> None:
    cloud.seed(_objects(tmp_path))
    storage = f"{'ro' if readonly else 'rw'}-{uuid.uuid4().hex[:6]}"
    emulator.add_storage(
        name=storage,
        provider=cloud.provider,
        bucket=cloud.storage_bucket,
        readonly=readonly,
        prefix=cloud.storage_prefix,
    )
    cfg = _config(tmp_path, emulator, cloud, storage)
    result = run_cli("run", "--config", str(cfg), env=cli_env(**cloud.env))
    # Read-only: cut.jpg fails (no thumbnail), so the run is not all done.
    assert result.returncode == (3 if readonly else 0), result.stderr[-3000:]

    items = {i["name"]: i["slots"][0] for i in emulator.items(DATASET)}
    rows = _report(cfg, cloud.env)
    assert rows["mix/notes.txt"]["state"] == "SKIPPED"
    assert rows["mix/empty.png"]["state"] == "SKIPPED"
    for name in SIZES:
        assert items[name]["storage_key"] == f"{cloud.key_prefix}mix/{name}"
    if not readonly:
        # Read-write: V7 reads and thumbnails everything itself; DICOM and PDF are accepted
        # (the folder's .dcm files form one series item named after the folder).
        assert set(items) == {*SIZES, "cut.jpg", "clip.mp4", "doc.pdf", "mix"}
        assert items["mix"]["slot_name"] == "0" and items["mix"]["type"] == "dicom"
        assert all("storage_thumbnail_key" not in s for s in items.values())
        assert items["clip.mp4"]["fps"] == "native"
        return

    assert set(items) == {*SIZES, "clip.mp4"}
    for name, (w, h) in SIZES.items():
        slot = items[name]
        assert (slot["width"], slot["height"]) == (w, h), name
        key = slot["storage_thumbnail_key"]
        assert key.startswith(f"{cloud.key_prefix}v7thumbs/"), key
        thumb = Image.open(io.BytesIO(cloud.read(key.removeprefix(cloud.key_prefix))))
        assert thumb.format == "JPEG" and thumb.mode == "RGB"
        # Fits 356x200, keeps the displayed aspect ratio, never enlarged.
        assert thumb.width <= 356 and thumb.height <= 200
        assert thumb.width <= w and thumb.height <= h
        assert abs(thumb.width / thumb.height - w / h) < 0.05, name
    # Animated images: the first frame (red), never the second (blue).
    for name in ("anim.gif", "anim.webp"):
        key = items[name]["storage_thumbnail_key"].removeprefix(cloud.key_prefix)
        r, g, b = Image.open(io.BytesIO(cloud.read(key))).convert("RGB").getpixel((10, 10))
        assert r > 200 and b < 60, (name, r, g, b)
    video = items["clip.mp4"]
    assert (video["width"], video["height"]) == (128, 96)
    assert video["storage_key"] == f"{cloud.key_prefix}mix/clip.mp4"
    manifest = cloud.read(video["storage_frames_manifest_key"].removeprefix(cloud.key_prefix))
    assert len(manifest.decode().split("\n")) == 10
    assert rows["mix/cut.jpg"]["state"] == "FAILED"
    assert "truncated" in rows["mix/cut.jpg"]["reason"]
    assert "DICOM" in rows["mix/scan.dcm"]["reason"]
    assert rows["mix/doc.pdf"]["state"] == "SKIPPED"

    # Nothing is sent twice, and the listing never picks up our thumbnails or artifacts.
    requests = emulator.counters()["register_requests"]
    again = run_cli("run", "--config", str(cfg), env=cli_env(**cloud.env))
    assert again.returncode == 3, again.stderr[-3000:]
    assert emulator.counters()["register_requests"] == requests
