"""The one place Azure storage credentials are resolved: the blob source (``blob.py``) and the
queue event source (``queue.py``) both open their clients through ``AccountAuth``.

Tried in this order: a connection string in the env variable named by
``source.connection_string_env``; an endpoint URL (the caller's: the account URL for blobs, the
queue endpoint for queues) with the account key in $AZURE_STORAGE_KEY; the same URL with
DefaultAzureCredential (managed identity, workload identity, az login...).

Only names are read from a connection string (``account_name``): the key inside it never leaves
here, nor does the string itself (the SDK's parse error may quote it). No SDK is imported until
an identity is needed, so ``account_name`` costs nothing (preflight uses it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from ingest.config import SourceConfig
from ingest.errors import ConfigError

ACCOUNT_KEY_ENV = "AZURE_STORAGE_KEY"
DEFAULT_CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"

C = TypeVar("C")


def _conn_fields(conn: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in conn.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip().lower()] = v.strip()
    return out


def account_from_url(url: str) -> str:
    """``https://acct.blob.core.windows.net`` → acct; emulator ``http://host:port/acct`` → acct."""
    u = urlparse(url)
    host = u.hostname or ""
    if host.count(".") >= 2 and not host.replace(".", "").isdigit():
        return host.split(".", 1)[0]
    return u.path.strip("/").split("/", 1)[0]


def connection_string(cfg: SourceConfig) -> str:
    """The connection string the config points at, or "" (no env variable named, or unset)."""
    env = cfg.connection_string_env
    return os.environ.get(env, "") if env else ""


def connection_string_env(cfg: SourceConfig) -> str:
    """The env variable to name in messages about missing credentials."""
    return cfg.connection_string_env or DEFAULT_CONNECTION_STRING_ENV


def account_name(cfg: SourceConfig) -> str:
    """The storage account the configured credentials point at, or "" when unknown.

    Only names are read from the connection string: the key inside it never leaves here."""
    conn = connection_string(cfg)
    if conn:
        fields = _conn_fields(conn)
        if fields.get("accountname"):
            return fields["accountname"]
        if fields.get("blobendpoint"):
            return account_from_url(fields["blobendpoint"])
        return ""
    url = cfg.account_url or cfg.endpoint_url
    return account_from_url(url) if url else ""


class AccountAuth:
    """Opens one client of a storage account from ``cfg``'s credentials, and closes the identity
    it made for it (a DefaultAzureCredential) with ``close``, after the client."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        # " in account 'name'" for messages once a client is open ("" when the connection
        # string names no account).
        self.where = ""
        self._credential: Any = None

    def open(
        self,
        *,
        url: str,
        missing: str,
        from_connection_string: Callable[[str], C],
        from_url: Callable[[str, Any], C],
    ) -> C:
        """The client: ``from_connection_string(conn)`` when a connection string is set, else
        ``from_url(url, credential)``; ConfigError(``missing``) when there is no URL either."""
        conn = connection_string(self.cfg)
        if conn:
            account = account_name(self.cfg)
            self.where = f" in account '{account}'" if account else ""
            try:
                return from_connection_string(conn)
            except ValueError:
                # The SDK's message may quote the string, and the string holds the key.
                raise ConfigError(
                    f"${self.cfg.connection_string_env} is not a valid Azure connection string"
                ) from None
        if not url:
            raise ConfigError(missing)
        account = account_from_url(url)
        self.where = f" in account '{account}'"
        key = os.environ.get(ACCOUNT_KEY_ENV, "")
        if key:
            credential: Any = {"account_name": account, "account_key": key}
        else:
            from azure.identity.aio import DefaultAzureCredential

            credential = self._credential = DefaultAzureCredential()
        return from_url(url, credential)

    async def close(self) -> None:
        if self._credential is not None:
            credential, self._credential = self._credential, None
            await credential.close()
