"""The ledger's storage codec: items and media facts round-trip; legacy (schema <= 4) rows and
media-cache values decode to the typed model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.ledger import codec
from ingest.model import (
    Facts,
    ImageFacts,
    Item,
    ItemType,
    Media,
    ObjectInfo,
    Rendition,
    Slot,
    UploadFacts,
    VideoFacts,
)
from tests.support.samples import legacy_video_slot, video_facts

ints = st.integers(min_value=0, max_value=2**53)
floats = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=30)

objects = st.builds(ObjectInfo, key=text, size=ints, etag=text, last_modified=text)
renditions = st.builds(Rendition, index=text, bitrate=floats)
facts: st.SearchStrategy[Facts] = st.one_of(
    st.builds(ImageFacts, width=ints, height=ints, thumbnail_key=text),
    st.builds(UploadFacts, storage_key=text),
    st.builds(
        VideoFacts,
        storage_key=text,
        width=ints,
        height=ints,
        native_fps=floats,
        visible_frames=ints,
        total_frames=ints,
        high=renditions,
        low=renditions,
        sections_prefix=text,
        sections_extension=text,
        frames_manifest_key=text,
        thumbnail_key=text,
        size_bytes=ints,
        low_sections_prefix=text,
        audio_peaks_key=text,
    ),
)
slots = st.builds(
    Slot,
    name=text,
    type=st.sampled_from(ItemType),
    objects=st.lists(objects, min_size=1, max_size=4).map(tuple),
    file_name=text,
    fps=st.one_of(st.none(), ints, floats, text),
    extract_views=st.booleans(),
    facts=st.lists(facts, max_size=3).map(tuple),
)
items = st.builds(
    Item,
    path=text,
    name=text,
    slots=st.lists(slots, min_size=1, max_size=4).map(tuple),
    compact=st.booleans(),
    media=st.sampled_from(Media),
    readonly_endpoint=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(items)
def test_items_round_trip(item: Item) -> None:
    data = codec.item_to_bytes(item)
    assert codec.is_current(data)
    back = codec.item_from_bytes(data)
    assert back == item
    for a, b in zip(back.slots, item.slots, strict=True):
        assert type(a.fps) is type(b.fps)  # 25 stays an int, "native" a string


@settings(max_examples=300, deadline=None)
@given(facts)
def test_facts_round_trip(f: Facts) -> None:
    assert codec.facts_from_bytes(codec.facts_to_bytes(f)) == f


def test_unreadable_bytes_raise_codec_error() -> None:
    for junk in (b"", b"[1]", b'{"v": 2}', b'{"v":2,"path":"/","name":"x","slots":[{}]}'):
        with pytest.raises(codec.CodecError):
            codec.item_from_bytes(junk)
    for junk in (b"", b"1", b'{"a": 1}', b'{"v": 2, "t": "pdf"}'):
        with pytest.raises(codec.CodecError):
            codec.facts_from_bytes(junk)


# --- legacy rows ---------------------------------------------------------------------------------

TABLE = {
    "a/1.jpg": ObjectInfo("a/1.jpg", 11, "e-1", "2024-01-01T00:00:00Z"),
    "a/c.mp4": ObjectInfo("a/c.mp4", 5000, "e-v", "2024-01-02T00:00:00Z"),
    "s/1.dcm": ObjectInfo("s/1.dcm", 1, "d1"),
    "s/2.dcm": ObjectInfo("s/2.dcm", 2, "d2"),
    "s/3.dcm": ObjectInfo("s/3.dcm", 3, "d3"),
    "s/a.jpg": ObjectInfo("s/a.jpg", 4, "da"),
    "r/1.jpg": ObjectInfo("r/1.jpg", 6, "l1"),
}

VIDEO_FACTS = video_facts("a/c.mp4", peaks=False, preview=True)
VIDEO_SLOT = legacy_video_slot(VIDEO_FACTS)
THUMB = {"storage_thumbnail_key": "thumbs/a/1.jpg", "height": 300, "width": 400}


def legacy(
    payload: Mapping[str, object],
    keys: list[str],
    media: str = "",
    readonly: bool = False,
    path: str = "/a",
    name: str = "1.jpg",
) -> Item:
    data = orjson.dumps(payload)
    assert not codec.is_current(data)
    return codec.item_from_legacy(path, name, data, orjson.dumps(keys), media, readonly, TABLE)


def image_slot(key: str, *facts: Facts, name: str = "0", file_name: str = "1.jpg") -> Slot:
    return Slot(
        name, ItemType.IMAGE, (TABLE.get(key) or ObjectInfo(key, 0),), file_name, facts=facts
    )


def test_legacy_single_slot_shorthand() -> None:
    wire = {"path": "/a", "type": "image", "storage_key": "a/1.jpg", "name": "1.jpg"}
    assert legacy(wire, ["a/1.jpg"]) == Item("/a", "1.jpg", (image_slot("a/1.jpg"),), True)
    # Azure: the storage key has the container in front; still the listed object.
    wire["storage_key"] = "container/a/1.jpg"
    assert legacy(wire, ["a/1.jpg"]) == Item("/a", "1.jpg", (image_slot("a/1.jpg"),), True)
    # Server-side video with its fps.
    video = {"path": "/a", "type": "video", "storage_key": "a/c.mp4", "name": "c.mp4", "fps": 25}
    item = legacy(video, ["a/c.mp4"], name="c.mp4")
    assert item.slots == (Slot("0", ItemType.VIDEO, (TABLE["a/c.mp4"],), "c.mp4", fps=25),)
    assert item.compact


def test_legacy_read_only_image_with_its_thumbnail() -> None:
    wire = {"path": "/a", "type": "image", "storage_key": "a/1.jpg", "name": "1.jpg", **THUMB}
    item = legacy(wire, ["a/1.jpg"], readonly=True)
    assert item == Item(
        "/a",
        "1.jpg",
        (image_slot("a/1.jpg", ImageFacts(400, 300, "thumbs/a/1.jpg")),),
        compact=True,
        readonly_endpoint=True,
    )
    # Media work not done yet: the facts are not trusted (there are none anyway).
    wire = {"path": "/a", "type": "image", "storage_key": "a/1.jpg", "name": "1.jpg"}
    item = legacy(wire, ["a/1.jpg"], media="image", readonly=True)
    assert item.media is Media.IMAGE and item.slots[0].facts == ()


def test_legacy_slots_with_a_dicom_series_become_one_slot() -> None:
    def dcm(n: int) -> dict[str, object]:
        slot: dict[str, object] = {
            "slot_name": "0",
            "type": "dicom",
            "storage_key": f"s/{n}.dcm",
            "file_name": f"{n}.dcm",
        }
        if n == 1:
            slot["extract_views"] = "true"
        return slot

    image = {"slot_name": "a.jpg", "type": "image", "storage_key": "s/a.jpg", "file_name": "a.jpg"}
    wire = {"path": "/", "name": "s", "slots": [dcm(1), dcm(2), dcm(3), image]}
    keys = ["s/1.dcm", "s/2.dcm", "s/3.dcm", "s/a.jpg"]
    item = legacy(wire, keys, path="/", name="s")
    assert item == Item(
        "/",
        "s",
        (
            Slot(
                "0",
                ItemType.DICOM,
                (TABLE["s/1.dcm"], TABLE["s/2.dcm"], TABLE["s/3.dcm"]),
                "1.dcm",
                extract_views=True,
            ),
            Slot("a.jpg", ItemType.IMAGE, (TABLE["s/a.jpg"],), "a.jpg"),
        ),
    )
    assert item.keys == tuple(keys)


def test_legacy_processed_video_slot() -> None:
    wire = {"path": "/a", "name": "c.mp4", "slots": [VIDEO_SLOT]}
    item = legacy(wire, ["a/c.mp4"], readonly=True, name="c.mp4")
    assert item.slots == (
        Slot("c.mp4", ItemType.VIDEO, (TABLE["a/c.mp4"],), "c.mp4", facts=(VIDEO_FACTS,)),
    )
    assert not item.compact and item.readonly_endpoint and item.media is Media.NONE
    # Still to be cut (the planner's placeholder slot): no facts, media kept.
    placeholder = {k: VIDEO_SLOT[k] for k in ("slot_name", "file_name", "type", "storage_key")}
    item = legacy({"path": "/a", "name": "c.mp4", "slots": [placeholder]}, ["a/c.mp4"], "video")
    assert item.media is Media.VIDEO and item.slots[0].facts == ()


def test_legacy_uploaded_local_files() -> None:
    uploaded = "ingest-artifacts/files/0123456789abcdef0123456789abcdef/1.jpg"
    wire = {"path": "/", "type": "image", "storage_key": uploaded, "name": "1.jpg"}
    assert legacy(wire, ["1.jpg"], path="/") == Item(
        "/", "1.jpg", (image_slot("1.jpg", UploadFacts(uploaded)),), compact=True
    )
    # A read-only local image: uploaded AND thumbnailed, two facts for one object. It comes
    # back as media work to do again (the media cache makes that cheap).
    item = legacy({**wire, **THUMB}, ["1.jpg"], path="/", readonly=True)
    assert item.media is Media.UPLOAD
    assert item.slots == (image_slot("1.jpg"),)


def test_legacy_object_missing_from_the_table_and_bad_rows() -> None:
    wire = {"path": "/a", "type": "image", "storage_key": "x/gone.jpg", "name": "gone.jpg"}
    item = legacy(wire, ["x/gone.jpg"], name="gone.jpg")
    assert item.slots[0].objects == (ObjectInfo("x/gone.jpg", 0),)
    with pytest.raises(codec.CodecError, match="2 slots for 1 keys"):
        legacy({"path": "/", "name": "f", "slots": [VIDEO_SLOT, VIDEO_SLOT]}, ["a/c.mp4"])
    with pytest.raises(codec.CodecError):
        legacy({"path": "/", "name": "f", "slots": [{"slot_name": "0"}]}, ["a/c.mp4"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (THUMB, ImageFacts(400, 300, "thumbs/a/1.jpg")),
        ("container/ingest/files/abc/1.jpg", UploadFacts("container/ingest/files/abc/1.jpg")),
        (VIDEO_SLOT, VIDEO_FACTS),
        (
            {**VIDEO_SLOT, "storage_audio_peaks_key": "art/peaks.gz"},
            replace(VIDEO_FACTS, audio_peaks_key="art/peaks.gz"),
        ),
    ],
    ids=["thumbnail", "upload", "video", "video-audio"],
)
def test_legacy_media_cache_values(value: object, expected: Facts) -> None:
    assert codec.facts_from_bytes(orjson.dumps(value)) == expected
