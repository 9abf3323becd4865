"""A synthetic S3 endpoint that serves ListObjectsV2 for a generated keyspace, on the fly.

No emulator holds a million objects quickly; this answers listings for N keys without storing
them (key i is ``{prefix}{i // per_folder:05d}/{i:09d}.jpg``), honouring prefix, delimiter,
start-after, continuation-token and max-keys, in key order. HeadBucket answers 200.
``--hide-every K`` leaves out every K-th key (i % K == K - 1): the same bucket before those
objects were added, for the sync benchmark.

Run: python -m benchmarks.synthetic_s3 --port 9000 --objects 1000000 [--folders 100]
"""

from __future__ import annotations

import argparse
import bisect
from xml.sax.saxutils import escape

from aiohttp import web

PREFIX = "data/"


class Keyspace:
    """Keys in lexicographic order == numeric order thanks to zero padding."""

    def __init__(self, n: int, folders: int, hide_every: int = 0) -> None:
        self.n = n
        self.folders = max(1, folders)
        self.per_folder = -(-n // self.folders)
        self.hide_every = hide_every

    def hidden(self, i: int) -> bool:
        return self.hide_every > 0 and i % self.hide_every == self.hide_every - 1

    def key(self, i: int) -> str:
        return f"{PREFIX}{i // self.per_folder:05d}/{i:09d}.jpg"

    def index_after(self, key: str) -> int:
        """Index of the first key strictly greater than ``key``."""
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) // 2
            if self.key(mid) <= key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def folder_names(self) -> list[str]:
        return [f"{PREFIX}{f:05d}/" for f in range(-(-self.n // self.per_folder))]


def _contents(ks: Keyspace, i: int) -> str:
    return (
        f"<Contents><Key>{escape(ks.key(i))}</Key><LastModified>2026-01-01T00:00:00.000Z"
        f"</LastModified><ETag>&quot;{i:032x}&quot;</ETag><Size>{1000 + i % 5000}</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
    )


def make_app(ks: Keyspace) -> web.Application:
    async def bucket(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(status=200)
        q = request.query
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        max_keys = min(int(q.get("max-keys", "1000")), 1000)
        start = q.get("continuation-token") or q.get("start-after") or ""
        parts: list[str] = []
        truncated = False
        last = ""
        if delimiter == "/":
            # Folders only: "" → ["data/"], "data/" → its sub-folders; no direct objects anywhere.
            names = [PREFIX] if prefix == "" else ks.folder_names() if prefix == PREFIX else []
            names = [f for f in names if f > start]
            page = names[:max_keys]
            truncated = len(names) > max_keys
            parts = [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in page]
            last = page[-1] if page else ""
        else:
            i = ks.index_after(start) if start else 0
            j = bisect.bisect_left(range(ks.n), True, lo=i, key=lambda x: ks.key(x) >= prefix)
            count = 0
            while j < ks.n and count < max_keys:
                k = ks.key(j)
                if not k.startswith(prefix):
                    break
                if not ks.hidden(j):
                    parts.append(_contents(ks, j))
                    last = k
                    count += 1
                j += 1
            while j < ks.n and ks.hidden(j):
                j += 1
            truncated = j < ks.n and ks.key(j).startswith(prefix)
        token = (
            f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if truncated else ""
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{request.match_info['bucket']}</Name><Prefix>{escape(prefix)}</Prefix>"
            f"<KeyCount>{len(parts)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{token}"
            + "".join(parts)
            + "</ListBucketResult>"
        )
        return web.Response(body=body.encode(), content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{bucket}", bucket)
    app.router.add_route("*", "/{bucket}/", bucket)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--folders", type=int, default=100)
    ap.add_argument("--hide-every", type=int, default=0, help="leave out every K-th key")
    ns = ap.parse_args()
    ks = Keyspace(ns.objects, ns.folders, ns.hide_every)
    print(f"synthetic s3 listening on http://{ns.host}:{ns.port}", flush=True)
    web.run_app(make_app(ks), host=ns.host, port=ns.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
