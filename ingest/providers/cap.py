"""A fixed cap on one bucket's request rate: ``source.max_requests_per_s`` (0 = none).

A job on a shared production bucket should stay well under what the bucket serves everyone
(S3: ~5,500 GET and 3,500 PUT per second per prefix; GCS: ~5,000 reads per second per bucket
at first). The cap is aiolimiter's leaky bucket, one per bucket in the process (``[source]``
and ``[upload]`` naming the same bucket share it, else the cap would double), and each
provider applies it at its SDK's edge — a botocore ``before-send`` hook, a ClientSession under
gcloud-aio, an azure-core pipeline policy — so that *every* HTTP request counts: listing
pages, GETs (thumbnails, videos), PUTs of artifacts and thumbnails, the parts of a multipart
upload and the SDK's own retries. Unlike the V7 rate controller (``ingest/registrar/rate.py``)
it never adapts: it is a ceiling the operator sets.
"""

from __future__ import annotations

import weakref

from aiolimiter import AsyncLimiter

# The bucket holds this many seconds' worth of requests (at least one request): bursts stay
# small, so the rate over any one-second window stays within ~10 % of the cap.
DEPTH_S = 0.1


def limiter_shape(per_s: float) -> tuple[float, float]:
    """(max_rate, time_period) of a leaky bucket that drains ``per_s`` requests per second and
    holds DEPTH_S seconds of them, but never less than one whole request: aiolimiter refuses
    to acquire more than max_rate, and 1.9 * (1 / 1.9) is 0.9999999999999999."""
    max_rate = max(1.0, per_s * DEPTH_S)
    return max_rate, max_rate / per_s


class _Shared:
    """The one limiter of a bucket; the lowest cap asked for wins."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self.limiter = AsyncLimiter(*limiter_shape(per_s))

    def lower_to(self, per_s: float) -> None:
        if per_s < self.per_s:
            self.per_s = per_s
            self.limiter = AsyncLimiter(*limiter_shape(per_s))


_BY_BUCKET: weakref.WeakValueDictionary[tuple[str, str, str], _Shared] = (
    weakref.WeakValueDictionary()
)


class RequestCap:
    """``await cap.wait()`` before each request; free when ``per_s`` is 0. Caps made with the
    same ``bucket`` key (provider, endpoint, bucket) share one limiter while any is alive."""

    def __init__(self, per_s: float, bucket: tuple[str, str, str] | None = None) -> None:
        self.per_s = per_s
        self._shared: _Shared | None = None
        if per_s > 0:
            shared = _BY_BUCKET.get(bucket) if bucket is not None else None
            if shared is None:
                shared = _Shared(per_s)
                if bucket is not None:
                    _BY_BUCKET[bucket] = shared
            else:
                shared.lower_to(per_s)
            self._shared = shared

    @property
    def active(self) -> bool:
        return self._shared is not None

    async def wait(self) -> None:
        if self._shared is not None:
            await self._shared.limiter.acquire()
