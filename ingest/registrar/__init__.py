"""Registration with V7: the HTTP client, rate control, retries, and batch outcomes.

Names are loaded lazily (PEP 562), so that importing one submodule (``ingest.registrar.client``,
``.rate``, ``.lookup``, ``.faults``) does not import every other one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.registrar.client import V7Client, parse_retry_after
    from ingest.registrar.rate import Limiter, RateController, Tuning
    from ingest.registrar.registrar import Registrar
    from ingest.registrar.retry import RetryPolicy

_WHERE = {
    "Limiter": "rate",
    "RateController": "rate",
    "Registrar": "registrar",
    "RetryPolicy": "retry",
    "Tuning": "rate",
    "V7Client": "client",
    "parse_retry_after": "client",
}

__all__ = [
    "Limiter",
    "RateController",
    "Registrar",
    "RetryPolicy",
    "Tuning",
    "V7Client",
    "parse_retry_after",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
