"""Registration with V7: the HTTP client, rate control, retries, and batch outcomes."""

from ingest.registrar.client import V7Client, parse_retry_after
from ingest.registrar.rate import Limiter, RateController, Tuning
from ingest.registrar.registrar import Registrar
from ingest.registrar.retry import RetryPolicy

__all__ = [
    "Limiter",
    "RateController",
    "Registrar",
    "RetryPolicy",
    "Tuning",
    "V7Client",
    "parse_retry_after",
]
