"""A fixed cap on one bucket's request rate: ``source.max_requests_per_s`` (0 = none).

A job on a shared production bucket should stay well under what the bucket serves everyone
(S3: ~5,500 GET and 3,500 PUT per second per prefix; GCS: ~5,000 reads per second per bucket
at first). The cap is aiolimiter's leaky bucket, one per bucket client, and each provider
applies it at its SDK's edge — a botocore ``before-send`` hook, an aiohttp trace hook under
gcloud-aio, an azure-core pipeline policy — so that *every* HTTP request counts: listing
pages, GETs (thumbnails, videos), PUTs of artifacts and thumbnails, the parts of a multipart
upload and the SDK's own retries. Unlike the V7 rate controller (``ingest/registrar/rate.py``)
it never adapts: it is a ceiling the operator sets.
"""

from __future__ import annotations

from aiolimiter import AsyncLimiter

# The bucket holds this many seconds' worth of requests (at least one request): bursts stay
# small, so the rate over any one-second window stays within ~10 % of the cap.
DEPTH_S = 0.1


class RequestCap:
    """``await cap.wait()`` before each request; free when ``per_s`` is 0."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self._limiter: AsyncLimiter | None = None
        if per_s > 0:
            period = max(1.0 / per_s, DEPTH_S)
            self._limiter = AsyncLimiter(per_s * period, period)

    @property
    def active(self) -> bool:
        return self._limiter is not None

    async def wait(self) -> None:
        if self._limiter is not None:
            await self._limiter.acquire()
