"""The example configs under config/ load, and together document every field."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from ingest import config
from ingest.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLES = sorted(CONFIG_DIR.rglob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.v7.dataset and cfg.v7.storage


def test_every_field_is_documented_in_some_example() -> None:
    seen: set[str] = set()
    for path in EXAMPLES:
        for section, values in tomllib.loads(path.read_text(encoding="utf-8")).items():
            seen.update(f"{section}.{name}" for name in values)
    missing = []
    for section in config.SECTIONS:
        cls = type(getattr(config.Config(), section))
        for f in dataclasses.fields(cls):
            where = f"{section}.{f.name}"
            # [upload] has the fields of [source]: documented there.
            if where not in seen and not (section == "upload" and f"source.{f.name}" in seen):
                missing.append(where)
    assert not missing, f"fields no example config documents: {missing}"


def test_overrides_are_typed_and_unknown_fields_named(tmp_path: Path) -> None:
    cfg = config.load(None, ["rate.requests_per_s=2.5", "media.extract_preview_frames=false"])
    assert cfg.rate.requests_per_s == 2.5 and cfg.media.extract_preview_frames is False
    with pytest.raises(ConfigError, match=re.escape("unknown field media.nope")):
        config.load(None, ["media.nope=1"])
    with pytest.raises(ConfigError, match="primary_frames_quality"):
        config.load(None, ["media.primary_frames_quality=40"])


def test_video_speed_knobs_are_validated() -> None:
    default = config.load(None, []).media
    assert (default.video_x264_preset, default.video_png_compression_level) == ("medium", 1)
    assert default.video_split_encoders is True
    m = config.load(None, ["media.video_x264_preset=veryfast", "media.video_split_encoders=false"])
    assert (m.media.video_x264_preset, m.media.video_split_encoders) == ("veryfast", False)
    with pytest.raises(ConfigError, match=r"video_x264_preset must be one of .*got 'quick'"):
        config.load(None, ["media.video_x264_preset=quick"])
    with pytest.raises(ConfigError, match=re.escape("video_png_compression_level must be 0..9")):
        config.load(None, ["media.video_png_compression_level=10"])


def test_a_local_source_needs_an_upload_bucket() -> None:
    cfg = config.load(
        None, ["source.provider=local", "source.bucket=/tmp", "v7.dataset=d", "v7.storage=s"]
    )
    cfg.api_key = "k"
    with pytest.raises(ConfigError, match=r"needs \[upload\] bucket"):
        config.require_for_run(cfg)
