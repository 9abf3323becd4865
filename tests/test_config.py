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
    assert default.video_split_encoders is False
    m = config.load(None, ["media.video_x264_preset=veryfast", "media.video_split_encoders=true"])
    assert (m.media.video_x264_preset, m.media.video_split_encoders) == ("veryfast", True)
    with pytest.raises(ConfigError, match=r"video_x264_preset must be one of .*got 'quick'"):
        config.load(None, ["media.video_x264_preset=quick"])
    with pytest.raises(ConfigError, match=re.escape("compression_level = 10: must be <= 9")):
        config.load(None, ["media.video_png_compression_level=10"])


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


# --- secrets never in messages ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "v7.base_url=user:s3cret@v7.example",
        "source.endpoint_url=minio:s3cret@host:9000",
        "source.endpoint_url=ftp://minio:s3cret@host:9000",
        "upload.account_url=ftp://u:s3cret@acct.blob.core.windows.net",
    ],
)
def test_a_url_refused_is_shown_without_its_password(override: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert "must start with http:// or https://" in str(e.value)
    assert "s3cret" not in str(e.value) and "[REDACTED]@" in str(e.value)


def test_darwin_base_url_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARWIN_BASE_URL", "me:s3cret@darwin.example")
    with pytest.raises(ConfigError, match=r"\$DARWIN_BASE_URL") as e:
        config.load(None, [])
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize(
    "value",
    [
        "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=S3CRETKEY==;",
        "AccountKey S3CRETKEY",
        "1S3CRETKEY",
        "",
    ],
)
def test_connection_string_env_takes_only_a_variable_name_and_never_echoes(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(None, [f"source.connection_string_env={value}"])
    assert "source.connection_string_env must be the name of an environment variable" in str(
        e.value
    )
    assert "S3CRETKEY" not in str(e.value)
    assert config.load(
        None, ["source.connection_string_env=MY_CONN_2"]
    ).source.connection_string_env


def test_without_userinfo_and_redact() -> None:
    from ingest.log import redact, without_userinfo

    assert without_userinfo("https://u:p@h:9/x?y") == "https://[REDACTED]@h:9/x?y"
    assert without_userinfo("u:p@h:9") == "[REDACTED]@h:9"
    assert without_userinfo("http://h:9/a@b") == "http://h:9/a@b"  # an @ in the path stays
    assert without_userinfo("s3.example:9000") == "s3.example:9000"
    assert redact("cannot reach http://k:s3cret@h/ or https://x@y") == (
        "cannot reach http://[REDACTED]@h/ or https://[REDACTED]@y"
    )


def test_s3_errors_never_carry_the_endpoint_password() -> None:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    from ingest.providers.aws.s3 import S3Source

    url = "http://minio:s3cret@127.0.0.1:9/"
    source = S3Source(config.SourceConfig(bucket="b", endpoint_url=url))
    for e in (ConnectTimeoutError(endpoint_url=url), EndpointConnectionError(endpoint_url=url)):
        text = str(source._map(e, "list"))
        assert "s3cret" not in text and "127.0.0.1:9" in text


@pytest.mark.parametrize("override", ["source.include=[*.jpg]", "upload.exclude=[*.tmp, *.bak]"])
def test_a_list_the_shell_took_the_quotes_from_is_refused(override: str) -> None:
    """``--set source.include=["*.jpg"]`` unquoted by the shell arrives as ``[*.jpg]``: one
    pattern, a character class, matching one-letter keys. Refused, showing quoting that works."""
    where = override.partition("=")[0]
    with pytest.raises(ConfigError, match=r"is not a TOML list") as e:
        config.load(None, [override])
    assert f"""--set '{where}=["*.jpg", "*.png"]'""" in str(e.value)
    assert config.load(None, ['source.include=["*.jpg"]']).source.include == ["*.jpg"]
    assert config.load(None, ["source.include=*.jpg,*.png"]).source.include == ["*.jpg", "*.png"]
    assert config.load(None, ["source.prefix=[x"]).source.prefix == "[x"  # a string stays as typed


def _load_text(tmp_path: Path, body: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    return str(e.value)


def test_an_unknown_field_is_reported_before_other_errors(tmp_path: Path) -> None:
    got = _load_text(tmp_path, '[batch]\nmax_bytes = "y"\nmax_itmes = 5\n')
    assert "unknown field batch.max_itmes (did you mean `max_items`?)" in got


def test_a_field_above_every_section_names_its_section(tmp_path: Path) -> None:
    got = _load_text(tmp_path, 'dataset = "x"\n[v7]\nstorage = "s"\n')
    assert "top-level key 'dataset' must be a [section] (did you mean `[v7] dataset`?)" in got
    got = _load_text(tmp_path, "nothing_like_it = 1\n")
    assert "top-level key 'nothing_like_it' must be a [section]" in got and "mean" not in got
