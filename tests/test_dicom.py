"""Read-only DICOM conversion: the pure parts (order, windowing, display pixels, codec) and a
migration end to end (the CLI against moto S3 and the V7 emulator's read-only storage, real
pydicom files, real ffmpeg)."""

from __future__ import annotations

import asyncio
import io
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, UID, JPEGBaseline8Bit

from ingest.ledger import codec
from ingest.media import MediaError
from ingest.media.convert import cache_kind, layout, section_order
from ingest.media.dicom import (
    SliceHeader,
    convert_slice,
    read_header,
    series_members,
    series_order,
    size_problem,
    to_display,
    window,
)
from ingest.model import (
    ConvertedFacts,
    ImageFacts,
    Item,
    ItemType,
    ObjectInfo,
    Rendition,
    Slot,
    VideoFacts,
)
from tests.conftest import s3_client
from tests.support.e2e import DATASET, Emulator, job_config, run_cli

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


def _file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return str(path)


def _testdata_bytes(name: str) -> bytes:
    return Path(_file(name)).read_bytes()


def _h(
    series: int | None = 1,
    instance: int | None = None,
    location: float | None = None,
    position: tuple[float, ...] | None = None,
) -> SliceHeader:
    return SliceHeader(series, instance, location, position, 4, 4, 1, False)


# --- pure ----------------------------------------------------------------------------------


def test_series_order_follows_v7_keys_in_their_significance() -> None:
    headers = [
        _h(2, 1),  # a later series comes after every slice of series 1
        _h(1, 3),
        _h(1, 1, 5.0),
        _h(1, 1, -5.0),  # same instance: the slice location decides
        _h(1, None),  # no instance number: after those that have one
        _h(1, 2, None, (0.0, 0.0, 9.0)),
        _h(1, 2, None, (0.0, 0.0, 1.0)),  # same up to the position: the position decides
    ]
    names = ["a", "b", "c", "d", "e", "f", "g"]
    assert series_order(headers, names) == [3, 2, 6, 5, 1, 4, 0]
    assert series_order(headers, names, ignore_layout=True) == list(range(7))
    # Everything equal: the file name decides.
    assert series_order([_h(1, 1), _h(1, 1)], ["z.dcm", "a.dcm"]) == [1, 0]


def test_positions_sort_along_the_slice_normal_when_there_is_no_slice_location() -> None:
    # Sagittal: rows along +y, columns along -z, so the normal is -x: depth grows as x falls.
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    xs = [-10.0, 10.0, 0.0]
    headers = [
        SliceHeader(1, None, None, (x, 5.0, 7.0), 4, 4, 1, False, orientation=sagittal) for x in xs
    ]
    assert series_order(headers, ["a", "b", "c"]) == [1, 2, 0]  # x 10, 0, -10
    # An oblique series whose x drifts against its depth: the projection, not x, decides.
    oblique = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)  # normal (0, 0.6, 0.8)
    positions = [(3.0, 0.6 * d, 0.8 * d) for d in (2.0, 0.0, 1.0)]
    headers = [
        SliceHeader(1, None, None, (p[0] - i, p[1], p[2]), 4, 4, 1, False, orientation=oblique)
        for i, p in enumerate(positions)
    ]
    assert series_order(headers, ["a", "b", "c"]) == [1, 2, 0]
    # SliceLocation still comes first, as the seed says.
    located = [replace(headers[0], slice_location=-1.0), *headers[1:]]
    assert series_order(located, ["a", "b", "c"])[0] == 0


def test_sections_expand_frames_in_file_order_and_sizes_must_agree() -> None:
    multi = SliceHeader(1, 1, None, None, 4, 4, 3, False)
    assert section_order([_h(1, 2), multi], [1, 0]) == [(1, 0), (1, 1), (1, 2), (0, 0)]
    assert size_problem([_h(), _h()], ["a", "b"]) == ""
    big = SliceHeader(1, 1, None, None, 8, 6, 1, False)
    reason = size_problem([_h(), big, _h()], ["a", "b", "c"])
    assert (
        "differing sizes" in reason and "4x4 (2, e.g. a)" in reason and "6x8 (1, e.g. b)" in reason
    )


def test_linear_window_follows_the_standard_formula() -> None:
    # c=128, w=256 maps 0..255 onto itself (PS3.3 C.11.2.1.2.1).
    x = np.arange(256, dtype=np.float64)
    assert (window(x, 128, 256) == np.arange(256)).all()
    # CT soft tissue window: below c - w/2 black, above c + w/2 white, the center mid-grey.
    out = window(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), 40, 400)
    assert out[0] == 0 and out[1] == 0 and out[-1] == 255 and out[-2] == 255
    assert 126 <= out[2] <= 129
    exact = window(np.array([-160.0, 40.0, 240.0]), 40, 400, "LINEAR_EXACT")
    assert list(exact) == [0, 128, 255]
    sig = window(np.array([40.0, -1000.0, 1000.0]), 40, 400, "SIGMOID")
    assert sig[0] == 128 and sig[1] < 5 and sig[2] > 250
    with pytest.raises(ValueError):
        window(x, 0, 0.5)


def test_display_rescales_windows_inverts_monochrome1_and_falls_back_to_min_max() -> None:
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    arr = ds.pixel_array
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    hu = arr.astype(np.float64) - 1024
    expected = window(hu, 40, 400)
    assert (to_display(arr, ds) == expected).all()
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert (to_display(arr, ds) == 255 - expected).all()
    del ds.WindowCenter, ds.WindowWidth
    ds.PhotometricInterpretation = "MONOCHROME2"
    out = to_display(arr, ds)  # no window in the file: min/max of the slice
    assert out.min() == 0 and out.max() == 255
    lo = np.unravel_index(np.argmin(arr), arr.shape)
    assert out[lo] == 0


def test_enhanced_multi_frame_rescale_and_window_come_from_the_functional_groups() -> None:
    from pydicom.dataset import Dataset

    from ingest.media.dicom import frame_dataset

    def group(slope: float, intercept: float, center: float, width: float) -> Dataset:
        g = Dataset()
        t, v = Dataset(), Dataset()
        t.RescaleSlope, t.RescaleIntercept = slope, intercept
        v.WindowCenter, v.WindowWidth = center, width
        g.PixelValueTransformationSequence = [t]
        g.FrameVOILUTSequence = [v]
        return g

    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SharedFunctionalGroupsSequence = [group(1, -1024, 40, 400)]
    only_voi = Dataset()
    v = Dataset()
    v.WindowCenter, v.WindowWidth = 500, 2000
    only_voi.FrameVOILUTSequence = [v]
    ds.PerFrameFunctionalGroupsSequence = [Dataset(), only_voi]
    arr = np.array([[0, 1064, 2048]], dtype=np.uint16)
    first = to_display(arr, frame_dataset(ds, 0))  # shared: HU = v - 1024, window 40/400
    assert list(first[0]) == list(window(arr.astype(float) - 1024, 40, 400)[0])
    second = to_display(arr, frame_dataset(ds, 1))  # its own window, the shared rescale
    assert list(second[0]) == list(window(arr.astype(float) - 1024, 500, 2000)[0])


def _enhanced(path: Path, frames: int = 2, rows: int = 4, columns: int = 4) -> np.ndarray:
    """An enhanced multi-frame CT file whose rescale and window live only in its shared
    functional groups (as Enhanced CT/MR keep them); returns its stored pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = frames
    shared, pvt, voi = Dataset(), Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept = 1, -1024
    voi.WindowCenter, voi.WindowWidth = 40, 400
    shared.PixelValueTransformationSequence = [pvt]
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(frames)]
    row = np.linspace(824, 1264, columns).astype(np.uint16)
    arr = np.tile(row, (frames, rows, 1))
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return arr


def test_an_enhanced_file_on_disk_is_windowed_from_its_functional_groups(tmp_path: Path) -> None:
    from ingest.media.dicom import convert_frame

    path = tmp_path / "enhanced.dcm"
    arr = _enhanced(path)
    got = np.frombuffer(convert_frame(str(path), 1, False), dtype=np.uint8).reshape(4, 4)
    # HU = stored - 1024 = -200, 0, ..., 240 under 40/400; min/max would give 0..255 instead.
    assert (got == window(arr[1].astype(float) - 1024, 40, 400)).all()
    assert got[0, 0] == 0 and 0 < got[0, 1] < 255


def test_colour_files_come_out_rgb_and_bad_files_fail_with_a_reason(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_file("SC_ybr_full_422_uncompressed.dcm"))
    out = to_display(ds.pixel_array, ds)  # pydicom converted YBR to RGB
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file" * 20)
    with pytest.raises(MediaError, match="not a DICOM file"):
        read_header(str(junk))
    with pytest.raises(MediaError, match="no pixel data"):
        read_header(_file("rtplan.dcm"))


def test_untrusted_headers_are_rejected_before_anything_is_sized_from_them(
    tmp_path: Path,
) -> None:
    ds = pydicom.dcmread(_file("CT_small.dcm"))  # 128 x 128, 16-bit, native
    path = tmp_path / "x.dcm"
    ds.NumberOfFrames = 2_000_000_000
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(MediaError, match="too many frames: NumberOfFrames 2,000,000,000"):
        read_header(str(path))
    ds.NumberOfFrames = 3  # one frame's bytes in the file, three stated
    ds.save_as(path, enforce_file_format=True)
    size = path.stat().st_size
    assert read_header(str(path)).frames == 3  # no size given: nothing to compare
    with pytest.raises(MediaError, match="truncated pixel data: 128 x 128 x 3 frames need 98,304"):
        read_header(str(path), size)
    del ds.NumberOfFrames
    ds.save_as(path, enforce_file_format=True)
    assert read_header(str(path), path.stat().st_size, 128 * 128).rows == 128
    with pytest.raises(MediaError, match="image too large: 128 x 128"):
        read_header(str(path), path.stat().st_size, 128 * 128 - 1)
    # An encapsulated syntax has no size to derive: only the object's bytes bound it.
    assert read_header(_file("JPEG2000.dcm"), 10).frames == 1


@pytest.mark.parametrize(
    ("syntax", "reason", "at_header"),
    [
        (MPEG2MPML, "unsupported transfer syntax: MPEG2", True),  # no image decoder for MPEG
        ("1.2.3.4.5", "unsupported transfer syntax: 1.2.3.4.5", True),
        (JPEGBaseline8Bit, "cannot decode the pixel data", False),  # a decoder, corrupt data
    ],
)
def test_undecodable_pixel_data_fails_with_the_syntax_or_the_decoder_error(
    tmp_path: Path, syntax: str, reason: str, at_header: bool
) -> None:
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([b"junk" * 10])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    if at_header:  # refused from the header already, before any pixel is read
        with pytest.raises(MediaError, match=reason):
            read_header(str(path))
    else:
        assert read_header(str(path)).rows == 128
    with pytest.raises(MediaError, match=reason):
        convert_slice(str(path), 10**9)


def test_converted_facts_round_trip_and_say_which_slice_is_which_section() -> None:
    objs = tuple(ObjectInfo(f"s/{n}.dcm", 10, "e") for n in "abc")
    image = ImageFacts(128, 64, "t/x.jpg")
    slot = Slot("0", ItemType.IMAGE, objs[:1], "a.png", facts=(ConvertedFacts("p/a.png", image),))
    item = Item("/", "a.dcm", (slot,))
    assert codec.item_from_bytes(codec.item_to_bytes(item)) == item
    assert codec.CONVERTED_MARK in codec.item_to_bytes(item)
    assert codec.facts_from_bytes(codec.facts_to_bytes(slot.facts[0])) == slot.facts[0]
    assert codec.converted_by_key(item) == {"s/a.dcm": "p/a.png"}
    assert slot.image == image and slot.video is None
    # A series whose second file holds two frames, stored in order (2, 0, 1).
    made = VideoFacts(
        "K/s.mkv", 4, 4, 10.0, 4, 4, Rendition("", 0), Rendition("", 0), "K/sections/high",
        "png", "K/frames_manifest.txt", "K/thumbnail.jpg", 100,
    )  # fmt: skip
    facts = ConvertedFacts("K/s.mkv", made, (2, 0, 1, 1))
    series = Slot("0", ItemType.VIDEO, objs, "s.mkv", facts=(facts,))
    assert series.video == made and codec.facts_from_bytes(codec.facts_to_bytes(facts)) == facts
    got = codec.converted_by_key(Item("/", "s", (series,)))
    assert got == {
        "s/a.dcm": "K/s.mkv (section 1)",
        "s/b.dcm": "K/s.mkv (sections 2-3)",
        "s/c.dcm": "K/s.mkv (section 0)",
    }


def test_layout_keys_are_derived_from_the_object_or_series_folder() -> None:
    one = Slot("0", ItemType.DICOM, (ObjectInfo("a/b/CT 1.dcm", 5, "e"),), "CT 1.dcm")
    k = layout(one, "v7", "ro")
    assert k.png.startswith("v7/dicom/") and k.png.endswith("/CT_1.png")
    assert layout(one, "v7", "ro") == k  # deterministic: a re-run overwrites
    two = Slot("0", ItemType.DICOM, (ObjectInfo("a/b/1.dcm", 5), ObjectInfo("a/b/2.dcm", 5)), "1")
    three = Slot("0", ItemType.DICOM, (*two.objects, ObjectInfo("a/b/3.dcm", 5)), "1")
    assert layout(two, "v7", "ro").video_prefix == layout(three, "v7", "ro").video_prefix
    assert layout(two, "v7", "ro").video_name == "b.mp4"
    # A new version of one slice is a cache miss.
    changed = Slot("0", ItemType.DICOM, (two.objects[0], ObjectInfo("a/b/2.dcm", 5, "new")), "1")
    assert cache_kind(two, 10, False, None) != cache_kind(changed, 10, False, None)


# --- end to end ----------------------------------------------------------------------------


def _slice(
    value: int, instance: int, location: float, *, size: int = 128, padding: int = 0
) -> bytes:
    """A CT slice of one uniform value under the identity window (c 128, w 256): its 8-bit
    pixels are ``value`` exactly, so a section's pixels say which slice it came from.
    ``padding``: bytes of a private element before the image attributes (a long header)."""
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    if padding:
        ds.add_new(0x00090010, "LO", "TEST PADDING")
        ds.add_new(0x00091010, "OB", b"\0" * padding)
    ds.PixelData = np.full((128, 128), value, dtype=np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.InstanceNumber, ds.SliceLocation = instance, location
    if size != 128:
        ds.Rows = ds.Columns = size
        ds.PixelData = np.full((size, size), value, dtype=np.int16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _truncated(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _monochrome1() -> tuple[bytes, Any]:
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    ds2 = pydicom.dcmread(_file("MR_small.dcm"))
    ds2.PhotometricInterpretation = "MONOCHROME2"
    return buf.getvalue(), to_display(ds2.pixel_array, ds2)


def _png(s3: Any, bucket: str, key: str) -> Any:
    return np.asarray(Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())))


@needs_ffmpeg
@pytest.mark.timeout(300)
def test_read_only_dicom_slices_become_images_and_series_become_videos(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    mono1, mono2_display = _monochrome1()
    # Stored (listing) order s1..s5; V7's order is by InstanceNumber, then SliceLocation.
    # 256x256 slices (128 KiB of pixels) are longer than the header prefix the series sort
    # reads; s3's header itself is longer than that prefix (the whole object is read).
    series = {
        "series/s1.dcm": _slice(200, 3, 0.0, size=256),
        "series/s2.dcm": _slice(40, 1, 10.0, size=256),
        "series/s3.dcm": _slice(160, 2, 5.0, size=256, padding=100_000),
        "series/s4.dcm": _slice(80, 1, 20.0, size=256),
        "series/s5.dcm": _slice(120, 2, -5.0, size=256),
    }
    expected_order = [40, 80, 120, 160, 200]
    files = {
        "one/ct/CT_small.dcm": Path(_file("CT_small.dcm")).read_bytes(),
        "one/mr/MR_small_RLE.dcm": Path(_file("MR_small_RLE.dcm")).read_bytes(),
        "one/j2k/JPEG2000.dcm": Path(_file("JPEG2000.dcm")).read_bytes(),
        "one/ybr/SC_ybr_full_422_uncompressed.dcm": Path(
            _file("SC_ybr_full_422_uncompressed.dcm")
        ).read_bytes(),
        "one/mono1/inverted.dcm": mono1,
        "one/multi/rtdose.dcm": Path(_file("rtdose.dcm")).read_bytes(),  # 15 frames
        "bad/junk.dcm": b"this is not DICOM at all " * 10,
        "bad/plan/rtplan.dcm": Path(_file("rtplan.dcm")).read_bytes(),
        "cut/a.dcm": _slice(10, 1, 0.0),
        "cut/b.dcm": _truncated(_slice(10, 2, 1.0)),  # its header is fine, its pixels are not
        "sizes/a.dcm": _slice(10, 1, 0.0),
        "sizes/b.dcm": _slice(10, 2, 1.0, size=64),
        **series,
    }
    s3 = s3_client(moto_url)
    s3.create_bucket(Bucket=bucket_name)
    for key, body in files.items():
        s3.put_object(Bucket=bucket_name, Key=key, Body=body)
    storage = emulator.storage_for(bucket_name, readonly=True, prefix="v7")
    extra = "[media]\nthumbnail_workers = 1\nvideo_workers = 1\n"
    cfg = job_config(tmp_path, emulator, moto_url, bucket_name, storage, extra=extra)

    planned = run_cli("plan", "--config", str(cfg), "--output", "-")
    assert planned.returncode == 0, planned.stderr
    pending = {
        p["name"]: p
        for line in map(orjson.loads, planned.stdout.splitlines())
        for p in line.get("media_pending", [])
    }
    assert pending["ct"]["media"] == "dicom"
    assert pending["ct"]["converted"][0]["as"] == "image"
    assert pending["series"]["converted"][0]["as"] == "video"
    assert pending["series"]["converted"][0]["objects"] == 5

    first = run_cli("run", "--config", str(cfg), timeout=240)
    assert first.returncode == 3, first.stderr  # the bad files fail; the run goes on

    items = {i["name"]: i for i in emulator.items(DATASET)}
    assert set(items) == {"ct", "mr", "j2k", "ybr", "mono1", "multi", "series"}
    sizes = {"ct": (128, 128), "mr": (64, 64), "j2k": (256, 1024), "ybr": (100, 100)}
    for name, (w, h) in {**sizes, "mono1": (64, 64)}.items():
        (slot,) = items[name]["slots"]
        assert slot["type"] == "image"
        assert (slot["width"], slot["height"]) == (w, h)
        assert slot["storage_key"].startswith("v7/dicom/") and slot["storage_key"].endswith(".png")
        png = _png(s3, bucket_name, slot["storage_key"])
        assert (png.shape[1], png.shape[0]) == (w, h)
        thumb = Image.open(
            io.BytesIO(
                s3.get_object(Bucket=bucket_name, Key=slot["storage_thumbnail_key"])["Body"].read()
            )
        )
        assert thumb.format == "JPEG" and thumb.width <= 356 and thumb.height <= 200
    assert _png(s3, bucket_name, items["ybr"]["slots"][0]["storage_key"]).shape == (100, 100, 3)
    # MONOCHROME1: the same pixels and window as MONOCHROME2 come out inverted.
    inverted = _png(s3, bucket_name, items["mono1"]["slots"][0]["storage_key"])
    assert (inverted == 255 - mono2_display).all()

    (video,) = items["series"]["slots"]
    assert video["type"] == "video" and (video["width"], video["height"]) == (256, 256)
    assert video["total_frames"] == 5 and video["visible_frames"] == 5
    assert video["storage_key"].endswith("/series.mp4")  # browser-playable, not the FFV1
    listed = s3.list_objects_v2(Bucket=bucket_name).get("Contents", [])
    assert not [o["Key"] for o in listed if o["Key"].endswith(".mkv")]
    for field in ("storage_key", "storage_thumbnail_key", "storage_frames_manifest_key"):
        s3.head_object(Bucket=bucket_name, Key=video[field])
    prefix = video["storage_sections_key_prefix"]
    values = [int(_png(s3, bucket_name, f"{prefix}/{n:09d}.png").mean()) for n in range(5)]
    assert values == expected_order  # the seed's order, not the listing's
    multi = items["multi"]["slots"][0]
    assert multi["type"] == "video" and multi["total_frames"] == 15
    assert (multi["width"], multi["height"]) == (10, 10)

    report = run_cli("report", "--config", str(cfg), "--format", "jsonl")
    rows = {r["key"]: r for r in map(orjson.loads, report.stdout.splitlines())}
    assert rows["bad/junk.dcm"]["state"] == "FAILED"
    assert "not a DICOM file" in rows["bad/junk.dcm"]["reason"]
    assert rows["bad/plan/rtplan.dcm"]["state"] == "FAILED"
    assert "no pixel data" in rows["bad/plan/rtplan.dcm"]["reason"]
    assert rows["cut/a.dcm"]["state"] == "FAILED"  # one bad slice fails its series, named
    assert rows["cut/a.dcm"]["reason"].startswith("b.dcm: truncated pixel data")
    assert rows["sizes/a.dcm"]["state"] == "FAILED"
    assert "differing sizes" in rows["sizes/a.dcm"]["reason"]
    assert rows["one/ct/CT_small.dcm"]["converted"] == items["ct"]["slots"][0]["storage_key"]
    assert rows["series/s2.dcm"]["converted"] == f"{video['storage_key']} (section 0)"
    assert rows["series/s1.dcm"]["converted"] == f"{video['storage_key']} (section 4)"

    # A re-run sends nothing; a second job over the same bucket and ledger converts nothing
    # again (the media cache): the PNGs and videos deleted meanwhile are not made again.
    requests = emulator.counters()["register_requests"]
    again = run_cli("run", "--config", str(cfg))
    assert again.returncode in (0, 3), again.stderr
    assert emulator.counters()["register_requests"] == requests
    made = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket_name, Prefix="v7/")["Contents"]]
    s3.delete_objects(
        Bucket=bucket_name, Delete={"Objects": [{"Key": k} for k in made if "dicom/" in k]}
    )
    s3.delete_object(Bucket=bucket_name, Key=video["storage_key"])
    second = run_cli("run", "--config", str(cfg), "--set", "ledger.job=second", timeout=240)
    assert second.returncode in (0, 3), second.stderr
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket_name, Prefix="v7/")["Contents"]]
    assert not [k for k in left if "dicom/" in k]
    assert video["storage_key"] not in left


# --- planner, wire, emulator -----------------------------------------------------------------


def test_read_only_dicom_is_planned_for_conversion_and_read_write_is_unchanged() -> None:
    from ingest.config import PlanConfig
    from ingest.model import Media
    from ingest.planner import ShardPlanner
    from ingest.run.processing import DICOM_VIDEO_QUEUE_BYTES, _queue

    # In key order: "p/one.dcm" is alone in its folder "p/", the three below "p/s/" a series.
    objs = [ObjectInfo("p/one.dcm", 9)] + [ObjectInfo(f"p/s/{i}.dcm", 9, "e") for i in range(3)]
    ro = ShardPlanner(PlanConfig(), readonly=True)
    planned = [*ro.feed(objs), *ro.finish()]
    assert all(isinstance(i, Item) for i in planned)
    by_name = {i.name: i for i in planned if isinstance(i, Item)}
    assert set(by_name) == {"p", "s"}
    assert by_name["s"].media is Media.DICOM and by_name["p"].media is Media.DICOM
    assert _queue(by_name["s"]) is Media.VIDEO  # a series is cut by ffmpeg
    assert _queue(by_name["p"]) is Media.IMAGE  # one file: usually one PNG
    # A large single file is likely multi-frame (a video under a video permit): it must not
    # wait for that permit in an image worker.
    big = ShardPlanner(PlanConfig(), readonly=True)
    (cine,) = [
        i
        for i in [*big.feed([ObjectInfo("c/cine.dcm", DICOM_VIDEO_QUEUE_BYTES + 1)]), *big.finish()]
        if isinstance(i, Item)
    ]
    assert cine.media is Media.DICOM and _queue(cine) is Media.VIDEO
    singles = ShardPlanner(PlanConfig(dicom_series=False), readonly=True)
    alone = [i for i in [*singles.feed(objs), *singles.finish()] if isinstance(i, Item)]
    assert [i.name for i in alone] == ["one.dcm", "0.dcm", "1.dcm", "2.dcm"]
    assert {(i.media, _queue(i), len(i.slots[0].objects)) for i in alone} == {
        (Media.DICOM, Media.IMAGE, 1)
    }
    rw = ShardPlanner(PlanConfig(), readonly=False)
    rw_items = [i for i in [*rw.feed(objs), *rw.finish()] if isinstance(i, Item)]
    assert {i.media for i in rw_items} == {Media.NONE}
    assert {s.type for i in rw_items for s in i.slots} == {ItemType.DICOM}


def test_a_converted_slice_goes_on_the_wire_as_a_read_only_image_of_its_png() -> None:
    from ingest.emulator.store import Invalid, Store
    from ingest.media.convert import converted_slot
    from ingest.registrar.wire import KeyMap, Target, envelope

    dicom = Slot("0", ItemType.DICOM, (ObjectInfo("p/one.dcm", 9),), "one.dcm", extract_views=True)
    keys = layout(dicom, "v7", "s3-ro")
    facts = ConvertedFacts(keys.png, ImageFacts(512, 256, keys.thumbnail), (0,))
    item = Item("/p", "one.dcm", (converted_slot(dicom, facts, keys),), readonly_endpoint=True)
    body = envelope([item], Target("t", "demo-dataset", "s3-ro"), KeyMap())
    (slot,) = body["items"][0]["slots"]
    assert slot == {
        "slot_name": "0",
        "type": "image",
        "storage_key": keys.png,
        "file_name": "one.png",
        "storage_thumbnail_key": keys.thumbnail,
        "height": 256,
        "width": 512,
    }
    store = Store.default()
    store.check_envelope(body, readonly_endpoint=True)  # accepted like any read-only image
    # The .dcm itself, even labelled an image, is refused on read-only storage.
    raw = {**slot, "storage_key": "p/one.dcm", "file_name": "one.dcm"}
    with pytest.raises(Invalid, match="does not accept DICOM"):
        store.check_envelope({**body, "items": [{**body["items"][0], "slots": [raw]}]}, True)


class _DirBucket:
    """A bucket that is a local directory (real files, real reads), recording what the
    converter does: ranged header reads, downloads, and the most slices on temp disk."""

    def __init__(self, root: Path, temp_root: Path | None = None) -> None:
        self.root = root
        self.temp_root = temp_root  # where the converter's temp dirs are: counted on each call
        self.ranges: list[str] = []
        self.downloads: list[str] = []
        self.uploaded: dict[str, bytes] = {}
        self.most_on_disk = 0

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        self.ranges.append(key)
        self.note_disk()
        data = await asyncio.to_thread((self.root / key).read_bytes)
        return data[start:end]

    async def download(self, key: str, dest: Path) -> None:
        self.downloads.append(key)
        await asyncio.to_thread(shutil.copyfile, self.root / key, dest)
        self.note_disk()

    def note_disk(self) -> None:
        """Every file in the converter's temp dirs (slices, header prefixes, the videos)."""
        if self.temp_root is None:
            return
        on_disk = sum(1 for p in self.temp_root.glob("ingest-dicom-*/*") if p.is_file())
        self.most_on_disk = max(self.most_on_disk, on_disk)

    async def upload(
        self, key: str, data: bytes | Path, content_type: str, content_encoding: str | None = None
    ) -> None:
        self.note_disk()
        if isinstance(data, Path):
            data = await asyncio.to_thread(data.read_bytes)
        self.uploaded[key] = data

    def to_storage(self, key: str) -> str:
        return key


@needs_ffmpeg
@pytest.mark.e2e  # real decoder processes and ffmpeg
@pytest.mark.timeout(120)
async def test_a_series_is_sorted_from_header_prefixes_and_streamed_through_a_bounded_temp_dir(
    tmp_path: Path,
) -> None:
    from ingest.media.convert import HEADER_BYTES, PREFETCH_FILES, DicomConverter
    from ingest.media.thumbnail import ThumbnailPool
    from ingest.media.video import VideoOptions, VideoPool

    root = tmp_path / "bucket"
    (root / "s").mkdir(parents=True)
    n = 30
    objs = []
    for k in range(n):  # listed s00..s29, V7's order is the reverse (instance n - k)
        body = _slice(k * 8, n - k, 0.0, size=256, padding=100_000 if k == 7 else 0)
        (root / f"s/s{k:02d}.dcm").write_bytes(body)
        assert len(body) > HEADER_BYTES
        objs.append(ObjectInfo(f"s/s{k:02d}.dcm", len(body), f"e{k}"))
    bucket = _DirBucket(root, tmp_path)
    async with ThumbnailPool(workers=1, max_pending=2) as pool:
        conv = DicomConverter(
            pool,
            VideoPool(workers=1, temp_dir=tmp_path),
            bucket,
            bucket,
            prefix="art",
            storage_name="ro",
            video_options=VideoOptions(),
            fps=10.0,
            ignore_layout=False,
            temp_dir=tmp_path,
        )
        facts = await conv.convert(Slot("0", ItemType.DICOM, tuple(objs), "s00.dcm"))
    assert facts.order == tuple(range(n - 1, -1, -1))
    assert sorted(set(bucket.ranges)) == [o.key for o in objs]  # every header from a prefix
    # s07's header is longer than the first prefix: read again with a longer one, never
    # downloaded whole for its header; every slice is downloaded once, to be decoded.
    assert bucket.ranges.count("s/s07.dcm") == 2 and len(bucket.ranges) == n + 1
    assert sorted(bucket.downloads) == [o.key for o in objs]
    # Every file in the temp dir (slices, prefixes, the FFV1 and MP4): a window, never the
    # series (n slices).
    assert 0 < bucket.most_on_disk <= PREFETCH_FILES + 2 + 1
    assert isinstance(facts.made, VideoFacts) and facts.made.total_frames == n
    first = bucket.uploaded[f"{facts.made.sections_prefix}/000000000.png"]
    assert int(np.asarray(Image.open(io.BytesIO(first))).mean()) == (n - 1) * 8


def _converter(pool: Any, bucket: _DirBucket, tmp_path: Path, videos: Any = None) -> Any:
    from ingest.media.convert import DicomConverter
    from ingest.media.video import VideoOptions

    return DicomConverter(
        pool,
        videos,
        bucket,
        bucket,
        prefix="art",
        storage_name="ro",
        video_options=VideoOptions(),
        fps=10.0,
        ignore_layout=False,
        temp_dir=tmp_path,
    )


@pytest.mark.e2e  # real decoder processes
@pytest.mark.timeout(120)
async def test_the_pixel_limit_applies_to_every_slice_of_a_series_before_any_decoding(
    tmp_path: Path,
) -> None:
    from ingest.media.thumbnail import ThumbnailPool

    root = tmp_path / "bucket"
    (root / "s").mkdir(parents=True)
    objs = []
    for k in range(3):
        body = _slice(k, k + 1, 0.0, size=256)
        (root / f"s/{k}.dcm").write_bytes(body)
        objs.append(ObjectInfo(f"s/{k}.dcm", len(body), f"e{k}"))
    bucket = _DirBucket(root)
    async with ThumbnailPool(workers=1, max_pixels=256 * 256 - 1) as pool:
        with pytest.raises(MediaError, match=r"\.dcm: image too large: 256 x 256"):
            await _converter(pool, bucket, tmp_path).convert(
                Slot("0", ItemType.DICOM, tuple(objs), "0.dcm")
            )
    assert bucket.downloads == []  # refused from the header prefixes alone


def _ffprobe(path: Path) -> dict[str, Any]:
    import subprocess

    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        check=True,
        capture_output=True,
    ).stdout
    result: dict[str, Any] = orjson.loads(out)
    return result


def _series_bucket(tmp_path: Path, bodies: dict[str, bytes]) -> tuple[_DirBucket, list[ObjectInfo]]:
    root = tmp_path / "bucket"
    objs = []
    for key, body in bodies.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(body)
        objs.append(ObjectInfo(key, len(body), f"e-{key}"))
    return _DirBucket(root), objs


@needs_ffmpeg
@pytest.mark.e2e  # real decoder processes and ffmpeg
@pytest.mark.timeout(120)
async def test_a_series_plays_as_an_h264_mp4_and_its_small_thumbnail_is_not_enlarged(
    tmp_path: Path,
) -> None:
    from ingest.media.thumbnail import ThumbnailPool
    from ingest.media.video import VideoPool

    bucket, objs = _series_bucket(
        tmp_path, {f"s/{k}.dcm": _slice(k * 40, k + 1, 0.0) for k in range(3)}
    )
    async with ThumbnailPool(workers=1) as pool:
        conv = _converter(pool, bucket, tmp_path, VideoPool(workers=1, temp_dir=tmp_path))
        facts = await conv.convert(Slot("0", ItemType.DICOM, tuple(objs), "0.dcm"))
    assert isinstance(facts.made, VideoFacts)
    with Image.open(io.BytesIO(bucket.uploaded[facts.made.thumbnail_key])) as im:
        assert im.size == (128, 128)  # fits inside 356x200 already: kept, never enlarged
    # The storage key is a browser-playable MP4 uploaded beside the artifacts; no FFV1 leaves.
    assert facts.storage_key.endswith("/s.mp4")
    assert facts.made.size_bytes == len(bucket.uploaded[facts.storage_key])
    assert not [k for k in bucket.uploaded if k.endswith(".mkv")]
    mp4 = tmp_path / "got.mp4"
    mp4.write_bytes(bucket.uploaded[facts.storage_key])
    probe = _ffprobe(mp4)
    assert "mp4" in probe["format"]["format_name"]
    (stream,) = probe["streams"]
    assert (stream["codec_name"], stream["pix_fmt"]) == ("h264", "yuv420p")
    assert (stream["width"], stream["height"], stream["nb_frames"]) == (128, 128, "3")


def test_series_members_keep_the_largest_series_and_leave_the_rest_out_with_reasons() -> None:
    def h(uid: str, size: int = 4, frames: int = 1) -> SliceHeader:
        return SliceHeader(1, 1, None, None, size, size, frames, False, series_uid=uid)

    headers = [h("A"), h("A", 8), h("A"), h("B"), h("A"), h("A", frames=5)]
    names = [f"{k}.dcm" for k in "abcdef"]
    m = series_members(headers, names)
    assert m.kept == [0, 2, 4] and m.problem == ""
    reasons = dict(m.left_out)
    assert sorted(reasons) == [1, 3, 5]
    assert "8x8 slice in a 4x4 series" in reasons[1]
    assert "another series (SeriesInstanceUID B)" in reasons[3]
    assert "multi-frame file (5 frames) is not spliced" in reasons[5]
    # ignore_dicom_layout: every file a slice (frames spliced), the UID not looked at.
    forced = series_members(headers, names, ignore_layout=True)
    assert forced.kept == [0, 2, 3, 4, 5] and [i for i, _r in forced.left_out] == [1]
    # No majority: nothing is chosen, the slot fails with the sizes.
    tie = series_members([h("A"), h("A", 8)], ["a", "b"])
    assert tie.kept == [] and "differing sizes" in tie.problem


def _with(data: bytes, **attrs: Any) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for name, value in attrs.items():
        setattr(ds, name, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@needs_ffmpeg
@pytest.mark.e2e  # real decoder processes and ffmpeg
@pytest.mark.timeout(120)
async def test_a_localizer_another_series_and_a_multi_frame_file_are_left_out_not_fatal(
    tmp_path: Path,
) -> None:
    from ingest.media.thumbnail import ThumbnailPool
    from ingest.media.video import VideoPool

    bodies = {f"s/{k}.dcm": _slice(40 * (k + 1), 3 - k, 0.0) for k in range(3)}
    bodies["s/scout.dcm"] = _slice(250, 1, 0.0, size=64)
    bodies["s/other.dcm"] = _with(_slice(200, 1, 0.0), SeriesInstanceUID="1.2.3.4")
    bodies["s/multi.dcm"] = _testdata_bytes("rtdose.dcm")  # 15 frames
    bucket, objs = _series_bucket(tmp_path, bodies)
    slot = Slot("0", ItemType.DICOM, tuple(objs), "0.dcm")
    async with ThumbnailPool(workers=1) as pool:
        conv = _converter(pool, bucket, tmp_path, VideoPool(workers=1, temp_dir=tmp_path))
        facts = await conv.convert(slot)
    assert facts.order == (2, 1, 0)  # instances 1, 2, 3 of the series kept
    assert isinstance(facts.made, VideoFacts) and facts.made.total_frames == 3
    assert [i for i, _r in facts.left_out] == [3, 4, 5]
    item = Item("/", "s", (replace(slot, facts=(facts,)),))
    report = codec.converted_by_key(item)
    assert report["s/scout.dcm"].startswith("not converted: 64x64 slice in a 128x128 series")
    assert report["s/other.dcm"].startswith("not converted: another series")
    assert report["s/multi.dcm"].startswith("not converted: a multi-frame file (15 frames)")
    assert report["s/0.dcm"] == f"{facts.storage_key} (section 2)"
    assert codec.item_from_bytes(codec.item_to_bytes(item)) == item  # left_out round-trips


@pytest.mark.e2e  # real decoder processes
@pytest.mark.timeout(60)
async def test_a_dcm_object_over_the_size_limit_fails_unread(tmp_path: Path) -> None:
    from ingest.media.convert import DicomConverter
    from ingest.media.thumbnail import ThumbnailPool
    from ingest.media.video import VideoOptions

    body = _slice(10, 1, 0.0)
    bucket, objs = _series_bucket(tmp_path, {"one/a.dcm": body, "s/a.dcm": body, "s/b.dcm": body})
    async with ThumbnailPool(workers=1) as pool:
        conv = DicomConverter(
            pool,
            None,
            bucket,
            bucket,
            prefix="art",
            storage_name="ro",
            video_options=VideoOptions(),
            fps=10.0,
            ignore_layout=False,
            temp_dir=tmp_path,
            max_bytes=len(body) - 1,
        )
        for slot_objs in ((objs[0],), (objs[1], objs[2])):
            with pytest.raises(
                MediaError, match=r"DICOM file too large: [\d,]+ bytes \(media\.max_image_bytes"
            ):
                await conv.convert(Slot("0", ItemType.DICOM, slot_objs, "a.dcm"))
    assert bucket.downloads == [] and bucket.ranges == []


def test_min_max_fallback_skips_padding_and_uses_one_range_per_series(tmp_path: Path) -> None:
    from ingest.media.dicom import convert_frame, series_range

    def unwindowed(values: np.ndarray, name: str, **attrs: Any) -> Path:
        ds = pydicom.dcmread(_file("CT_small.dcm"))  # signed 16-bit, 128 x 128
        for tag in ("WindowCenter", "WindowWidth"):
            if tag in ds:
                delattr(ds, tag)
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.resize(values.astype(np.int16), (128, 128)).tobytes()
        for k, v in attrs.items():
            setattr(ds, k, v)
            ds[k].VR = "SS"  # PixelRepresentation 1: the ambiguous US/SS is SS
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    # Padding (the air outside the scan) does not take the black end of the range.
    padded = unwindowed(np.array([-2000, 0, 50, 100]), "pad.dcm", PixelPaddingValue=-2000)
    got = np.frombuffer(convert_frame(str(padded), 0, False), np.uint8)
    assert list(got[:4]) == [0, 0, 128, 255]
    # Two slices of one series: the same stored value gives the same grey in both.
    a = unwindowed(
        np.array([0, 100]), "a.dcm", SmallestImagePixelValue=0, LargestImagePixelValue=100
    )
    b = unwindowed(
        np.array([0, 200]), "b.dcm", SmallestImagePixelValue=0, LargestImagePixelValue=200
    )
    headers = [read_header(str(a)), read_header(str(b))]
    rng = series_range(headers)
    assert rng == (0.0, 200.0)
    ga = np.frombuffer(convert_frame(str(a), 0, False, rng), np.uint8)
    gb = np.frombuffer(convert_frame(str(b), 0, False, rng), np.uint8)
    assert ga[0] == gb[0] == 0
    assert ga[1] == 128 and gb[1] == 255  # 100 of 0..200 is mid-grey in both slices
    assert series_range([headers[0], replace(headers[1], stored_range=None)]) is None


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """True once ``pid`` has exited (a zombie counts: it runs no more), within the timeout."""
    import psutil  # type: ignore[import-untyped]

    try:
        proc = psutil.Process(pid)
        proc.wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    return True


@pytest.mark.e2e  # real worker processes
@pytest.mark.timeout(60)
async def test_a_decoder_job_past_its_time_limit_fails_and_its_worker_is_killed() -> None:
    import time

    from ingest.media.thumbnail import ThumbnailPool

    async with ThumbnailPool(workers=1, max_pending=2) as pool:
        assert await pool.call(abs, -1) == 1  # the worker is up
        (pid,) = pool.worker_pids()
        hung = asyncio.ensure_future(pool.call_within(0.5, time.sleep, 60))
        queued = asyncio.ensure_future(pool.call(abs, -3))  # behind it, on the same worker
        with pytest.raises(MediaError, match=r"time limit: decoding took longer than 0\.5 s"):
            await hung
        assert await queued == 3  # retried alone in the quarantine worker
        gone = await asyncio.to_thread(_wait_gone, pid, 10.0)
        assert gone, "the timed-out job's worker is still running"
        assert await pool.call(abs, -2) == 2  # a new worker took over
        assert pid not in pool.worker_pids()


@pytest.mark.e2e  # real decoder processes
@pytest.mark.timeout(60)
async def test_every_dicom_decoder_job_runs_under_the_decode_limit(tmp_path: Path) -> None:
    from ingest.media.convert import DicomConverter
    from ingest.media.thumbnail import ThumbnailPool
    from ingest.media.video import VideoOptions

    body = _slice(10, 1, 0.0)
    bucket, objs = _series_bucket(tmp_path, {"one/a.dcm": body, "s/a.dcm": body, "s/b.dcm": body})
    async with ThumbnailPool(workers=1) as pool:
        conv = DicomConverter(
            pool,
            None,
            bucket,
            bucket,
            prefix="art",
            storage_name="ro",
            video_options=VideoOptions(),
            fps=10.0,
            ignore_layout=False,
            temp_dir=tmp_path,
            decode_limit_s=1e-4,  # less than any trip to a worker process
        )
        for slot_objs in ((objs[0],), (objs[1], objs[2])):
            with pytest.raises(MediaError, match="time limit: decoding took longer") as e:
                await conv.convert(Slot("0", ItemType.DICOM, slot_objs, "a.dcm"))
            assert not e.value.final  # transient: retried later
