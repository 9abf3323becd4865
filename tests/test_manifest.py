"""Multi-slot items from a user's manifest (CSV / JSONL): parsing, planning, end to end."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from ingest.config import PlanConfig
from ingest.errors import ConfigError
from ingest.manifest import read_manifest
from ingest.model import Media, ObjectInfo
from ingest.planner import ShardPlanner, plan_manifest_item
from ingest.registrar import wire
from tests.conftest import seed_bucket
from tests.support.e2e import DATASET, Emulator, job_config, run_cli


def test_csv_and_jsonl_give_the_same_rows(tmp_path: Path) -> None:
    csv_file = tmp_path / "m.csv"
    csv_file.write_text(
        "item_name,slot_name,key,path\ncar,front,a/front.jpg,/cars\ncar,back,a/back.jpg,/cars\n"
        "solo,0,b/x y é.png,\n",
        encoding="utf-8",
    )
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(
        b'{"item_name": "car", "slot_name": "front", "key": "a/front.jpg", "path": "/cars"}\n'
        b'{"item_name": "car", "slot_name": "back", "key": "a/back.jpg", "path": "/cars"}\n'
        b"\n" + orjson.dumps({"item_name": "solo", "slot_name": "0", "key": "b/x y é.png"}) + b"\n"
    )
    expected = [
        ("car", "front", "a/front.jpg", "/cars"),
        ("car", "back", "a/back.jpg", "/cars"),
        ("solo", "0", "b/x y é.png", ""),
    ]
    assert list(read_manifest(csv_file)) == expected
    assert list(read_manifest(jsonl)) == expected


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.csv", "item,slot,key\nx,0,a.jpg\n", "header must name"),
        ("m.csv", "item_name,slot_name,key\nx,,a.jpg\n", r"m\.csv:2: slot_name is empty"),
        ("m.csv", "item_name,slot_name,key\nx,0,/a.jpg\n", "must not start with '/'"),
        ("m.jsonl", '{"item_name": "x", "slot_name": "0"', r"m\.jsonl:1: not valid JSON"),
        ("m.jsonl", '["x", "0", "a.jpg"]\n', "must be a JSON object"),
        ("m.jsonl", '{"item_name": "x", "slot_name": 0, "key": "a"}\n', "must be a string"),
    ],
)
def test_a_bad_manifest_names_file_and_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        list(read_manifest(f))


def test_a_missing_manifest_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        list(read_manifest(tmp_path / "nope.csv"))


def _planner(readonly: bool = False) -> ShardPlanner:
    return ShardPlanner(
        PlanConfig(root_path="/root", slots="manifest"), readonly=readonly
    )


def test_manifest_item_payload_and_problems() -> None:
    front = ObjectInfo("a/front.jpg", 10)
    clip = ObjectInfo("a/clip.mp4", 10)
    plan, problem = plan_manifest_item(
        _planner(), "car", "cars", [("front", front, front.key), ("video", clip, clip.key)]
    )
    assert problem == ""
    assert wire.item_json(plan, wire.KeyMap()) == {
        "path": "/root/cars",
        "name": "car",
        "slots": [
            {
                "slot_name": "front",
                "type": "image",
                "storage_key": "a/front.jpg",
                "file_name": "front.jpg",
            },
            {
                "slot_name": "video",
                "type": "video",
                "storage_key": "a/clip.mp4",
                "file_name": "clip.mp4",
                "fps": "native",
            },
        ],
    }
    assert plan.keys == ("a/front.jpg", "a/clip.mp4")
    assert plan.media is Media.NONE and not plan.readonly_endpoint

    _plan, problem = plan_manifest_item(
        _planner(),
        "car",
        "",
        [("0", None, "gone.jpg"), ("0", front, front.key), ("1", ObjectInfo("n.txt", 3), "n.txt")],
    )
    assert "gone.jpg: not in the bucket listing" in problem
    assert "slot name '0' used twice" in problem
    assert "n.txt: unsupported file type '.txt'" in problem


def test_read_only_manifest_items_need_thumbnails_and_the_readonly_endpoint() -> None:
    img = ObjectInfo("a/front.jpg", 10)
    plan, problem = plan_manifest_item(_planner(readonly=True), "car", "", [("0", img, img.key)])
    assert problem == ""
    assert plan.media is Media.IMAGE and plan.readonly_endpoint


def test_manifest_run_end_to_end(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator
) -> None:
    keys = ["cars/1/front.jpg", "cars/1/back.jpg", "cars/2/front.jpg", "other/stray.jpg"]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "item_name,slot_name,key,path\n"
        "car-1,front,cars/1/front.jpg,fleet\n"
        "car-1,back,cars/1/back.jpg,fleet\n"
        "car-2,front,cars/2/front.jpg,fleet\n"
        "car-2,back,cars/2/missing.jpg,fleet\n",
        encoding="utf-8",
    )
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket_name,
        storage,
        extra=f'[plan]\nslots = "manifest"\nmanifest = "{manifest}"\n',
    )
    planned = run_cli("plan", "--config", str(cfg), "--output", "-")
    assert planned.returncode == 0, planned.stderr
    lines = [orjson.loads(line) for line in planned.stdout.splitlines()]
    assert [[i["name"] for i in line["body"]["items"]] for line in lines] == [["car-1"]]
    assert lines[0]["endpoint"].endswith("/items/register_existing")
    assert emulator.counters()["register_requests"] == 0  # a dry run sends nothing

    first = run_cli("run", "--config", str(cfg))
    assert first.returncode == 3, first.stderr  # car-2 cannot be registered
    items = emulator.items(DATASET)
    assert [(i["path"], i["name"]) for i in items] == [("/fleet", "car-1")]
    assert [s["slot_name"] for s in items[0]["slots"]] == ["front", "back"]

    report = run_cli("report", "--config", str(cfg), "--format", "jsonl")
    rows = {r["key"]: r for r in map(orjson.loads, report.stdout.splitlines())}
    assert rows["cars/1/back.jpg"]["state"] == "REGISTERED"
    assert rows["cars/2/front.jpg"]["state"] == "FAILED"
    assert "cars/2/missing.jpg: not in the bucket listing" in rows["cars/2/front.jpg"]["reason"]
    assert rows["other/stray.jpg"]["state"] == "SKIPPED"

    requests = emulator.counters()["register_requests"]
    again = run_cli("run", "--config", str(cfg))
    assert again.returncode in (0, 3), again.stderr
    assert emulator.counters()["register_requests"] == requests  # nothing re-sent
