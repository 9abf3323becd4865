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


def test_a_local_source_needs_an_upload_bucket() -> None:
    cfg = config.load(
        None, ["source.provider=local", "source.bucket=/tmp", "v7.dataset=d", "v7.storage=s"]
    )
    cfg.api_key = "k"
    with pytest.raises(ConfigError, match=r"needs \[upload\] bucket"):
        config.require_for_run(cfg)


def test_set_values_are_toml_values_and_strings_stay_as_typed() -> None:
    cfg = config.load(
        None,
        [
            'source.include=["*.jpg", "*.png"]',
            "source.exclude=*.tmp,*.part",
            "source.prefix=2024",  # a string field takes the text as typed
            "batch.max_items=25",
            "output.progress=false",
            "plan.fps=30",
        ],
    )
    assert cfg.source.include == ["*.jpg", "*.png"]
    assert cfg.source.exclude == ["*.tmp", "*.part"]
    assert cfg.source.prefix == "2024" and cfg.batch.max_items == 25
    assert cfg.output.progress is False and cfg.plan.fps == "30"


def test_a_float_field_takes_an_integer_but_nothing_is_converted_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[rate]\nrequests_per_s = 5\n[plan]\nfps = 12.5\n", encoding="utf-8")
    cfg = config.load(path)
    assert cfg.rate.requests_per_s == 5.0 and cfg.plan.fps == "12.5"
    for bad in ("rate.adaptive=1", "batch.max_items=true", 'ledger.lease_ttl_s="60"'):
        with pytest.raises(ConfigError):
            config.load(None, [bad])


def test_assignment_in_code_is_checked_and_errors_are_one_line() -> None:
    cfg = config.Config()
    with pytest.raises(ValueError):
        cfg.batch.max_items = 10.7  # type: ignore[assignment]
    with pytest.raises(ConfigError) as e:
        config.load(None, ["batch.max_items=1.5", "rate.burst=0"])
    assert "\n" not in str(e.value)


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="min_requests_per_s"):
        config.load(None, ["rate.requests_per_s=1", "rate.min_requests_per_s=2"])
    with pytest.raises(ConfigError, match=r"plan.fps"):
        config.load(None, ["plan.fps=fast"])
