"""Read-only storage and local video processing end to end: the CLI against moto S3 and the V7
emulator, real images made with Pillow, a real clip made with ffmpeg."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from tests.conftest import s3_client
from tests.support.e2e import (
    DATASET,
    Emulator,
    cli_env,
    job_config,
    make_clip,
    run_cli,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(300)

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


def _jpeg(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png16(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("I;16", (w, h), 40000).save(buf, "PNG")
    return buf.getvalue()


def _clip(tmp: Path) -> bytes:
    return make_clip(tmp / "clip.mp4")


def _put(url: str, bucket: str, objects: dict[str, bytes]) -> Any:
    s3 = s3_client(url)
    s3.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return s3


def _slot(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    item = next(i for i in items if i["name"] == name)
    return dict(item["slots"][0])


@needs_ffmpeg
def test_read_only_migration_makes_thumbnails_sizes_and_video_artifacts(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    objects = {
        "set/wide.jpg": _jpeg(1200, 300),
        "set/tall.JPG": _jpeg(300, 900),
        "set/tiny.jpg": _jpeg(40, 20),
        "set/deep.png": _png16(500, 400),
        "set/broken.jpg": _jpeg(800, 600)[:700],
        "set/clip.mp4": _clip(tmp_path),
        "set/scan.dcm": b"DICM" * 40,
        "set/doc.pdf": b"%PDF-1.4 " * 20,
    }
    s3 = _put(moto_url, bucket_name, objects)
    storage = emulator.storage_for(bucket_name, readonly=True, prefix="v7-thumbs")
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[media]\nthumbnail_workers = 1\nvideo_workers = 1\n",
    )
    planned = run_cli("plan", "--config", str(cfg), "--output", "-")
    assert planned.returncode == 0, planned.stderr
    lines = [orjson.loads(line) for line in planned.stdout.splitlines()]
    assert {line["endpoint"].rsplit("/", 1)[1] for line in lines} == {"register_existing_readonly"}
    pending = {p["name"]: p["media"] for line in lines for p in line.get("media_pending", [])}
    assert pending["clip.mp4"] == "video" and pending["wide.jpg"] == "image"
    assert pending["set"] == "dicom"  # the folder's .dcm: a series of one, converted
    assert "doc.pdf" not in pending

    first = run_cli("run", "--config", str(cfg))
    assert first.returncode == 3, first.stderr  # broken.jpg fails; the run goes on

    items = emulator.items(DATASET)
    assert sorted(i["name"] for i in items) == [
        "clip.mp4",
        "deep.png",
        "tall.JPG",
        "tiny.jpg",
        "wide.jpg",
    ]
    # Exact sizes, and thumbnails that exist in the bucket, fit 356x200, never enlarged.
    expected = {
        "wide.jpg": (1200, 300),
        "tall.JPG": (300, 900),
        "tiny.jpg": (40, 20),
        "deep.png": (500, 400),
    }
    for name, (w, h) in expected.items():
        slot = _slot(items, name)
        assert (slot["width"], slot["height"]) == (w, h)
        key = slot["storage_thumbnail_key"]
        assert key.startswith("v7-thumbs/")
        body = s3.get_object(Bucket=bucket_name, Key=key)
        assert body["ContentType"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(body["Body"].read()))
        assert thumb.format == "JPEG"
        assert thumb.width <= 356 and thumb.height <= 200
        assert thumb.width <= w and thumb.height <= h
    assert Image.open(
        io.BytesIO(
            s3.get_object(
                Bucket=bucket_name, Key=_slot(items, "tiny.jpg")["storage_thumbnail_key"]
            )["Body"].read()
        )
    ).size == (40, 20)

    video = _slot(items, "clip.mp4")
    assert video["storage_key"] == "set/clip.mp4"  # points at the listed object, not a copy
    assert (video["width"], video["height"]) == (160, 120)
    assert video["total_frames"] == 20 and video["visible_frames"] == 20
    for field in ("storage_thumbnail_key", "storage_frames_manifest_key"):
        s3.head_object(Bucket=bucket_name, Key=video[field])  # uploaded
    assert video["storage_thumbnail_key"].startswith("v7-thumbs/")

    report = run_cli("report", "--config", str(cfg), "--format", "jsonl")
    rows = {r["key"]: r for r in map(orjson.loads, report.stdout.splitlines())}
    assert rows["set/broken.jpg"]["state"] == "FAILED"
    assert "truncated" in rows["set/broken.jpg"]["reason"]
    # Read-only DICOM is converted (tests/test_dicom.py): "DICM" * 40 has the magic at byte
    # 128 and nothing else, so it is FAILED for having no image.
    assert rows["set/scan.dcm"]["state"] == "FAILED"
    assert "no pixel data" in rows["set/scan.dcm"]["reason"]
    assert rows["set/doc.pdf"]["state"] == "SKIPPED"

    # A re-run sends nothing new and re-makes nothing.
    requests = emulator.counters()["register_requests"]
    again = run_cli("run", "--config", str(cfg))
    assert again.returncode in (0, 3), again.stderr
    assert emulator.counters()["register_requests"] == requests


@needs_ffmpeg
def test_read_write_with_local_video_uses_the_readonly_endpoint_for_videos_only(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    _put(moto_url, bucket_name, {"v/clip.mp4": _clip(tmp_path), "v/pic.jpg": _jpeg(64, 48)})
    storage = emulator.storage_for(bucket_name, prefix="")
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra='[media]\nvideo_processing = "local"\nvideo_workers = 1\n',
    )
    result = run_cli("run", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    requests = emulator.counters()["requests"]
    assert requests.get("POST register_existing_readonly 200") == 1, requests
    assert requests.get("POST register_existing 200") == 1, requests
    items = emulator.items(DATASET)
    pic = _slot(items, "pic.jpg")
    assert "storage_thumbnail_key" not in pic  # read-write: V7 makes its own
    video = _slot(items, "clip.mp4")
    assert video["hls_segments"]["high_quality"]["bitrate"] > 0
    assert video["storage_thumbnail_key"].startswith("thumbnails/")  # no storage prefix: default


@needs_ffmpeg
def test_local_directory_files_are_uploaded_with_their_artifacts(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """darwin-py's register_locally_processed: local files go to the bucket, then register."""
    local = tmp_path / "local"
    (local / "cams").mkdir(parents=True)
    (local / "cams" / "front.mp4").write_bytes(_clip(tmp_path))
    (local / "cams" / "still.jpg").write_bytes(_jpeg(640, 480))
    s3 = _put(moto_url, bucket_name, {})
    storage = emulator.storage_for(bucket_name, readonly=True, prefix="v7")
    cfg = write_config(
        tmp_path / "c.toml",
        v7_url=emulator.url,
        s3_url=moto_url,
        bucket=bucket_name,
        ledger=tmp_path / "l.sqlite",
        storage=storage,
        extra=f'[upload]\nprovider = "aws"\nbucket = "{bucket_name}"\n'
        f'endpoint_url = "{moto_url}"\n[media]\nvideo_workers = 1\nthumbnail_workers = 1\n',
    )
    text = cfg.read_text(encoding="utf-8").replace(
        'provider = "aws"\nbucket = "'
        + bucket_name
        + '"\nprefix = ""\nendpoint_url = "'
        + moto_url
        + '"',
        f'provider = "local"\nbucket = "{local}"',
        1,
    )
    cfg.write_text(text, encoding="utf-8")
    result = run_cli("run", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    items = emulator.items(DATASET)
    video = _slot(items, "front.mp4")
    # Uploaded beside its artifacts, under one deterministic prefix.
    assert video["storage_key"].startswith("v7/") and video["storage_key"].endswith("/front.mp4")
    prefix = video["storage_key"].rsplit("/", 1)[0]
    assert video["storage_frames_manifest_key"].startswith(prefix + "/")
    head = s3.head_object(Bucket=bucket_name, Key=video["storage_key"])
    assert head["ContentLength"] == (local / "cams" / "front.mp4").stat().st_size
    still = _slot(items, "still.jpg")
    assert (still["width"], still["height"]) == (640, 480)
    body = s3.get_object(Bucket=bucket_name, Key=still["storage_key"])["Body"].read()
    assert body == (local / "cams" / "still.jpg").read_bytes()
    s3.head_object(Bucket=bucket_name, Key=still["storage_thumbnail_key"])


@needs_ffmpeg
def test_crash_mid_video_upload_then_rerun_leaves_no_orphans_and_registers_once(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    """kill -9 while a video's artifacts stream to the bucket; the re-run cuts it again under
    the same prefix (overwriting), registers it once, and nothing lies under other prefixes."""
    out = tmp_path / "long.mp4"
    make_clip(out, size="320x240", rate=30, duration_s=6)
    s3 = _put(moto_url, bucket_name, {"v/long.mp4": out.read_bytes()})
    storage = emulator.storage_for(bucket_name, readonly=True, prefix="art")
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra="[media]\nvideo_workers = 1\nupload_concurrency = 1\n",
    )

    def artifacts() -> list[str]:
        listing = s3.list_objects_v2(Bucket=bucket_name, Prefix="art/")
        return [o["Key"] for o in listing.get("Contents", [])]

    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "run", "--config", str(cfg)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: len(artifacts()) >= 20 or proc.poll() is not None, 120)
        crashed_mid_upload = proc.poll() is None
        proc.kill()
    finally:
        proc.wait(30)
    partial = artifacts()
    assert crashed_mid_upload, "the run finished before it could be killed mid-upload"
    assert emulator.counters()["items_registered"] == 0

    again = run_cli("run", "--config", str(cfg))
    assert again.returncode == 0, again.stderr[-3000:]
    items = emulator.items(DATASET)
    assert [i["name"] for i in items] == ["long.mp4"]
    slot = items[0]["slots"][0]
    prefix = slot["storage_frames_manifest_key"].rsplit("/", 1)[0]
    final = artifacts()
    assert all(k.startswith(prefix + "/") for k in final), "artifacts outside the one prefix"
    assert set(partial) <= set(final)  # the partial upload was overwritten, not orphaned
    assert len([k for k in final if "/sections/high/" in k]) == slot["visible_frames"] == 180
