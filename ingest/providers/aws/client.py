"""The one place aiobotocore clients are built: the S3 source (``s3.py``) and the SQS event
source (``sqs.py``) both go through ``AwsClient``.

Each client has its own ``AioSession``: credentials from the AWS default chain or the named
``profile``, or explicit keys when given (tests, emulators); the region when one is set, else
botocore's own resolution; ``endpoint_url`` for an S3-compatible store or an emulator; explicit
connect/read timeouts, botocore's "standard" retry mode with a bounded number of attempts, and a
connection pool sized by the caller (botocore's default of 10 otherwise). Credentials never
appear in messages or in a ``ClientSpec``'s repr.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiobotocore.session import AioSession
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    SSOError,
    TokenRetrievalError,
)

from ingest.errors import ConfigError
from ingest.log import without_userinfo

CREDENTIALS_FIX = (
    "set source.profile (or AWS_PROFILE) to a profile of ~/.aws/config, export "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance, task or pod role "
    "(EC2 instance profile, ECS task role, EKS IRSA / Pod Identity) provides them"
)


def credentials_problem(e: BaseException, profile: str = "") -> str | None:
    """What is wrong with the AWS credentials and how to fix it, when ``e`` says they are
    missing, incomplete or expired; None for any other error. Never quotes a credential."""
    if isinstance(e, NoCredentialsError):
        return f"no AWS credentials found: {CREDENTIALS_FIX}"
    if isinstance(e, PartialCredentialsError):
        return f"incomplete AWS credentials ({e}): {CREDENTIALS_FIX}"
    if isinstance(e, SSOError | TokenRetrievalError):
        login = f"aws sso login --profile {profile}" if profile else "aws sso login"
        return f"the AWS SSO session has expired or is missing: run `{login}`"
    return None


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """What one client is built from."""

    service: str  # "s3", "sqs"
    connect_timeout_s: float
    read_timeout_s: float
    max_attempts: int  # every attempt, the first included (botocore's total_max_attempts)
    region: str = ""  # "" = botocore's resolution (environment, profile)
    profile: str = ""  # "" = the default chain
    endpoint_url: str = ""  # "" = the service's AWS endpoint
    # Both or neither: they replace the default chain (and the profile's keys).
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    max_pool_connections: int | None = None  # None = botocore's default
    # Set on the session's response parsers (S3's fast ISO 8601 parser); None = botocore's.
    timestamp_parser: Callable[[str], Any] | None = None


def create_client(spec: ClientSpec) -> Any:
    """The aiobotocore client context manager for ``spec`` (nothing connects until used)."""
    session = AioSession(profile=spec.profile or None)
    if spec.timestamp_parser is not None:
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=spec.timestamp_parser
        )
    options: dict[str, Any] = {
        "connect_timeout": spec.connect_timeout_s,
        "read_timeout": spec.read_timeout_s,
        # total_max_attempts counts the first try; botocore's "max_attempts" would add one.
        "retries": {"mode": "standard", "total_max_attempts": spec.max_attempts},
    }
    if spec.max_pool_connections is not None:
        options["max_pool_connections"] = spec.max_pool_connections
    kwargs: dict[str, Any] = {
        "region_name": spec.region or None,
        "config": BotoConfig(**options),
    }
    if spec.endpoint_url:
        kwargs["endpoint_url"] = spec.endpoint_url
    if spec.access_key_id:
        kwargs["aws_access_key_id"] = spec.access_key_id
        kwargs["aws_secret_access_key"] = spec.secret_access_key
    return session.create_client(spec.service, **kwargs)


class AwsClient:
    """One client for an adapter's lifetime: created on first ``get`` (once, under a lock, then
    handed to ``on_open``), closed by ``close``; a ``get`` after that creates a new one."""

    def __init__(self, spec: ClientSpec, *, on_open: Callable[[Any], None] | None = None) -> None:
        self.spec = spec
        self._on_open = on_open
        self._client: Any = None
        self._ctx: Any = None
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        async with self._lock:
            if self._client is None:
                ctx = create_client(self.spec)
                try:
                    client = await ctx.__aenter__()
                except ProfileNotFound:
                    raise ConfigError(
                        f"config: AWS profile {self.spec.profile!r} (source.profile or "
                        "AWS_PROFILE) is not in ~/.aws/config or ~/.aws/credentials"
                    ) from None
                except ValueError as e:  # botocore: "Invalid endpoint: …" (no scheme, no host)
                    # Nothing was entered, so there is nothing for close() to exit.
                    endpoint = self.spec.endpoint_url or ""
                    shown = without_userinfo(endpoint)
                    why = str(e).replace(endpoint, shown) if endpoint else str(e)
                    raise ConfigError(
                        f"config: {self.spec.service} endpoint_url {shown!r} is not usable "
                        f"({without_userinfo(why)}): give a full URL such as "
                        "http://127.0.0.1:9000"
                    ) from None
                self._ctx = ctx
                if self._on_open is not None:
                    self._on_open(client)
                self._client = client
            return self._client

    async def close(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._client = self._ctx, None, None
            await ctx.__aexit__(None, None, None)
