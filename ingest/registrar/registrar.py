"""Registration of batches: one request per batch, paced, retried, bisected, turned into outcomes.

``Registrar.register(items, sent_before)`` returns exactly one ``Outcome`` per input item, in
input order:

- listed in the response's ``items`` → REGISTERED with its V7 id;
- in ``blocked_items`` with ``ALREADY_EXISTS``, and we may have created it ourselves (it was
  sent by an earlier run — its attempt count, from ``Sending.mark_sent``, is above 1 — or an
  earlier attempt of this call ended without a clear answer: 5xx, timeout, reset) →
  REGISTERED, reason ``ALREADY_EXISTS after an earlier attempt of ours``, with the id when the
  entry carries one (else the caller looks it up); otherwise BLOCKED ``ALREADY_EXISTS``;
- blocked for any other reason → BLOCKED with that reason;
- neither → FAILED ``missing from V7 response`` (retryable);
- the batch refused as a whole (400/413/422) → the batch is bisected, each half sent on its
  own, down to single items: only the bad ones fail (with the server's message);
- 429 → the limiter pauses every sender and slows down; 5xx / transport errors → full-jitter
  retries; when the retry budget runs out → FAILED (retryable) with the last error;
- 401 / 404 / quota → ``AuthError`` / ``NotFoundError`` / ``QuotaError`` propagate: the run
  cannot go on;
- ``stop`` set (graceful shutdown) while a batch waits for a send slot or a retry →
  ``Interrupted``: the batch is not sent now; a request already on the wire is answered first.

Exactly-once: an item is marked SENT (``Sending.mark_sent``, committed) immediately before its
first POST — the commit starts ahead of the rate slot by its usual duration (at most 20 ms),
never while the batch waits for its turn — so after a stop or a
crash only items that may really have reached V7 are SENT. However a call ends (answered,
given up, stopped, cancelled), items whose requests were only ever refused outright (429,
400/413/422) have their attempt taken back (``unmark_sent``).

Every attempt takes a token from the limiter. The only waits are the limiter's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ingest.errors import (
    AuthError,
    Interrupted,
    NotFoundError,
    QuotaError,
    RateLimited,
    RejectedError,
    Retry,
    ServerError,
    TransportError,
)
from ingest.model import Item, Outcome, State
from ingest.registrar import wire
from ingest.registrar.budget import SendBudget
from ingest.registrar.retry import RetryPolicy
from ingest.registrar.wire import item_key
from ingest.stats import Stats

log = logging.getLogger("ingest.registrar")

ALREADY_EXISTS = "ALREADY_EXISTS"
OURS = "ALREADY_EXISTS after an earlier attempt of ours"
# Answers that prove V7 stored nothing of the request.
REFUSED = (RateLimited, RejectedError, AuthError, NotFoundError, QuotaError)
MISSING = "missing from V7 response"

Key = wire.Ident


class RegisterApi(Protocol):
    async def register(self, team: str, readonly: bool, body: dict[str, Any]) -> dict[str, Any]: ...


class Sending(Protocol):
    """The ledger's side of sending (``ingest.ledger.LedgerPort`` implements it)."""

    async def mark_sent(self, items: Sequence[Item]) -> list[int]: ...
    async def keep_claims(self, items: Sequence[Item]) -> None: ...
    async def unmark_sent(self, items: Sequence[Item]) -> None: ...


class DrySending:
    """For tests and dry runs: every item is on its first attempt; nothing is recorded."""

    async def mark_sent(self, items: Sequence[Item]) -> list[int]:
        return [1] * len(items)

    async def keep_claims(self, items: Sequence[Item]) -> None:
        return None

    async def unmark_sent(self, items: Sequence[Item]) -> None:
        return None


class Rng(Protocol):
    def random(self) -> float: ...


def _blocked_reasons(entry: dict[str, Any]) -> list[str]:
    reasons: list[str] = []
    for slot in entry.get("slots") or []:
        if isinstance(slot, dict) and slot.get("reason"):
            reasons.append(str(slot["reason"]))
    if entry.get("reason"):
        reasons.append(str(entry["reason"]))
    unique = list(dict.fromkeys(r.upper() for r in reasons))
    return unique or ["UNKNOWN"]


class Registrar:
    """Sends batches of item plans to V7's register endpoint and reports what became of each."""

    def __init__(
        self,
        client: RegisterApi,
        limiter: SendBudget,
        retry_policy: RetryPolicy,
        stats: Stats,
        *,
        target: wire.Target,
        keys: wire.KeyMap,
        readonly: bool,
        clock: Callable[[], float] | None = None,
        rng: Rng | None = None,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.retry_policy = retry_policy
        self.stats = stats
        self.target = target
        self.team = target.team
        self.keys = keys
        self.readonly = readonly
        self._clock = clock or limiter.now
        self._rng: Rng = rng or random.Random()
        stats.current_rate_per_s = limiter.rate

    def envelope(self, items: Sequence[Item]) -> dict[str, Any]:
        return wire.envelope(items, self.target, self.keys)

    async def register(
        self,
        items: Sequence[Item],
        sending: Sending,
        *,
        readonly: bool | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[Outcome]:
        """One Outcome per item, in order. Raises AuthError / NotFoundError / QuotaError, and
        Interrupted when ``stop`` is set while the batch waits for a send slot or a retry.

        ``readonly`` picks the endpoint for this batch (locally processed videos go through
        register_existing_readonly even on read-write storage); None = the storage's mode."""
        call = _Call(items=list(items), results=[None] * len(items), sending=sending)
        call.readonly = self.readonly if readonly is None else readonly
        call.stop = stop
        if items:
            try:
                await self._send(call, list(range(len(items))))
            finally:  # however the call ended: finished, gave up, stopped, cancelled
                back = self._never_reached(call)
                if back:
                    await asyncio.shield(call.sending.unmark_sent(back))
        out: list[Outcome] = []
        for plan, result in zip(call.items, call.results, strict=True):
            # Unreachable unless a bug: never drop an item silently.
            out.append(result or self._failed(plan, "not resolved by the registrar", True))
        return out

    @staticmethod
    def _never_reached(call: _Call) -> list[Item]:
        """Items marked SENT whose requests provably never reached V7's storage: never posted
        (the call was stopped or cancelled between the mark and the POST), or only ever
        refused outright (429, 400/413/422, 401/404, quota). Their attempt is taken back so a
        later ALREADY_EXISTS for them is not taken for ours. Anything else keeps it: answered
        200, a 5xx or a reset (may have been stored), an unknown error, or on the wire when
        cancelled."""
        out = []
        for i in sorted(call.marked):
            key = item_key(*call.items[i].ident)
            if key in call.reached or key in call.maybe_committed or key in call.on_wire:
                continue
            if key not in call.posted or key in call.refused:
                out.append(call.items[i])
        return out

    async def _mark(self, call: _Call, indices: list[int]) -> None:
        """SENT, once per item and call, right before its first request leaves; before every
        further request (a retry, a half of a bisected batch) our claims on the items already
        marked are checked and extended (``keep_claims``: ClaimLost stops the send, another
        process has them now). The commit is shielded: cancelled meanwhile, the items it
        marked are still known as marked (and taken back, since they never left)."""
        held = [call.items[i] for i in indices if i in call.marked]
        if held:
            await call.sending.keep_claims(held)
        fresh = [i for i in indices if i not in call.marked]
        if not fresh:
            return
        marking = asyncio.ensure_future(call.sending.mark_sent([call.items[i] for i in fresh]))
        try:
            attempts = await asyncio.shield(marking)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self._marked(call, fresh, await marking)
            raise
        self._marked(call, fresh, attempts)

    @staticmethod
    def _marked(call: _Call, fresh: list[int], attempts: list[int]) -> None:
        for i, n in zip(fresh, attempts, strict=True):
            call.marked.add(i)
            if n > 1:
                call.sent_before.add(item_key(*call.items[i].ident))

    # --- one batch (or half of one), with its retries --------------------------------------

    async def _send(self, call: _Call, indices: list[int]) -> None:
        plans = [call.items[i] for i in indices]
        body = self.envelope(plans)
        keys = [item_key(p.path, p.name) for p in plans]
        started = self._clock()
        attempt = 0
        while True:
            sent_at: float | None = None
            error: Retry
            try:
                # SENT is recorded once the booked slot has come, and the send time is
                # checked again after it: the ledger's commit never bunches two requests.
                mark = functools.partial(self._mark, call, indices)
                async with self.limiter.slot(call.stop, before_send=mark) as sent_at:
                    self.stats.requests += 1
                    if attempt:
                        self.stats.retries += 1
                    self.stats.in_flight += 1
                    asked_at = self._clock()
                    call.on_wire.update(keys)
                    call.posted.update(keys)
                    try:
                        response = await self.client.register(self.team, call.readonly, body)
                    except Exception as e:
                        # An error is an outcome too (429, 5xx, reset, timeout): its latency
                        # counts. A cancelled request (BaseException) got neither: not observed,
                        # and its items stay on the wire (they may have reached V7).
                        self._observe_latency(asked_at)
                        call.on_wire.difference_update(keys)
                        if isinstance(e, REFUSED):
                            call.refused.update(keys)  # answered: nothing was stored
                        elif not isinstance(e, Retry):
                            call.maybe_committed.update(keys)  # unknown: assume it may have been
                        raise
                    else:
                        self._observe_latency(asked_at)
                        call.on_wire.difference_update(keys)
                    finally:
                        self.stats.in_flight -= 1
            except RateLimited as e:
                self.stats.rate_limited += 1
                self.limiter.answered(sent_at, e)
                self.stats.record_pause(self.limiter.now(), self.limiter.controller.paused_until)
                error = e
            except RejectedError as e:
                self.limiter.answered(sent_at, e)
                self._update_rate()
                await self._rejected(call, indices, e)
                return
            except (ServerError, TransportError, Retry) as e:
                if isinstance(e, TransportError):
                    self.stats.transport_errors += 1
                else:
                    self.stats.server_errors += 1
                # No clear answer: the server may have stored the items before failing.
                call.maybe_committed.update(keys)
                error = e
            else:
                self.limiter.answered(sent_at)
                self._update_rate()
                call.reached.update(keys)
                self._resolve(call, indices, response)
                return
            self._update_rate()
            attempt += 1
            elapsed = self._clock() - started
            delay = self.retry_policy.next_delay(
                attempt - 1, elapsed, self._rng.random(), error.delay_s
            )
            if delay is None:
                reason = f"gave up after {attempt} attempts over {elapsed:.1f} s: {error}"
                log.warning("batch failed", extra={"items": len(indices), "reason": reason[:300]})
                for i in indices:
                    call.results[i] = self._failed(call.items[i], reason, True)
                return
            log.debug(
                "retrying batch",
                extra={
                    "items": len(indices),
                    "attempt": attempt,
                    "delay_s": round(delay, 3),
                    "error": str(error)[:200],
                },
            )
            try:
                await self.limiter.sleep(delay, call.stop)
            except Interrupted:
                raise Interrupted(f"stopped before retry {attempt} of a batch: {error}") from None

    def _observe_latency(self, asked_at: float) -> None:
        self.stats.request_latency_s.observe(self._clock() - asked_at)

    def _update_rate(self) -> None:
        self.stats.current_rate_per_s = self.limiter.rate
        self.stats.rate_cuts = self.limiter.controller.cuts

    async def _rejected(self, call: _Call, indices: list[int], error: RejectedError) -> None:
        """400/413/422: nothing was stored. Split until the bad items stand alone."""
        if len(indices) == 1:
            status = error.status if error.status is not None else "?"
            reason = f"rejected by V7 (HTTP {status}): {error.detail}"
            call.results[indices[0]] = self._failed(call.items[indices[0]], reason, False)
            return
        half = len(indices) // 2
        log.debug(
            "bisecting a refused batch",
            extra={"items": len(indices), "status": error.status, "detail": error.detail[:200]},
        )
        await self._send(call, indices[:half])
        await self._send(call, indices[half:])

    # --- outcomes --------------------------------------------------------------------------

    def _resolve(self, call: _Call, indices: list[int], response: dict[str, Any]) -> None:
        pending: dict[Key, list[int]] = {}
        for i in indices:
            plan = call.items[i]
            pending.setdefault(item_key(plan.path, plan.name), []).append(i)

        def take(entry: object) -> tuple[int, dict[str, Any]] | None:
            if not isinstance(entry, dict) or "name" not in entry:
                return None
            waiting = pending.get(item_key(entry.get("path"), entry["name"]))
            if not waiting:
                log.debug("V7 answered for an item we did not send in this request")
                return None
            return waiting.pop(0), entry

        for entry in response.get("items") or []:
            hit = take(entry)
            if hit is not None:
                i, doc = hit
                plan = call.items[i]
                call.results[i] = Outcome(
                    plan.path, plan.name, State.REGISTERED, v7_id=str(doc.get("id") or "")
                )
        for entry in response.get("blocked_items") or []:
            hit = take(entry)
            if hit is None:
                continue
            i, doc = hit
            plan = call.items[i]
            key = item_key(plan.path, plan.name)
            reasons = _blocked_reasons(doc)
            if ALREADY_EXISTS in reasons:
                if key in call.sent_before or key in call.maybe_committed:
                    self.stats.already_exists_ours += 1
                    call.results[i] = Outcome(
                        plan.path,
                        plan.name,
                        State.REGISTERED,
                        v7_id=str(doc.get("id") or ""),
                        reason=OURS,
                    )
                else:
                    call.results[i] = Outcome(
                        plan.path, plan.name, State.BLOCKED, reason=ALREADY_EXISTS
                    )
            else:
                call.results[i] = Outcome(
                    plan.path, plan.name, State.BLOCKED, reason=",".join(reasons)
                )
        for waiting in pending.values():
            for i in waiting:
                call.results[i] = self._failed(call.items[i], MISSING, True)

    @staticmethod
    def _failed(plan: Item, reason: str, retryable: bool) -> Outcome:
        return Outcome(plan.path, plan.name, State.FAILED, reason=reason, retryable=retryable)


class _Call:
    """State shared by the requests of one ``register`` call (its bisections and retries)."""

    __slots__ = (
        "items",
        "marked",
        "maybe_committed",
        "on_wire",
        "posted",
        "reached",
        "readonly",
        "refused",
        "results",
        "sending",
        "sent_before",
        "stop",
    )

    def __init__(self, items: list[Item], results: list[Outcome | None], sending: Sending) -> None:
        self.items = items
        self.results = results
        self.sending = sending
        self.marked: set[int] = set()  # indices marked SENT by this call
        self.reached: set[Key] = set()  # answered 200 by V7
        self.posted: set[Key] = set()  # in at least one request that left
        self.refused: set[Key] = set()  # in a request V7 refused outright (nothing stored)
        self.on_wire: set[Key] = set()  # in a request that has not been answered yet
        self.sent_before: set[Key] = set()  # sent by an earlier run (attempts > 1)
        self.maybe_committed: set[Key] = set()
        self.readonly = False
        self.stop: asyncio.Event | None = None
