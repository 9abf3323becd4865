"""Configuration: a TOML file under ``config/`` plus CLI overrides; the API key only from the env.

Every field's unit is in its name (``_s`` seconds, ``_bytes``, ``per_s``). Validation happens once,
up front, and fails with a single ``ConfigError`` line that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ingest.errors import ConfigError

DEFAULT_BASE_URL = "https://darwin.v7labs.com"
API_KEY_ENV = "DARWIN_API_KEY"
BASE_URL_ENV = "DARWIN_BASE_URL"

Provider = Literal["aws", "gcp", "azure", "local"]
Mode = Literal["auto", "readwrite", "readonly"]
SlotGrouping = Literal["none", "folder", "manifest"]


@dataclass
class V7Config:
    base_url: str = ""  # "" → $DARWIN_BASE_URL → https://darwin.v7labs.com
    team: str = ""  # "" → the key's selected team (users/token_info)
    dataset: str = ""  # dataset slug
    storage: str = ""  # storage configuration name (the request's storage_slug)
    mode: Mode = "auto"  # auto: follow the storage configuration's `readonly` flag
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0


@dataclass
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
    connection_string_env: str = "AZURE_STORAGE_CONNECTION_STRING"
    include: list[str] = field(default_factory=list)  # globs on the key; empty = everything
    exclude: list[str] = field(default_factory=list)
    page_size: int = 1000  # keys per listing page (S3 max 1000)
    list_concurrency: int = 8  # sub-prefixes listed at once
    fanout_depth: int = 1  # levels of delimiter discovery below `prefix`


@dataclass
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
    max_slots: int = 64  # folder grouping: more files than this in one folder → FAILED


@dataclass
class BatchConfig:
    max_items: int = 10  # what V7's own SDK sends
    max_bytes: int = 1_000_000  # serialized request body limit
    max_wait_s: float = 0.5  # flush a partial batch after this long


@dataclass
class RateConfig:
    requests_per_s: float = 10.0  # starting and maximum request rate to V7
    burst: float = 1.0  # token bucket depth (requests)
    max_in_flight: int = 8  # concurrent register requests
    adaptive: bool = True  # AIMD: cut the rate on 429, creep back up while it is quiet
    min_requests_per_s: float = 0.2
    retry_base_s: float = 0.5  # full-jitter exponential backoff base
    retry_cap_s: float = 60.0  # one wait never exceeds this (except a longer Retry-After)
    retry_max_total_s: float = 900.0  # give up on a batch after retrying this long


@dataclass
class LedgerConfig:
    path: str = "ingest-ledger.sqlite"
    job: str = ""  # "" → derived from dataset + storage + bucket + prefix
    # A run, sync or worker holds a lease on the job in the ledger, renewed while it lives;
    # a second one is refused until the lease expires (a holder killed -9 blocks no longer).
    lease_ttl_s: float = 60.0


@dataclass
class OutputConfig:
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, else JSON
    progress: bool = True  # live progress line on a terminal
    plan_output: str = "plan.jsonl"  # `ingest plan` writes here ("-" = stdout)


VideoProcessing = Literal["auto", "local", "server"]


@dataclass
class MediaConfig:
    """Read-only images (thumbnails, sizes) and locally processed videos."""

    # Bucket key prefix for thumbnails and video artifacts; "" = the V7 storage configuration's
    # prefix (its container segment dropped for Azure), or "thumbnails" when that is empty too.
    artifact_prefix: str = ""
    thumbnail_workers: int = 0  # decoder processes; 0 = one per core
    thumbnail_concurrency: int = 16  # images fetched / thumbnailed / uploaded at once
    max_image_bytes: int = 512 * 1024 * 1024  # larger images are FAILED, not loaded
    max_image_pixels: int = 300_000_000  # decompression-bomb guard
    # "auto": local for read-only storage (required there), server-side for read-write.
    video_processing: VideoProcessing = "auto"
    video_workers: int = 0  # videos cut at once; 0 = derived from the core count
    video_threads_per_worker: int = 0  # ffmpeg -threads; 0 = cores / workers
    video_time_limit_s: float = 3600.0  # one video's processing time limit
    # Encoders of one video in three ffmpeg processes at once (HLS high, HLS low, frames):
    # every core busy for one video, ~5-8 % more CPU (three decodes); false = one process.
    video_split_encoders: bool = True
    video_x264_preset: str = "medium"  # libx264 -preset (darwin-py: medium); faster = larger
    video_png_compression_level: int = 1  # zlib level 0..9 of PNG frames (lossless at all)
    segment_length_s: int = 2  # HLS segment length (darwin-py: segment_length)
    extract_preview_frames: bool = True  # low-quality preview frames (darwin-py name)
    primary_frames_quality: int = 1  # 1 = PNG frames, 2..31 = JPEG -q:v (darwin-py name)
    upload_concurrency: int = 8  # artifact uploads at once per video
    temp_dir: str = ""  # where videos are downloaded and cut; "" = the system temp dir


ChangePolicy = Literal["report", "register"]
EventKind = Literal["none", "sqs", "azure_queue"]


@dataclass
class SyncConfig:
    """`ingest sync`: register only what is new since the ledger last saw the bucket."""

    # An object listed with the same key but a new ETag/generation: "report" (default) records
    # it; "register" registers the new version as a new item named <stem>.v<etag8><ext>.
    on_change: ChangePolicy = "report"


@dataclass
class WorkerConfig:
    """`ingest worker`: scheduled syncs, optional object events, health and metrics."""

    # "every 15m" / "every 3600s" / "every 1h", or a 5-field cron expression in UTC
    # ("0 2 * * *" = 02:00 every night).
    schedule: str = "every 1h"
    jitter_s: float = 0.0  # each scheduled sync starts up to this much later (random)
    grace_period_s: float = 30.0  # SIGTERM: in-flight requests and uploads get this long
    # Failed items are retried by later syncs after base * 2^(attempts-1), capped.
    retry_failed_base_s: float = 300.0
    retry_failed_cap_s: float = 86400.0
    # V7 or the bucket unreachable: preflight is retried with backoff up to this wait.
    unreachable_retry_cap_s: float = 300.0
    http_host: str = "0.0.0.0"  # /healthz, /readyz, /metrics
    http_port: int = 9464  # 0 = no HTTP endpoint
    # /readyz fails when the last successful sync is older than this; 0 = 2 x the schedule
    # period + jitter (at least 10 minutes).
    ready_max_sync_age_s: float = 0.0
    # Event-driven mode: S3 event notifications in SQS, or Azure Blob events (Event Grid) in
    # an Azure storage queue. The scheduled sync stays on as reconciliation.
    events: EventKind = "none"
    events_queue: str = ""  # SQS queue URL, or the Azure queue name
    events_endpoint_url: str = ""  # SQS endpoint override (an emulator); "" = AWS
    events_max_batch: int = 100  # objects registered together from events
    events_wait_s: float = 1.0  # longest an event waits for others to batch with


@dataclass
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


def _coerce(section: str, name: str, typ: Any, value: Any) -> Any:
    where = f"{section}.{name}"
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        if value not in allowed:
            raise ConfigError(
                f"config: {where} = {value!r} is not one of {', '.join(map(repr, allowed))}"
            )
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config: {where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config: {where} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {where} must be an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config: {where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {where} must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"config: {where} must be a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config: {where} must be a list of strings, got {value!r}")
        return list(value)
    return value


def _apply(cfg: Config, section: str, values: dict[str, Any]) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"config: unknown section [{section}] (known: {', '.join(SECTIONS)})")
    target = getattr(cfg, section)
    hints = get_type_hints(type(target))
    for name, value in values.items():
        if name not in hints:
            raise ConfigError(f"config: unknown field {section}.{name} (known: {', '.join(hints)})")
        setattr(target, name, _coerce(section, name, hints[name], value))


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read the TOML file (if any), apply ``section.field=value`` overrides, validate."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config: file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {p} is not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config: top-level key {section!r} must be a [section]")
            _apply(cfg, section, values)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        _apply(cfg, section, {name: value.strip()})
    cfg.api_key = os.environ.get(API_KEY_ENV, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no network. Raises ConfigError with one actionable line."""
    if cfg.plan.fps != "native":
        try:
            if float(cfg.plan.fps) < 0:
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
    if cfg.batch.max_items < 1:
        raise ConfigError("config: batch.max_items must be >= 1")
    if cfg.batch.max_bytes < 1024:
        raise ConfigError("config: batch.max_bytes must be >= 1024")
    if cfg.batch.max_wait_s <= 0:
        raise ConfigError("config: batch.max_wait_s must be > 0")
    if cfg.rate.requests_per_s <= 0:
        raise ConfigError("config: rate.requests_per_s must be > 0")
    if cfg.rate.max_in_flight < 1:
        raise ConfigError("config: rate.max_in_flight must be >= 1")
    if cfg.source.page_size < 1 or cfg.source.page_size > 1000:
        raise ConfigError("config: source.page_size must be between 1 and 1000")
    m = cfg.media
    if not 1 <= m.primary_frames_quality <= 31:
        raise ConfigError("config: media.primary_frames_quality must be 1 (PNG) or 2..31 (JPEG)")
    if m.segment_length_s < 1:
        raise ConfigError("config: media.segment_length_s must be >= 1")
    if m.thumbnail_concurrency < 1 or m.upload_concurrency < 1:
        raise ConfigError("config: media.*_concurrency must be >= 1")
    if m.video_time_limit_s <= 0:
        raise ConfigError("config: media.video_time_limit_s must be > 0")
    _validate_video_tuning(m)
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
    if not 0 <= w.http_port <= 65535:
        raise ConfigError("config: worker.http_port must be between 0 and 65535")
    if cfg.ledger.lease_ttl_s < 5:
        raise ConfigError("config: ledger.lease_ttl_s must be >= 5")
    if w.events_max_batch < 1 or w.events_wait_s <= 0:
        raise ConfigError("config: worker.events_max_batch must be >= 1, events_wait_s > 0")
    if cfg.source.list_concurrency < 1:
        raise ConfigError("config: source.list_concurrency must be >= 1")


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
    if not 0 <= m.video_png_compression_level <= 9:
        raise ConfigError("config: media.video_png_compression_level must be 0..9")


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
