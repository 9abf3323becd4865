"""Logging: human text on a terminal, one JSON object per line otherwise; never a secret.

Every record carries the run id. A redaction filter replaces any registered secret that slips
into a message or its arguments, as a last line of defence (code must not log secrets anyway).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

import orjson


class TextSink(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


_SECRETS: set[str] = set()
_HANDLER: dict[str, logging.StreamHandler[Any]] = {}  # "stderr": the handler setup() installed
_RUN_ID = {"value": ""}
REDACTED = "[REDACTED]"

# Attributes every LogRecord has; anything else came from `extra=` and goes into the JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def register_secret(value: str) -> None:
    if value and len(value) >= 4:
        _SECRETS.add(value)


def set_run_id(run_id: str) -> None:
    _RUN_ID["value"] = run_id


# The user:password@ of a URL (with or without a scheme): what an endpoint pasted from a
# console often carries.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*@")
_BARE_USERINFO = re.compile(r"^[^/?#\s@:]+:[^/?#\s@]*@")


def without_userinfo(url: str) -> str:
    """``url`` fit to print: ``https://user:pass@host`` → ``https://[REDACTED]@host`` (also
    ``user:pass@host`` without a scheme). Every message that shows an endpoint uses this."""
    url = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", url)
    return _BARE_USERINFO.sub(f"{REDACTED}@", url)


_SECRET_PARAMS = frozenset({"password", "passfile", "sslpassword"})


def mask_url(url: str) -> str:
    """The URL with its credentials masked (``***``): safe to print or log, whatever it holds.

    Not parsed with ``urlsplit`` (an unencoded ``/ # ?`` in a password ends its netloc
    early, and a bad port raises): everything between ``//`` and the LAST ``@`` before the
    host is the userinfo; the user name is kept, the rest masked. Query parameters that
    carry a secret (``password``, ``passfile``, ``sslpassword``) are dropped."""
    try:
        scheme, sep, rest = url.partition("://")
        if not sep:
            return "***" if "@" in url or "password" in url.lower() else url
        at = rest.rfind("@")
        if at >= 0:
            user = rest[:at].split(":", 1)[0]
            masked = f"{user}:***" if ":" in rest[:at] else user
            rest = f"{masked}@{rest[at + 1 :]}"
        base, qsep, query = rest.partition("?")
        if qsep:
            query, fsep, fragment = query.partition("#")
            kept = [
                kv
                for kv in query.split("&")
                if kv and kv.split("=", 1)[0].lower() not in _SECRET_PARAMS
            ]
            rest = base + ("?" + "&".join(kept) if kept else "") + (fsep + fragment)
        return f"{scheme}://{rest}"
    except Exception:  # never a reason to show the URL
        return "postgresql://***"


def redact(text: str) -> str:
    """Registered secrets and the userinfo of any URL in ``text`` replaced."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for k, v in list(vars(record).items()):
            if k not in _STANDARD and isinstance(v, str):
                setattr(record, k, redact(v))
        record.run_id = _RUN_ID["value"]
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD:
                doc[k] = v
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and k != "run_id"
        )
        line = f"{record.levelname.lower():7s} {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def setup(log_format: str = "auto", level: int = logging.INFO) -> bool:
    """Configure the root logger on stderr. Returns True when logs are JSON."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(_RedactFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    _HANDLER["stderr"] = handler
    root.setLevel(level)
    # Libraries are chatty at INFO (botocore credential discovery, aiohttp access logs).
    for noisy in ("botocore", "aiobotocore", "aiohttp.access", "urllib3", "azure", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return use_json


@contextlib.contextmanager
def log_stream(stream: TextSink) -> Iterator[None]:
    """Log records go to ``stream`` meanwhile (the live progress display prints them above
    itself, so a log line never tears a frame); stderr again afterwards."""
    handler = _HANDLER.get("stderr")
    if handler is None:
        yield
        return
    previous = handler.setStream(stream)
    try:
        yield
    finally:
        if previous is not None:
            handler.setStream(previous)
