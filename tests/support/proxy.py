"""A real HTTP hop in front of a storage emulator, for what no emulator does by itself: it
records when each request arrived (to count a client's request rate over time), and it can
answer the next requests with an error status or cut a body short (faults to retry)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class Proxy:
    upstream: str
    url: str = ""
    arrivals: list[tuple[float, str, str]] = field(default_factory=list)  # (t, method, path)
    fail_next: int = 0  # answer this many next requests with `fail_status`
    fail_status: int = 503
    cut_next: int = 0  # send half of the next GET bodies, then drop the connection
    cut_method: str = "GET"

    def count(self, method: str | None = None) -> int:
        return sum(1 for _t, m, _p in self.arrivals if method is None or m == method)

    def max_in_window(self, window_s: float) -> int:
        """Most requests that arrived within any ``window_s`` seconds."""
        times = sorted(t for t, _m, _p in self.arrivals)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] > window_s:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


@asynccontextmanager
async def proxy_to(upstream: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(upstream.rstrip("/"))
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        proxy.arrivals.append((time.monotonic(), request.method, request.path))
        body = await request.read()
        if proxy.fail_next > 0:
            proxy.fail_next -= 1
            return web.Response(status=proxy.fail_status, text="injected by the test proxy")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session.request(
            request.method,
            proxy.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
            # Forward the client's headers only: a signed request (Azure's SharedKey signs
            # Content-Type and Content-Length) must arrive as it was signed.
            skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding", "Accept"),
        ) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if proxy.cut_next > 0 and request.method == proxy.cut_method and len(payload) > 1:
                proxy.cut_next -= 1
                resp = web.StreamResponse(status=up.status, headers=out)
                resp.content_length = len(payload)
                await resp.prepare(request)
                await resp.write(payload[: len(payload) // 2])
                assert request.transport is not None
                request.transport.close()  # the rest never comes
                return resp
            return web.Response(status=up.status, headers=out, body=payload)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    proxy.url = f"http://127.0.0.1:{port}"
    try:
        yield proxy
    finally:
        await runner.cleanup()
        await session.close()
        await asyncio.sleep(0)
