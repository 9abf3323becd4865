"""The S3 source's fast timestamp parser agrees with botocore's on every form S3 sends."""

from __future__ import annotations

import pytest
from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

from ingest.providers.aws.s3 import fast_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "2024-01-01T00:00:00.000Z",
        "2026-11-25T05:24:17.393Z",
        "2024-02-29T23:59:59+02:00",
        "Mon, 01 Jan 2024 00:00:00 GMT",
        "1700000000",
        1700000000,
        1700000000.5,
    ],
)
def test_same_instant_as_botocore(value: object) -> None:
    assert fast_timestamp(value) == DEFAULT_TIMESTAMP_PARSER(value)
    assert fast_timestamp(value).tzinfo is not None


def test_garbage_is_refused_like_botocore() -> None:
    with pytest.raises(ValueError):
        DEFAULT_TIMESTAMP_PARSER("not a date")
    with pytest.raises(ValueError):
        fast_timestamp("not a date")
