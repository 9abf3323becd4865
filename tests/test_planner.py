"""Planner conformance (v7-contract.md "Items"): pure, fast, exhaustive.

The planner emits typed ``Item``s; what V7 receives is their wire JSON (``wire.item_json``), so
the expected payloads below are checked through it: the same JSON as when the planner built it.

Read-only planning is deliberately not tested here (being reworked for media processing).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import Config, PlanConfig
from ingest.model import Item, ObjectInfo, Skip
from ingest.planner import (
    ShardPlanner,
    collision,
    file_type,
    make_shard_planner,
    request_options,
)
from ingest.registrar import wire

IMAGE_EXTS = [
    "png",
    "jpeg",
    "jpg",
    "jfif",
    "jpe",
    "tif",
    "tiff",
    "bmp",
    "svs",
    "webp",
    "ndpi",
    "rvg",
    "qoi",
]
VIDEO_EXTS = ["avi", "bpm", "mov", "mp4", "mkv", "hevc", "m4v"]


def obj(key: str, size: int = 100) -> ObjectInfo:
    return ObjectInfo(key, size, etag=f"etag-{len(key)}")


def planner(strip: str = "", **plan: Any) -> ShardPlanner:
    return ShardPlanner(PlanConfig(**plan), strip=strip)


def plan_all(
    keys: Iterable[str | ObjectInfo],
    pages: Sequence[int] | None = None,
    strip: str = "",
    **plan: Any,
) -> list[Item | Skip]:
    """Feed ``keys`` (sorted) page by page (``pages`` = page sizes; None = one page)."""
    objs = [k if isinstance(k, ObjectInfo) else obj(k) for k in keys]
    objs.sort(key=lambda o: o.key)
    p = planner(strip, **plan)
    out: list[Item | Skip] = []
    i = 0
    for n in pages or [len(objs)]:
        out += p.feed(objs[i : i + n])
        i += n
    out += p.feed(objs[i:])
    out += p.finish()
    assert not p.holding
    return out


def items(out: Iterable[Item | Skip]) -> list[Item]:
    return [p for p in out if isinstance(p, Item)]


def skips(out: Iterable[Item | Skip]) -> dict[str, str]:
    return {p.obj.key: p.reason for p in out if isinstance(p, Skip)}


def payload(it: Item, keys: wire.KeyMap | None = None) -> dict[str, Any]:
    """The item's register_existing JSON (S3 / GCS: storage key = provider key)."""
    return wire.item_json(it, keys or wire.KeyMap())


def only_item(out: list[Item | Skip]) -> Item:
    its = items(out)
    assert len(its) == 1 and not skips(out), out
    return its[0]


# --- single slot ----------------------------------------------------------------------------


def test_single_slot_image_payload_is_exactly_the_shorthand() -> None:
    it = only_item(plan_all(["car_folder/car_1.png"]))
    assert payload(it) == {
        "path": "/car_folder",
        "type": "image",
        "storage_key": "car_folder/car_1.png",
        "name": "car_1.png",
    }
    assert list(payload(it)) == ["path", "type", "storage_key", "name"]
    assert (it.path, it.name, it.keys) == ("/car_folder", "car_1.png", ("car_folder/car_1.png",))
    assert it.compact and it.slots[0].obj == obj("car_folder/car_1.png")
    assert wire.approx_bytes(it) >= len(orjson.dumps(payload(it)))


def test_storage_key_comes_from_the_source_key_map() -> None:
    # Items hold provider keys; the storage prefix (Azure: the container) is added at the wire.
    (it,) = ShardPlanner(PlanConfig()).feed([obj("a/b.jpg")])
    assert isinstance(it, Item)
    assert it.keys == ("a/b.jpg",)
    assert payload(it, wire.KeyMap("container/"))["storage_key"] == "container/a/b.jpg"
    assert it.name == "b.jpg"
    (series,) = items(plan_all(["s/1.dcm", "s/2.dcm"]))
    got = payload(series, wire.KeyMap("c/"))["slots"]
    assert [s["storage_key"] for s in got] == ["c/s/1.dcm", "c/s/2.dcm"]
    assert wire.approx_bytes(series) >= len(orjson.dumps(payload(series, wire.KeyMap("c/"))))


@pytest.mark.parametrize("ext", IMAGE_EXTS)
def test_every_image_extension_any_case(ext: str) -> None:
    for variant in (ext, ext.upper(), ext.capitalize()):
        it = only_item(plan_all([f"x/f.{variant}"]))
        assert payload(it)["type"] == "image"
        assert "fps" not in payload(it)


@pytest.mark.parametrize("ext", VIDEO_EXTS)
def test_every_video_extension_any_case_has_fps(ext: str) -> None:
    for variant in (ext, ext.upper()):
        it = only_item(plan_all([f"v/clip.{variant}"]))
        assert payload(it) == {
            "path": "/v",
            "type": "video",
            "storage_key": f"v/clip.{variant}",
            "name": f"clip.{variant}",
            "fps": "native",
        }


def test_pdf_and_single_dicom() -> None:
    assert payload(only_item(plan_all(["d/doc.PDF"])))["type"] == "pdf"
    it = only_item(plan_all(["d/scan.DCM"], dicom_series=False))
    assert payload(it) == {
        "path": "/d",
        "name": "scan.DCM",
        "slots": [
            {
                "slot_name": "0",
                "type": "dicom",
                "storage_key": "d/scan.DCM",
                "file_name": "scan.DCM",
            }
        ],
    }


@pytest.mark.parametrize(
    ("fps", "expected"),
    [("native", "native"), ("10", 10), ("0", 0), ("12.5", 12.5), ("30.0", 30), (24, 24)],
)
def test_video_fps_native_or_number_int_stays_int(fps: Any, expected: Any) -> None:
    it = only_item(plan_all(["a.mp4"], fps=fps))
    assert payload(it)["fps"] == expected
    assert type(payload(it)["fps"]) is type(expected)
    # In a multi-slot item the video slot carries it too; the image slot does not.
    grouped = only_item(plan_all(["f/a.mp4", "f/b.jpg"], fps=fps, slots="folder"))
    slots = {s["slot_name"]: s for s in payload(grouped)["slots"]}
    assert slots["a.mp4"]["fps"] == expected and type(slots["a.mp4"]["fps"]) is type(expected)
    assert "fps" not in slots["b.jpg"]


def test_file_type_covers_what_darwin_py_accepts_and_nothing_else() -> None:
    for ext in IMAGE_EXTS:
        assert file_type(f"k.{ext.upper()}") == "image"
    for ext in VIDEO_EXTS:
        assert file_type(f"k.{ext}") == "video"
    assert file_type("k.pdf") == "pdf"
    assert file_type("k.dcm") == "dicom"
    for bad in ("k.txt", "k.jpg.bak", "k", "dir.jpg/k", ".png", "k.", "k.mp3"):
        assert file_type(bad) is None, bad


# --- skips -------------------------------------------------------------------------------------


def test_unsupported_and_odd_objects_are_skipped_with_a_reason_never_raised() -> None:
    out = plan_all(
        [
            "a/notes.txt",
            "a/README",
            "a/",
            "a/sub/",
            obj("a/empty.jpg", 0),
            "/lead/slash.jpg",
            "a/archive.tar.gz",
            "a/.hidden",
        ],
        slots="folder",
    )
    assert items(out) == []
    reasons = skips(out)
    assert "'.txt'" in reasons["a/notes.txt"]
    assert reasons["a/README"] == "no file extension"
    assert reasons["a/.hidden"] == "no file extension"
    assert reasons["a/"] == reasons["a/sub/"] == "folder marker"
    assert "0 bytes" in reasons["a/empty.jpg"]
    assert "starts with '/'" in reasons["/lead/slash.jpg"]
    assert "'.gz'" in reasons["a/archive.tar.gz"]
    assert len(reasons) == 8


@pytest.mark.parametrize(
    "key",
    [
        "with space/a file.jpg",
        "ünïcødé/画像 ファイル.png",
        "odd/weird+%20name?.jpeg",
        "deep/" + "d" * 990 + ".jpg",
        "x" * 996 + ".mp4",
    ],
)
def test_odd_but_valid_keys_are_planned_verbatim(key: str) -> None:
    it = only_item(plan_all([key]))
    assert payload(it)["storage_key"] == key
    folder, _, name = key.rpartition("/")
    assert it.name == name and payload(it)["name"] == name
    assert it.path == ("/" + folder if folder else "/")


# --- paths, names, prefixes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "expected_path"),
    [
        ({}, "/set/1"),
        ({"root_path": "/data"}, "/data/set/1"),
        ({"root_path": "/data/"}, "/data/set/1"),
        ({"preserve_folders": False}, "/"),
        ({"preserve_folders": False, "root_path": "/data"}, "/data"),
        ({"strip": "set/"}, "/1"),
        ({"strip": "set/", "root_path": "/r"}, "/r/1"),
        ({"strip": "other/"}, "/set/1"),
        ({"strip": "set/1/"}, "/"),
    ],
)
def test_paths(opts: dict[str, Any], expected_path: str) -> None:
    it = only_item(plan_all(["set/1/img.jpg"], **opts))
    assert (it.path, it.name) == (expected_path, "img.jpg")
    assert payload(it)["path"] == expected_path
    assert payload(it)["storage_key"] == "set/1/img.jpg"  # stripping never touches the key


def test_strip_prefix_auto_is_the_source_prefix() -> None:
    cfg = Config()
    cfg.source.prefix = "set/"
    cfg.plan.strip_prefix = "auto"
    p = make_shard_planner(cfg, readonly=False)
    (it,) = p.feed([obj("set/1/img.jpg")])
    assert isinstance(it, Item)
    assert it.path == "/1"
    cfg.plan.strip_prefix = ""
    p = make_shard_planner(cfg, readonly=False)
    (it,) = p.feed([obj("set/1/img.jpg")])
    assert isinstance(it, Item)
    assert it.path == "/set/1"


def test_same_key_always_plans_to_the_same_path_and_name() -> None:
    key = "a/b/c.jpg"
    first = only_item(plan_all([key]))
    for others in (["a/a.jpg"], ["a/b/b.png", "a/b/d.mp4"], ["z.pdf", "a/b/c.jpgx"]):
        out = items(plan_all([key, *others]))
        mine = [i for i in out if key in i.keys]
        assert [(i.path, i.name, payload(i)) for i in mine] == [
            (first.path, first.name, payload(first))
        ]


# --- multi-slot by folder ------------------------------------------------------------------


def test_folder_slots_payload() -> None:
    it = only_item(plan_all(["car_folder/car_1.png", "car_folder/cars.mp4"], slots="folder"))
    assert payload(it) == {
        "path": "/",
        "name": "car_folder",
        "slots": [
            {
                "slot_name": "car_1.png",
                "type": "image",
                "storage_key": "car_folder/car_1.png",
                "file_name": "car_1.png",
            },
            {
                "slot_name": "cars.mp4",
                "type": "video",
                "storage_key": "car_folder/cars.mp4",
                "file_name": "cars.mp4",
                "fps": "native",
            },
        ],
    }
    assert it.keys == ("car_folder/car_1.png", "car_folder/cars.mp4")


def test_folder_slots_nested_folders_root_files_and_interleaving() -> None:
    out = plan_all(
        ["top.jpg", "a/1.jpg", "a/b/2.jpg", "a/b/3.jpg", "a/c.jpg", "a/d/4.jpg", "z/5.png"],
        slots="folder",
    )
    got = {(i.path, i.name): [s["storage_key"] for s in payload(i)["slots"]] for i in items(out)}
    assert got == {
        ("/", "root"): ["top.jpg"],
        ("/", "a"): ["a/1.jpg", "a/c.jpg"],  # a/b/… sorts between them: still one item
        ("/a", "b"): ["a/b/2.jpg", "a/b/3.jpg"],
        ("/a", "d"): ["a/d/4.jpg"],
        ("/", "z"): ["z/5.png"],
    }


def test_folder_slot_names_never_zero_and_unique_even_for_a_repeated_object() -> None:
    # A listing that repeats an object (e.g. a re-listed page) must not produce a duplicate
    # slot name, which V7 refuses.
    p = planner(slots="folder")
    out = p.feed([obj("f/a.jpg"), obj("f/a.jpg"), obj("f/b.jpg")]) + p.finish()
    (it,) = items(out)
    names = [s["slot_name"] for s in payload(it)["slots"]]
    assert len(set(names)) == len(names)
    assert "0" not in names
    assert names[0] == "a.jpg"


def test_folder_slots_with_preserve_folders_off_and_strip() -> None:
    it = only_item(plan_all(["s/x/y/1.jpg"], slots="folder", preserve_folders=False))
    assert (it.path, it.name) == ("/", "y")
    it = only_item(plan_all(["s/x/y/1.jpg"], slots="folder", strip="s/", root_path="/r"))
    assert (it.path, it.name) == ("/r/x", "y")


def test_folder_split_over_pages_is_one_item_and_holding_meanwhile() -> None:
    p = planner(slots="folder")
    assert p.feed([obj("f/1.jpg"), obj("f/2.jpg")]) == []
    assert p.holding
    assert p.feed([obj("f/3.jpg")]) == []
    assert p.holding
    out = p.feed([obj("g/1.jpg")])
    (it,) = items(out)
    assert it.name == "f" and it.keys == ("f/1.jpg", "f/2.jpg", "f/3.jpg")
    assert p.holding  # g/ is open now
    (last,) = items(p.finish())
    assert last.keys == ("g/1.jpg",)
    assert not p.holding


def test_single_slot_mode_never_holds() -> None:
    p = planner()
    out = p.feed([obj("f/1.jpg"), obj("f/2.jpg")])
    assert len(items(out)) == 2
    assert not p.holding


def test_max_slots_overflow_skips_the_whole_folder_only() -> None:
    keys = [f"big/{i}.jpg" for i in range(4)] + ["ok/1.jpg", "ok/2.jpg", "ok/3.jpg"]
    for pages in (None, [1, 1, 1, 1, 1, 1, 1], [3, 2]):
        out = plan_all(keys, pages=pages, slots="folder", max_slots=3)
        (it,) = items(out)
        assert it.name == "ok" and len(payload(it)["slots"]) == 3
        sk = skips(out)
        assert sorted(sk) == [f"big/{i}.jpg" for i in range(4)]
        assert all("more than 3" in r for r in sk.values())


# --- DICOM series --------------------------------------------------------------------------------


def test_dicom_series_payload_and_options() -> None:
    out = plan_all(["scan/p1/a.dcm", "scan/p1/b.DCM", "scan/p1/c.jpg", "scan/p2/x.dcm"])
    by = {(i.path, i.name): i for i in items(out)}
    assert set(by) == {("/scan", "p1"), ("/scan/p1", "c.jpg"), ("/scan", "p2")}
    assert payload(by[("/scan", "p1")]) == {
        "path": "/scan",
        "name": "p1",
        "slots": [
            {
                "slot_name": "0",
                "type": "dicom",
                "storage_key": "scan/p1/a.dcm",
                "file_name": "a.dcm",
            },
            {
                "slot_name": "0",
                "type": "dicom",
                "storage_key": "scan/p1/b.DCM",
                "file_name": "b.DCM",
            },
        ],
    }
    # Typed: one slot "0" holding the series' slices in listing order.
    (series,) = by[("/scan", "p1")].slots
    assert (series.name, series.type) == ("0", "dicom")
    assert [o.key for o in series.objects] == ["scan/p1/a.dcm", "scan/p1/b.DCM"]
    assert payload(by[("/scan/p1", "c.jpg")])["type"] == "image"
    assert request_options(PlanConfig()) is None
    assert request_options(PlanConfig(ignore_dicom_layout=True)) == {"ignore_dicom_layout": True}


def test_dicom_extract_views_only_on_slot_zero_and_only_when_enabled() -> None:
    keys = ["s/a.dcm", "s/b.dcm", "s/c.jpg", "s/d.mp4"]
    plain = items(plan_all(keys, slots="folder"))
    assert all("extract_views" not in s for i in plain for s in payload(i)["slots"])
    (it,) = items(plan_all(keys, slots="folder", extract_views=True))
    for s in payload(it)["slots"]:
        if s["slot_name"] == "0":
            assert s["type"] == "dicom" and s["extract_views"] == "true"
        else:
            assert "extract_views" not in s
    assert [s["slot_name"] for s in payload(it)["slots"]] == ["0", "0", "c.jpg", "d.mp4"]


def test_dicom_series_off_in_folder_mode_names_slots_by_file() -> None:
    (it,) = items(plan_all(["s/a.dcm", "s/b.dcm"], slots="folder", dicom_series=False))
    assert [s["slot_name"] for s in payload(it)["slots"]] == ["a.dcm", "b.dcm"]
    # Single-object mode without series: one item per slice.
    assert len(items(plan_all(["s/a.dcm", "s/b.dcm"], dicom_series=False))) == 2


def test_dicom_series_split_over_pages() -> None:
    p = planner()
    assert items(p.feed([obj("s/1.dcm"), obj("s/2.jpg")])) != []  # the jpg goes at once
    assert p.holding
    assert p.feed([obj("s/3.dcm")]) == []
    (series,) = items(p.finish())
    assert series.keys == ("s/1.dcm", "s/3.dcm")


# --- name collisions (the policy the ledger applies) ----------------------------------------


def test_collision_skips_only_the_objects_not_in_the_recorded_item() -> None:
    # preserve_folders = false: a/x.jpg and b/x.jpg both plan to ("/", "x.jpg").
    (first,) = items(plan_all(["a/x.jpg"], preserve_folders=False))
    (second,) = items(plan_all(["b/x.jpg"], preserve_folders=False))
    assert first.ident == second.ident == ("/", "x.jpg")
    (skip,) = collision(second, first.keys)
    assert skip.obj == obj("b/x.jpg")
    assert skip.reason.startswith("name collision: item '/x.jpg' already comes from 'a/x.jpg'")
    assert "plan.preserve_folders" in skip.reason and len(skip.reason) <= 300
    assert collision(first, first.keys) == []  # the same item planned again: no collision
    # A folder item that gained a file: only the new file is refused.
    (grown,) = items(plan_all(["f/1.jpg", "f/2.jpg"], slots="folder"))
    assert [s.obj.key for s in collision(grown, ("f/1.jpg",))] == ["f/2.jpg"]
    long = Item("/" + "d" * 400, "n", grown.slots)
    assert all(len(s.reason) == 300 for s in collision(long, ("k",)))


# --- properties ---------------------------------------------------------------------------------

SEGMENTS = ["a", "b", "c", "Ü", "s p"]
FILES = ["x.jpg", "y.PNG", "z.mp4", "s1.dcm", "s2.dcm", "d.pdf", "n.txt", "noext", "0.jpg"]

key_sets = st.sets(
    st.tuples(st.lists(st.sampled_from(SEGMENTS), max_size=3), st.sampled_from(FILES)).map(
        lambda t: "/".join([*t[0], t[1]])
    ),
    max_size=40,
)
options = st.fixed_dictionaries(
    {
        "slots": st.sampled_from(["none", "folder"]),
        "dicom_series": st.booleans(),
        "preserve_folders": st.just(True),
        "max_slots": st.integers(1, 6),
        "extract_views": st.booleans(),
        "root_path": st.sampled_from(["/", "/r"]),
    }
)


def _splits(n: int, data: st.DataObject) -> list[int]:
    sizes: list[int] = []
    left = n
    while left > 0:
        k = data.draw(st.integers(0, left))  # empty pages included
        sizes.append(k)
        left -= k
    return sizes


def _canon(out: list[Item | Skip]) -> list[Any]:
    return [
        ("item", p.path, p.name, payload(p), p.keys)
        if isinstance(p, Item)
        else ("skip", p.obj.key, p.reason)
        for p in out
    ]


@settings(max_examples=300, deadline=None)
@given(keys=key_sets, opts=options, data=st.data())
def test_property_each_key_once_and_page_splits_do_not_matter(
    keys: set[str], opts: dict[str, Any], data: st.DataObject
) -> None:
    ordered = sorted(keys)
    reference = plan_all(ordered, **opts)
    split = plan_all(ordered, pages=_splits(len(ordered), data), **opts)
    assert _canon(split) == _canon(reference)

    seen: Counter[str] = Counter()
    for p in reference:
        if isinstance(p, Skip):
            seen[p.obj.key] += 1
            continue
        seen.update(p.keys)
        # The batcher's byte estimate is an upper bound of what is sent.
        assert wire.approx_bytes(p) >= len(orjson.dumps(payload(p, wire.KeyMap("container/"))))
        slots = payload(p).get("slots")
        if slots:
            assert [s["storage_key"] for s in slots] == list(p.keys)
            non_dicom = [s["slot_name"] for s in slots if s["type"] != "dicom"]
            assert "0" not in non_dicom
            named = [s["slot_name"] for s in slots if s["slot_name"] != "0"]
            assert len(set(named)) == len(named)
            if any(s["slot_name"] == "0" for s in slots):
                assert all(s["type"] == "dicom" for s in slots if s["slot_name"] == "0")
        else:
            assert p.keys == (payload(p)["storage_key"],)
    assert seen == Counter(ordered)
    ids = [(p.path, p.name) for p in items(reference)]
    assert len(ids) == len(set(ids)), "two items share (path, name)"


@settings(max_examples=200, deadline=None)
@given(keys=key_sets, opts=options, data=st.data())
def test_property_identity_of_a_key_does_not_depend_on_its_neighbours(
    keys: set[str], opts: dict[str, Any], data: st.DataObject
) -> None:
    opts = {**opts, "max_slots": 1000}  # overflow legitimately depends on neighbours
    full = {k: (i.path, i.name) for i in items(plan_all(sorted(keys), **opts)) for k in i.keys}
    subset = data.draw(st.sets(st.sampled_from(sorted(keys)))) if keys else set()
    part = {k: (i.path, i.name) for i in items(plan_all(sorted(subset), **opts)) for k in i.keys}
    for k, ident in part.items():
        assert full[k] == ident


def test_property_alphabet_is_sane() -> None:
    # Guard for the strategies above: they must produce nested, grouped and skipped keys.
    assert any(c in string.ascii_letters for c in "".join(SEGMENTS))
    out = plan_all(["a/b/s1.dcm", "a/b/s2.dcm", "a/n.txt", "a/x.jpg"], slots="folder")
    assert len(items(out)) == 2 and len(skips(out)) == 1
