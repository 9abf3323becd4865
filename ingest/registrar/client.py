"""The only code that talks HTTP to V7 (see docs/v7-contract.md).

One ``aiohttp.ClientSession`` with keep-alive (a bounded ``TCPConnector``) and explicit timeouts;
bodies are serialised and parsed with orjson. Every failure is mapped onto ``ingest.errors`` so
callers decide from the exception class alone. A session can be injected (tests, or a caller
that owns one): then the client never closes it. Given ``stats``, every answer is counted by
HTTP status (``Stats.http_statuses``) and every transport failure by kind
(``Stats.transport_by_kind``: reset, timeout, connect), for every endpoint.

``find_item_ids`` looks up V7 ids by (path, name) through the items listing with
``item_names[]`` filters, as darwin-py does (``fetch_remote_files``; its importer sends 100
names per GET and matches full paths itself).

The API key is sent in the ``Authorization`` header and nowhere else: it is never formatted into
an exception, a log line or a repr, and any text that comes back from the server is scrubbed
of it before it is quoted (a server that echoes headers must not leak it either). Exceptions
are raised ``from None`` so the aiohttp exception (whose request info carries the headers) is
not chained into tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from ingest import USER_AGENT
from ingest.errors import (
    AuthError,
    NotFoundError,
    QuotaError,
    RateLimited,
    RejectedError,
    ServerError,
    TransportError,
    V7Error,
)
from ingest.registrar.rate import ON_WIRE
from ingest.registrar.wire import Ident, norm_path

if TYPE_CHECKING:
    from ingest.stats import Stats

log = logging.getLogger("ingest.registrar.client")

# Called once per HTTP request of a multi-request call; the request goes out inside it (the
# engine passes its rate limiter's slot, so every GET stays within V7's limits).
SlotFactory = Callable[[], contextlib.AbstractAsyncContextManager[object]]


async def _on_wire(session: aiohttp.ClientSession, context: object, params: object) -> None:
    """A request's headers are written: tell the rate limiter when it really left (the
    server stamps it on its headers), if it goes out inside a limiter's slot."""
    callback = ON_WIRE.get()
    if callback is not None:
        callback()


MAX_NAMES_PER_LOOKUP = 100  # darwin-py's importer filters by at most 100 item names per GET
MAX_LOOKUP_QUERY_CHARS = 6000  # and shrinks the batch when the URL gets too long; we bound it
MAX_LOOKUP_PAGES = 10_000  # a server that never stops paginating is not followed forever

QUOTA_CODE = "INSUFFICIENT_REMAINING_STORAGE"
MAX_DETAIL_CHARS = 500
REDACTED = "[REDACTED]"

# What aiohttp raises when no (complete) response arrived.
_TRANSPORT_ERRORS = (
    aiohttp.ClientConnectionError,  # refused, reset, ServerDisconnectedError, socket timeouts
    aiohttp.ClientPayloadError,  # body cut short
    asyncio.TimeoutError,  # total / connect timeouts
)


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (int or float) or an HTTP-date.

    ``now_epoch`` is the current wall-clock time (seconds since the epoch), used for dates.
    Returns None when the header is absent or unreadable; never a negative number.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(when.timestamp() - now_epoch, 0.0)


def _team(team: str) -> str:
    return quote(team, safe="")


def transport_kind(error: BaseException) -> str:
    """What kind of transport failure: ``timeout``, ``connect`` (no connection was made) or
    ``reset`` (the connection broke: reset, closed by the server, body cut short)."""
    if isinstance(error, asyncio.TimeoutError):  # aiohttp's timeout errors subclass it too
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "connect"
    return "reset"


def lookup_chunks(
    names: Sequence[str],
    max_names: int = MAX_NAMES_PER_LOOKUP,
    max_query_chars: int = MAX_LOOKUP_QUERY_CHARS,
) -> list[list[str]]:
    """Split item names into runs of at most ``max_names`` whose ``item_names[]=...`` query
    parameters stay under ``max_query_chars`` (a name longer than that goes alone)."""
    chunks: list[list[str]] = []
    current: list[str] = []
    chars = 0
    for name in names:
        cost = len("&item_names%5B%5D=") + len(quote(name, safe=""))
        if current and (len(current) >= max(1, max_names) or chars + cost > max_query_chars):
            chunks.append(current)
            current, chars = [], 0
        current.append(name)
        chars += cost
    if current:
        chunks.append(current)
    return chunks


class V7Client:
    """Async client for the parts of V7's REST API the engine uses."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 60.0,
        user_agent: str = USER_AGENT,
        max_connections: int = 10,
        session: aiohttp.ClientSession | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_root = f"{self.base_url}/api/"
        self.__key = api_key
        self._user_agent = user_agent
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s,
            connect=connect_timeout_s,
            sock_connect=connect_timeout_s,
            sock_read=request_timeout_s,
        )
        self._max_connections = max(1, max_connections)
        self._session = session
        self._owns_session = session is None
        # Every answer by HTTP status and every transport failure by kind, all endpoints.
        self.stats = stats

    def __repr__(self) -> str:
        return f"V7Client(base_url={self.base_url!r})"

    async def __aenter__(self) -> V7Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None and not self._session.closed:
            await self._session.close()
        if self._owns_session:
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=self._max_connections,
                keepalive_timeout=30.0,
            )
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_on_wire)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trace_configs=[trace]
            )
            self._owns_session = True
        return self._session

    # --- endpoints -------------------------------------------------------------------------

    async def token_info(self) -> dict[str, Any]:
        return self._expect_dict("users/token_info", await self._request("GET", "users/token_info"))

    async def datasets(self) -> list[dict[str, Any]]:
        return self._expect_list("datasets", await self._request("GET", "datasets"))

    async def storage_configs(self, team: str) -> list[dict[str, Any]]:
        path = f"teams/{_team(team)}/storage"
        return self._expect_list(path, await self._request("GET", path))

    async def register(self, team: str, readonly: bool, body: dict[str, Any]) -> dict[str, Any]:
        """POST a register_existing(_readonly) request; the parsed 200 response."""
        endpoint = "register_existing_readonly" if readonly else "register_existing"
        path = f"v2/teams/{_team(team)}/items/{endpoint}"
        return self._expect_dict(path, await self._request("POST", path, body=body))

    async def list_items(
        self,
        team: str,
        dataset_id: int,
        page_size: int = 500,
        page_from: str | None = None,
        *,
        item_names: Iterable[str] = (),
        item_paths: Iterable[str] = (),
    ) -> dict[str, Any]:
        """One page of a dataset's items (``page[from]`` is the cursor of the previous page),
        optionally filtered by exact item names and folder paths (``item_names[]``,
        ``item_paths[]``: the query parameters darwin-py sends, one per value)."""
        path = f"v2/teams/{_team(team)}/items"
        params: list[tuple[str, str]] = [
            ("page[size]", str(page_size)),
            ("dataset_ids[]", str(dataset_id)),
        ]
        params.extend(("item_names[]", n) for n in item_names)
        params.extend(("item_paths[]", p) for p in item_paths)
        if page_from:
            params.append(("page[from]", page_from))
        return self._expect_dict(path, await self._request("GET", path, params=params))

    async def find_item_ids(
        self,
        team: str,
        dataset_id: int,
        idents: Iterable[Ident],
        *,
        max_names: int = MAX_NAMES_PER_LOOKUP,
        page_size: int = 500,
        filter_paths: bool = False,
        slot: SlotFactory | None = None,
    ) -> dict[Ident, str]:
        """V7 ids of the items ``(path, name)`` that exist in the dataset; missing ones are
        simply absent from the result.

        One GET per at most ``max_names`` distinct names (``item_names[]``; fewer when the
        names are long, see ``lookup_chunks``), following ``page.next`` until every wanted
        item of the chunk was seen or the listing ends. Rows are matched on (normalised path,
        exact name): a name filter returns the name in every folder. ``filter_paths`` also
        sends the chunk's folders as ``item_paths[]`` (fewer rows when names repeat across
        folders; off by default because darwin-py does not pin down what V7 matches it
        against). Each request goes out inside ``slot()`` when given. Errors are mapped as for
        every other call (``RateLimited``, ``ServerError``, ``TransportError``, ...); an error
        loses the whole call (ids found before it are not returned).
        """
        wanted: dict[Ident, None] = {}
        for p, n in idents:
            wanted[(norm_path(p), str(n))] = None
        names = list(dict.fromkeys(n for _, n in wanted))
        found: dict[Ident, str] = {}
        for chunk in lookup_chunks(names, max_names):
            chunk_names = set(chunk)
            todo = {k for k in wanted if k[1] in chunk_names}
            folders = sorted({p for p, _ in todo}) if filter_paths else []
            cursor: str | None = None
            for _ in range(MAX_LOOKUP_PAGES):
                async with slot() if slot is not None else contextlib.nullcontext():
                    doc = await self.list_items(
                        team,
                        dataset_id,
                        page_size,
                        cursor,
                        item_names=chunk,
                        item_paths=folders,
                    )
                rows = doc.get("items")
                page = doc.get("page")
                if not isinstance(rows, list) or not isinstance(page, dict):
                    raise ServerError("GET items: expected 'items' (array) and 'page' (object)")
                for row in rows:
                    if not isinstance(row, dict) or not row.get("id"):
                        continue
                    key = (norm_path(row.get("path")), str(row.get("name", "")))
                    if key in todo:
                        found[key] = str(row["id"])
                        todo.discard(key)
                nxt = page.get("next")
                if not todo or nxt is None or nxt == "" or str(nxt) == cursor:
                    break
                cursor = str(nxt)
        return found

    # --- plumbing --------------------------------------------------------------------------

    def _headers(self, *, with_body: bool) -> dict[str, str]:
        headers = {
            "Authorization": f"ApiKey {self.__key}",
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }
        if with_body:
            headers["Content-Type"] = "application/json"
        return headers

    def _scrub(self, text: str) -> str:
        if self.__key and self.__key in text:
            text = text.replace(self.__key, REDACTED)
        return text

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> Any:
        session = self._get_session()
        data = orjson.dumps(body) if body is not None else None
        where = f"{method} {path}"
        started = time.monotonic()
        try:
            async with session.request(
                method,
                self._api_root + path,
                data=data,
                params=params,
                headers=self._headers(with_body=data is not None),
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await resp.read()
                retry_after = resp.headers.get("Retry-After")
                location = resp.headers.get("Location", "")
        except _TRANSPORT_ERRORS as e:
            if self.stats is not None:
                self.stats.transport_by_kind[transport_kind(e)] += 1
            detail = self._scrub(str(e)) or "no detail"
            log.debug("V7 %s failed: %s: %s", where, type(e).__name__, detail)
            raise TransportError(f"{where}: {type(e).__name__}: {detail}"[:1000]) from None
        if self.stats is not None:
            self.stats.http_statuses[status] += 1
        log.debug(
            "V7 %s -> %d in %.3f s (%d bytes)", where, status, time.monotonic() - started, len(raw)
        )
        if 200 <= status < 300:
            try:
                return orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                raise ServerError(
                    f"{where}: HTTP {status} with a body that is not JSON", status=status
                ) from None
        if 300 <= status < 400:
            # Not followed: a POST must not turn into a GET, nor the key go to another host.
            raise V7Error(
                f"{where}: HTTP {status}: V7 redirects to {self._scrub(location)[:200] or '?'}: "
                "set v7.base_url (or DARWIN_BASE_URL) to the final address",
                status=status,
            )
        raise self._error(where, status, raw, retry_after)

    def _error(self, where: str, status: int, raw: bytes, retry_after: str | None) -> V7Error:
        doc = _json_or_none(raw)
        detail = self._scrub(_detail(doc, raw))
        msg = f"{where}: HTTP {status}: {detail}" if detail else f"{where}: HTTP {status}"
        delay = parse_retry_after(retry_after, time.time())
        if status in (401, 403):
            return AuthError(f"{where}: HTTP {status}: the API key was refused", status=status)
        if status == 404:
            return NotFoundError(msg, status=status)
        if status == 429:
            if _error_code(doc) == QUOTA_CODE:
                return QuotaError(msg, status=status)
            return RateLimited(msg, status=status, delay_s=delay)
        if status == 408 or status >= 500:
            return ServerError(msg, status=status, delay_s=delay)
        return RejectedError(msg, status=status, detail=detail or f"HTTP {status}")

    @staticmethod
    def _expect_dict(path: str, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise ServerError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        return doc

    @staticmethod
    def _expect_list(path: str, doc: Any) -> list[dict[str, Any]]:
        if not isinstance(doc, list):
            raise ServerError(f"{path}: expected a JSON array, got {type(doc).__name__}")
        return [d for d in doc if isinstance(d, dict)]


def _json_or_none(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _error_code(doc: Any) -> str:
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, dict):
            return str(errors.get("code", ""))
        if isinstance(errors, list):
            for e in errors:
                if isinstance(e, dict) and e.get("code"):
                    return str(e["code"])
        if doc.get("code"):
            return str(doc["code"])
    return ""


def _detail(doc: Any, raw: bytes) -> str:
    """The server's explanation, short: errors.message, message, error, or the body itself."""
    text = ""
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, dict) and isinstance(errors.get("message"), str):
            text = errors["message"]
            if errors.get("code"):
                text = f"{errors['code']}: {text}"
        elif errors is not None:
            text = orjson.dumps(errors).decode()
        else:
            for key in ("message", "error", "detail"):
                if isinstance(doc.get(key), str):
                    text = doc[key]
                    break
            else:
                text = orjson.dumps(doc).decode()
    elif doc is not None:
        text = orjson.dumps(doc).decode()
    else:
        text = raw.decode("utf-8", "replace").strip()
    text = " ".join(text.split())
    return text[:MAX_DETAIL_CHARS] + ("…" if len(text) > MAX_DETAIL_CHARS else "")
