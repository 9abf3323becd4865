"""A local V7 API held to docs/v7-contract.md: for tests, the demo, benchmarks and dry runs."""

from __future__ import annotations

import os

API_KEY = "emulator-key"  # the key the emulator accepts unless told otherwise


def local_env(**extra: str) -> dict[str, str]:
    """The environment for running ``ingest`` against the emulator and moto: the emulator's key,
    moto's dummy AWS credentials, no inherited DARWIN_BASE_URL; ``extra`` last."""
    env = dict(os.environ)
    env.update(
        DARWIN_API_KEY=API_KEY,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    env.pop("DARWIN_BASE_URL", None)
    env.update(extra)
    return env
