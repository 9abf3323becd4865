"""Configuration: a TOML file under ``config/`` plus CLI overrides; the API key only from the env.

Every field's unit is in its name (``_s`` seconds, ``_bytes``, ``per_s``). The sections are
pydantic dataclasses in strict mode: a value of the wrong type is refused, never converted
(``batch.max_items = 10.7`` is not 10, ``source.prefix = 5`` is not "5"; a float field takes
an integer, nothing else), NaN and infinities are refused, unknown fields are refused with the
nearest known name, and numeric fields carry their bounds. Validation happens once, up front,
and fails with a single ``ConfigError`` line that names the field and the fix — never
pydantic's multi-line dump. Checks across fields are small functions called by ``validate``.

``--set section.field=value``: the value is read as a TOML value (``5``, ``2.5``, ``true``,
``["*.jpg"]``, ``"text"``); a string field takes the text as typed (the command line is text:
``--prefix 2024`` is the prefix "2024"), and a list field also takes ``a,b`` (comma-separated)
but refuses ``[*.jpg]``: a TOML list the shell took the quotes from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from ingest.errors import ConfigError
from ingest.log import without_userinfo

DEFAULT_BASE_URL = "https://darwin.v7labs.com"
API_KEY_ENV = "DARWIN_API_KEY"
BASE_URL_ENV = "DARWIN_BASE_URL"
# V7's troubleshooting page: "500 or lower" items per register request (v7-contract.md).
V7_MAX_ITEMS_PER_REQUEST = 500

Provider = Literal["aws", "gcp", "azure", "local"]
Mode = Literal["auto", "readwrite", "readonly"]
SlotGrouping = Literal["none", "folder", "manifest"]

# strict: no type conversion; forbid: unknown fields refused; no NaN/inf; an assignment in
# code is checked like a value from the file.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_assignment=True)

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # an environment variable's name
# Fields whose value is never echoed in an error: a pasted connection string holds a key.
UNECHOED = frozenset({"connection_string_env"})

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]  # 0 has a documented meaning (derived / none)
Seconds = Annotated[float, Field(gt=0)]
SecondsOrZero = Annotated[float, Field(ge=0)]
PerSecond = Annotated[float, Field(gt=0)]


@dataclass(config=STRICT)
class V7Config:
    base_url: str = ""  # "" → $DARWIN_BASE_URL → https://darwin.v7labs.com
    team: str = ""  # "" → the key's selected team (users/token_info)
    dataset: str = ""  # dataset slug
    storage: str = ""  # storage configuration name (the request's storage_slug)
    mode: Mode = "auto"  # auto: follow the storage configuration's `readonly` flag
    connect_timeout_s: Seconds = 10.0
    request_timeout_s: Seconds = 60.0


@dataclass(config=STRICT)
class SourceConfig:
    provider: Provider = "aws"
    bucket: str = ""  # S3/GCS bucket; Azure: the container (account comes from credentials)
    prefix: str = ""  # list only keys under this prefix
    endpoint_url: str = ""  # S3-compatible / emulator endpoint
    region: str = "us-east-1"
    profile: str = ""  # AWS profile name ("" = default chain)
    # GCS service-account JSON key file; "" = GOOGLE_APPLICATION_CREDENTIALS, then workload
    # identity / the metadata server. Not read when endpoint_url (an emulator) is set.
    credentials_file: str = ""
    # Azure: https://<account>.blob.core.windows.net (used with $AZURE_STORAGE_KEY or, without
    # it, DefaultAzureCredential); ignored when the connection-string variable is set.
    account_url: str = ""
    # Azure: name of the env variable holding a connection string (the string holds a key, so
    # it never goes in the file itself).
    connection_string_env: Annotated[str, Field(pattern=ENV_NAME)] = (
        "AZURE_STORAGE_CONNECTION_STRING"
    )
    include: list[str] = field(default_factory=list)  # globs on the key; empty = everything
    exclude: list[str] = field(default_factory=list)
    page_size: Annotated[int, Field(ge=1, le=1000)] = 1000  # keys per listing page (S3 max 1000)
    list_concurrency: PositiveInt = 8  # sub-prefixes listed at once
    fanout_depth: Count = 1  # levels of delimiter discovery below `prefix`
    # Ceiling on storage requests per second to this bucket (listing, GET, PUT, SDK retries);
    # 0 = none. See ingest/providers/cap.py.
    max_requests_per_s: Annotated[float, Field(ge=0)] = 0.0


@dataclass(config=STRICT)
class PlanConfig:
    root_path: str = "/"  # dataset folder everything lands under
    preserve_folders: bool = True  # mirror the key's folders below root_path
    strip_prefix: str = (
        ""  # removed from the key before folders are derived; "auto" = source.prefix
    )
    slots: SlotGrouping = "none"  # none: one item per object; folder: one item per folder
    manifest: str = ""  # CSV/JSONL with item_name, slot_name, key (slots = "manifest")
    dicom_series: bool = True  # .dcm files of one folder become slices of one series (slot "0")
    ignore_dicom_layout: bool = False  # options.ignore_dicom_layout in the request
    extract_views: bool = False  # DICOM multi-planar view (extract_views: "true")
    fps: str = "native"  # videos: "native" or a number (as a string or number in TOML)
    max_slots: PositiveInt = 64  # folder grouping: more files than this in one folder → FAILED

    @field_validator("fps", mode="before")
    @classmethod
    def _fps_number(cls, value: Any) -> Any:
        """A TOML number is as good as its text; anything else is checked as a string."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value


@dataclass(config=STRICT)
class BatchConfig:
    max_items: Annotated[
        int,
        Field(
            ge=1,
            le=V7_MAX_ITEMS_PER_REQUEST,
            description="V7's documented limit per register request: its troubleshooting "
            'page says "500 or lower"; darwin-py sends 10',
        ),
    ] = 10  # what V7's own SDK sends
    max_bytes: Annotated[int, Field(ge=1024)] = 1_000_000  # serialized request body limit
    max_wait_s: Seconds = 0.5  # flush a partial batch after this long


@dataclass(config=STRICT)
class RateConfig:
    requests_per_s: PerSecond = 10.0  # starting and maximum request rate to V7
    burst: Annotated[float, Field(ge=1)] = 1.0  # token bucket depth (requests)
    max_in_flight: PositiveInt = 8  # concurrent register requests
    adaptive: bool = True  # AIMD: cut the rate on 429, creep back up while it is quiet
    min_requests_per_s: PerSecond = 0.2
    retry_base_s: Seconds = 0.5  # full-jitter exponential backoff base
    retry_cap_s: Seconds = 60.0  # one wait never exceeds this (except a longer Retry-After)
    retry_max_total_s: SecondsOrZero = 900.0  # give up on a batch after retrying this long
    # One budget per V7 key for every process of a job, in PostgreSQL (shared_rate.py).
    shared: Literal["auto", "on", "off"] = "auto"  # auto: shared when a PostgreSQL URL is known
    shared_url: str = ""  # postgresql://… of the budget; "" = the ledger's when it is PostgreSQL
    shared_connections: PositiveInt = 2  # the budget's connection pool size (connections)


@dataclass(config=STRICT)
class LedgerConfig:
    path: Annotated[str, Field(min_length=1)] = "ingest-ledger.sqlite"  # SQLite: one machine
    # postgresql://user@host:5432/db: the PostgreSQL ledger (several processes, one job).
    # Overrides ``path``; $INGEST_LEDGER sets it too. The password: the URL, $PGPASSWORD
    # or ~/.pgpass; it is masked wherever the URL is printed.
    url: str = ""
    pool_max_size: PositiveInt = 10  # connections per process to PostgreSQL (bounded pool)
    # asyncpg's prepared-statement cache (statements per connection); 0 behind a
    # transaction-mode pooler such as pgbouncer
    statement_cache_size: Count = 100
    connect_timeout_s: Seconds = 10.0  # connecting to PostgreSQL
    # PostgreSQL ends a session left idle inside a transaction this long (a paused process
    # must not keep row locks others wait on); 0 = the server's setting. Keep it well under
    # lease_ttl_s.
    idle_in_transaction_timeout_s: SecondsOrZero = 20.0
    job: str = ""  # "" → derived from dataset + storage + bucket + prefix
    # A run, sync or worker holds a lease on the job in the ledger, renewed while it lives;
    # a second one is refused until the lease expires (a holder killed -9 blocks no longer).
    lease_ttl_s: Annotated[float, Field(ge=5)] = 60.0


@dataclass(config=STRICT)
class OutputConfig:
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, else JSON
    progress: bool = True  # live progress display on a terminal
    # seconds between redraws of the progress display
    progress_interval_s: Annotated[float, Field(ge=0.05, le=60)] = 0.5
    plan_output: str = "plan.jsonl"  # `ingest plan` writes here ("-" = stdout)


VideoProcessing = Literal["auto", "local", "server"]


@dataclass(config=STRICT)
class MediaConfig:
    """Read-only images (thumbnails, sizes) and locally processed videos."""

    # Bucket key prefix for thumbnails and video artifacts; "" = the V7 storage configuration's
    # prefix (its container segment dropped for Azure), or "thumbnails" when that is empty too.
    artifact_prefix: str = ""
    thumbnail_workers: Count = 0  # decoder processes; 0 = one per usable CPU (cgroup quota)
    thumbnail_concurrency: PositiveInt = 16  # images fetched / thumbnailed / uploaded at once
    max_image_bytes: PositiveInt = 512 * 1024 * 1024  # larger images are FAILED, not loaded
    max_image_pixels: PositiveInt = 300_000_000  # decompression-bomb guard
    # "auto": local for read-only storage (required there), server-side for read-write.
    video_processing: VideoProcessing = "auto"
    video_workers: Count = 0  # videos cut at once; 0 = half the usable CPUs
    video_threads_per_worker: Count = 0  # ffmpeg -threads; 0 = usable CPUs / workers
    video_time_limit_s: Seconds = 3600.0  # one video's processing time limit
    # Encoders of one video in three ffmpeg processes at once (HLS high, HLS low, frames):
    # shorter wall time only with >= 4 usable cores per video, ~10 % more CPU (three decodes);
    # false (the default) = one process, one decode (measured faster on 2 cores).
    video_split_encoders: bool = False
    video_x264_preset: str = "medium"  # libx264 -preset (darwin-py: medium); faster = larger
    # zlib level of PNG frames (lossless at every level)
    video_png_compression_level: Annotated[int, Field(ge=0, le=9)] = 1
    segment_length_s: PositiveInt = 2  # HLS segment length (darwin-py: segment_length)
    extract_preview_frames: bool = True  # low-quality preview frames (darwin-py name)
    # 1 = PNG frames, 2..31 = JPEG -q:v (darwin-py name)
    primary_frames_quality: Annotated[int, Field(ge=1, le=31)] = 1
    upload_concurrency: PositiveInt = 8  # artifact uploads at once per video
    temp_dir: str = ""  # where videos are downloaded and cut; "" = the system temp dir
    # frames/s of a read-only DICOM series converted to a video (ffmpeg takes up to 1000)
    dicom_fps: Annotated[float, Field(gt=0, le=1000)] = 10.0


ChangePolicy = Literal["report", "register"]
EventKind = Literal["none", "sqs", "azure_queue"]


@dataclass(config=STRICT)
class SyncConfig:
    """`ingest sync`: register only what is new since the ledger last saw the bucket."""

    # An object listed with the same key but a new ETag/generation: "report" (default) records
    # it; "register" registers the new version as a new item named <stem>.v<etag8><ext>.
    on_change: ChangePolicy = "report"


@dataclass(config=STRICT)
class WorkerConfig:
    """`ingest worker`: scheduled syncs, optional object events, health and metrics."""

    # "every 15m" / "every 3600s" / "every 1h", or a 5-field cron expression in UTC
    # ("0 2 * * *" = 02:00 every night).
    schedule: str = "every 1h"
    jitter_s: SecondsOrZero = 0.0  # each scheduled sync starts up to this much later (random)
    grace_period_s: SecondsOrZero = 30.0  # SIGTERM: in-flight requests and uploads get this long
    # Failed items are retried by later syncs after base * 2^(attempts-1), capped.
    retry_failed_base_s: Seconds = 300.0
    retry_failed_cap_s: Seconds = 86400.0
    # V7 or the bucket unreachable: preflight is retried with backoff up to this wait.
    unreachable_retry_cap_s: Seconds = 300.0
    http_host: str = "0.0.0.0"  # /healthz, /readyz, /metrics
    http_port: Annotated[int, Field(ge=0, le=65535)] = 9464  # 0 = no HTTP endpoint
    # /readyz fails when the last successful sync is older than this; 0 = 2 x the schedule
    # period + jitter (at least 10 minutes).
    ready_max_sync_age_s: SecondsOrZero = 0.0
    # Event-driven mode: S3 event notifications in SQS, or Azure Blob events (Event Grid) in
    # an Azure storage queue. The scheduled sync stays on as reconciliation.
    # What this process does on a job that several processes share (a PostgreSQL ledger):
    # "list" the bucket, "media" work (thumbnails, videos), "send" to V7. Default: all.
    roles: list[str] = field(default_factory=lambda: ["list", "media", "send"])
    events: EventKind = "none"
    events_queue: str = ""  # SQS queue URL, or the Azure queue name
    events_endpoint_url: str = ""  # SQS endpoint override (an emulator); "" = AWS
    events_max_batch: PositiveInt = 100  # objects registered together from events
    events_wait_s: Seconds = 1.0  # longest an event waits for others to batch with


@dataclass(config=STRICT)
class Config:
    v7: V7Config = field(default_factory=V7Config)
    source: SourceConfig = field(default_factory=SourceConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    # The bucket local files are uploaded to when source.provider = "local" (the bucket of
    # the V7 storage configuration). Same fields as [source]; its prefix is unused.
    upload: SourceConfig = field(default_factory=lambda: SourceConfig(provider="aws"))
    # Not from the file: the secret, from the environment only. Excluded from repr.
    api_key: str = field(default="", repr=False)

    @property
    def base_url(self) -> str:
        url = self.v7.base_url or os.environ.get(BASE_URL_ENV, "") or DEFAULT_BASE_URL
        return url.rstrip("/")

    @property
    def job(self) -> str:
        if self.ledger.job:
            return self.ledger.job
        s = self.source
        return f"{self.v7.dataset}:{self.v7.storage}:{s.provider}:{s.bucket}:{s.prefix}"

    @property
    def bucket_source(self) -> SourceConfig:
        """The bucket V7 reads from: the source, or the upload destination of a local source."""
        return self.upload if self.source.provider == "local" else self.source

    @property
    def strip(self) -> str:
        return self.source.prefix if self.plan.strip_prefix == "auto" else self.plan.strip_prefix


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "api_key")


def _section_class(section: str) -> type[Any]:
    if section not in SECTIONS:
        raise ConfigError(f"config: unknown section [{section}]{_suggest(section, SECTIONS)}")
    return type(getattr(Config(), section))


def _section_for_field(name: str) -> str:
    """`` (did you mean `[v7] dataset`?)`` for a field written above every section."""
    owners = [s for s in SECTIONS if s != "upload" and name in _field_names(_section_class(s))]
    return f" (did you mean `[{owners[0]}] {name}`?)" if owners else ""


def _field_names(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(name: str, known: tuple[str, ...] | list[str]) -> str:
    """The nearest known name as " (did you mean `x`?)", else the list of known names."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean `{close[0]}`?)"
    return f" (known: {', '.join(known)})"


def _read_override(cls: type[Any], name: str, text: str, section: str) -> Any:
    """One ``--set`` value: a TOML value when it parses as one (``5``, ``true``, ``["a"]``,
    ``"s"``); a string field takes the text as typed; a list field also takes ``a,b``, but not
    ``[a`` or ``[*.jpg]`` (a list the shell took the quotes from)."""
    fields = getattr(cls, "__pydantic_fields__", {})
    annotation = fields[name].annotation if name in fields else None
    is_list = getattr(annotation, "__origin__", None) is list
    try:
        value: Any = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if is_list and text.startswith("["):
            raise ConfigError(_unquoted_list(section, name, text)) from None
        value = text
    if annotation is str and not isinstance(value, str):
        return text
    if is_list and isinstance(value, str):
        return [v for v in value.split(",") if v]
    return value


def _unquoted_list(section: str, name: str, text: str) -> str:
    """``[*.jpg]``: what the shell leaves of ``["*.jpg"]``. Taken as one pattern it would be a
    character class, so it is refused, showing quoting that survives the shell."""
    return (
        f"--set {section}.{name}={text} is not a TOML list (the shell removed its quotes?): "
        f"""write --set '{section}.{name}=["*.jpg", "*.png"]' or """
        f"--set '{section}.{name}=*.jpg,*.png'"
    )


def _describe(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def _number(value: Any) -> Any:
    """0.0 → 0 in messages."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _why(cls: type[Any], name: str) -> str:
    info = getattr(cls, "__pydantic_fields__", {}).get(name)
    return f" ({info.description})" if info is not None and info.description else ""


_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list of strings",
    "finite_number": "must be a finite number (not nan or inf)",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be one of {expected}",
    "string_too_short": "must not be empty",
}


def _one_line(section: str, cls: type[Any], err: ValidationError) -> ConfigError:
    """Pydantic's errors as one line: the first error, naming the field and the value."""
    errors = err.errors(include_url=False)
    # An unknown field first: its did-you-mean is likely the fix for the others too.
    errors.sort(key=lambda e: e["type"] != "unexpected_keyword_argument")
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    name = loc[0] if loc else ""
    where = ".".join([section, *loc])
    if first["type"] == "unexpected_keyword_argument":
        return ConfigError(
            f"config: unknown field {section}.{name}{_suggest(name, _field_names(cls))}"
        )
    if name in UNECHOED:
        return ConfigError(
            f"config: {where} must be the name of an environment variable (letters, digits "
            "and _, e.g. AZURE_STORAGE_CONNECTION_STRING), not the connection string itself "
            "(its value is not shown)"
        )
    template = _MESSAGES.get(first["type"])
    ctx = {k: _number(v) for k, v in first.get("ctx", {}).items()}
    msg = template.format(**ctx) if template else first["msg"]
    if first["type"].startswith("less"):
        msg += _why(cls, name)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(f"config: {where} = {_describe(first['input'])}: {msg}{more}")


def _build(section: str, values: dict[str, Any]) -> Any:
    cls = _section_class(section)
    try:
        return cls(**values)
    except ValidationError as e:
        raise _one_line(section, cls, e) from None


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read the TOML file (if any), apply ``section.field=value`` overrides, validate."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config: file not found: {p}") from None
        except IsADirectoryError:
            raise ConfigError(f"config: {p} is a directory, not a TOML file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config: {p} is not a UTF-8 text file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {p} is not valid TOML: {e}") from None
        except OSError as e:  # not a directory on the way, a symlink loop, no permission…
            raise ConfigError(f"config: cannot read {p}: {e.strerror or e}") from None
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"config: top-level key {section!r} must be a [section]"
                    f"{_section_for_field(section)}"
                )
            _section_class(section)
            data[section] = dict(values)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        cls = _section_class(section)
        data.setdefault(section, {})[name] = _read_override(cls, name, text.strip(), section)
    sections = {section: _build(section, values) for section, values in data.items()}
    cfg = Config(**sections, api_key=os.environ.get(API_KEY_ENV, ""))
    apply_ledger_env(cfg, overrides or [])
    validate(cfg)
    return cfg


def _validate_shared_rate(rate: RateConfig) -> None:
    if rate.shared_url and not rate.shared_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("config: rate.shared_url must be a postgresql:// URL")


LEDGER_ENV = "INGEST_LEDGER"


def apply_ledger_env(cfg: Config, overrides: list[str]) -> None:
    """$INGEST_LEDGER (a postgresql:// URL or a file path) beats the file's [ledger], not an
    explicit ``--set ledger.url/path`` or ``--ledger``."""
    env = os.environ.get(LEDGER_ENV, "").strip()
    if not env or any(o.startswith(("ledger.url=", "ledger.path=")) for o in overrides):
        return
    if "://" in env:
        cfg.ledger.url = env
    else:
        cfg.ledger.path, cfg.ledger.url = env, ""


def validate_roles(cfg: Config) -> None:
    roles = cfg.worker.roles
    unknown = sorted(set(roles) - {"list", "media", "send"})
    if unknown or not roles:
        raise ConfigError(
            'config: worker.roles must be a non-empty list of "list", "media", "send"'
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    if set(roles) != {"list", "media", "send"} and not cfg.ledger.url:
        raise ConfigError(
            "config: worker.roles restricts a process that shares a job with others: it needs "
            "a PostgreSQL ledger (ledger.url); with SQLite one process does everything"
        )


def validate_ledger(cfg: LedgerConfig) -> None:
    if cfg.url and not cfg.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("config: ledger.url must be a postgresql:// URL")



def validate(cfg: Config) -> None:
    """Checks that need no network, across fields (each field's own type and bounds are
    checked by the schema, also on assignment). Raises ConfigError with one actionable line."""
    _validate_urls(cfg)
    if cfg.plan.fps != "native":
        try:
            fps = float(cfg.plan.fps)
            if not math.isfinite(fps) or fps < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f'config: plan.fps must be "native" or a number >= 0, got {cfg.plan.fps!r}'
            ) from None
    if not cfg.plan.root_path.startswith("/"):
        raise ConfigError(f"config: plan.root_path must start with '/', got {cfg.plan.root_path!r}")
    if cfg.plan.slots == "manifest" and not cfg.plan.manifest:
        raise ConfigError(
            'config: plan.slots = "manifest" needs plan.manifest = <path to CSV/JSONL>'
        )
    if cfg.rate.min_requests_per_s > cfg.rate.requests_per_s:
        raise ConfigError(
            f"config: rate.min_requests_per_s ({cfg.rate.min_requests_per_s}) must not exceed "
            f"rate.requests_per_s ({cfg.rate.requests_per_s})"
        )
    if cfg.rate.retry_base_s > cfg.rate.retry_cap_s:
        raise ConfigError("config: rate.retry_base_s must not exceed rate.retry_cap_s")
    _validate_shared_rate(cfg.rate)
    _validate_video_tuning(cfg.media)
    w = cfg.worker
    from ingest.worker.schedule import parse_schedule

    parse_schedule(w.schedule).next_after(0.0)  # ConfigError naming the field if it never fires
    if w.events != "none" and cfg.plan.slots == "manifest":
        raise ConfigError('config: worker.events cannot be used with plan.slots = "manifest"')
    if w.events != "none" and not w.events_queue:
        raise ConfigError(
            f'config: worker.events = "{w.events}" needs worker.events_queue (the SQS queue URL '
            "or the Azure queue name)"
        )
    _validate_events(cfg)
    validate_ledger(cfg.ledger)
    validate_roles(cfg)


HTTP_URL = re.compile(r"^https?://[^/\s]+", re.IGNORECASE)


def _check_url(where: str, url: str) -> None:
    if url and not HTTP_URL.match(url):
        raise ConfigError(
            f"config: {where} = {without_userinfo(url)!r} must start with http:// or https:// "
            "(e.g. http://127.0.0.1:9000)"
        )


def _validate_urls(cfg: Config) -> None:
    """Every endpoint is an http(s) URL: an SDK would otherwise fail deep inside, late."""
    if not HTTP_URL.match(cfg.base_url):
        where = "v7.base_url" if cfg.v7.base_url else f"${BASE_URL_ENV}"
        raise ConfigError(
            f"config: {where} = {without_userinfo(cfg.base_url)!r} must start with http:// or "
            "https:// "
            f"(e.g. {DEFAULT_BASE_URL})"
        )
    _check_url("source.endpoint_url", cfg.source.endpoint_url)
    _check_url("upload.endpoint_url", cfg.upload.endpoint_url)
    _check_url("source.account_url", cfg.source.account_url)
    _check_url("upload.account_url", cfg.upload.account_url)
    _check_url("worker.events_endpoint_url", cfg.worker.events_endpoint_url)


X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
    "veryslow", "placebo",
)  # fmt: skip


def _validate_video_tuning(m: MediaConfig) -> None:
    """The engine-side speed knobs of local video processing."""
    if m.video_x264_preset not in X264_PRESETS:
        raise ConfigError(
            f"config: media.video_x264_preset must be one of {', '.join(X264_PRESETS)}, "
            f"got {m.video_x264_preset!r}"
        )


SQS_QUEUE_URL = re.compile(r"^https?://[^/]+/[^/]+/[^/]+/?$")
AZURE_QUEUE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")


def _validate_events(cfg: Config) -> None:
    """worker.events against the source's cloud and the queue's form."""
    w = cfg.worker
    if w.events == "sqs":
        if cfg.source.provider != "aws":
            raise ConfigError('config: worker.events = "sqs" needs source.provider = "aws"')
        if not SQS_QUEUE_URL.match(w.events_queue):
            raise ConfigError(
                "config: worker.events_queue must be the SQS queue URL "
                "(https://sqs.<region>.amazonaws.com/<account id>/<queue name>)"
            )
    elif w.events == "azure_queue":
        if cfg.source.provider != "azure":
            raise ConfigError(
                'config: worker.events = "azure_queue" needs source.provider = "azure"'
            )
        if not AZURE_QUEUE_NAME.match(w.events_queue):
            raise ConfigError(
                f"config: worker.events_queue = {w.events_queue!r} is not an Azure queue name "
                "(3-63 lowercase letters, digits and single hyphens)"
            )


def require_for_run(cfg: Config) -> None:
    """Fields a run against V7 cannot do without."""
    if cfg.source.provider == "local":
        if not cfg.upload.bucket:
            raise ConfigError(
                'config: source.provider = "local" needs [upload] bucket (and provider): the '
                "bucket of the V7 storage configuration that the local files are uploaded to"
            )
        if cfg.upload.provider == "local":
            raise ConfigError("config: upload.provider must be a cloud bucket (aws, gcp, azure)")
    if not cfg.api_key:
        raise ConfigError(f"{API_KEY_ENV} is not set: export your V7 API key in the environment")
    for where, value in (
        ("v7.dataset", cfg.v7.dataset),
        ("v7.storage", cfg.v7.storage),
        ("source.bucket", cfg.source.bucket),
    ):
        if not value:
            raise ConfigError(f"config: {where} is required")
