"""Sending stage: batches to V7 through the registrar, outcomes to the ledger and the stats.

The registrar marks a batch SENT through the ledger only once its rate slot is granted
(see ``ingest.registrar.registrar``); a batch interrupted before it left stays PLANNED.
Items confirmed through ALREADY_EXISTS without an id go to the id resolver.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from ingest.errors import ClaimLost, Interrupted
from ingest.ledger import LedgerPort
from ingest.model import Item, Outcome, State
from ingest.registrar.registrar import Sending
from ingest.stats import Stats, count_reason

log = logging.getLogger("ingest.pipeline")


class Register(Protocol):
    async def register(
        self,
        items: Sequence[Item],
        sending: Sending,
        *,
        readonly: bool | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[Outcome]: ...


class Resolve(Protocol):
    """Looks up V7 ids later (ingest.registrar.lookup.IdResolver)."""

    def add(self, idents: Sequence[tuple[str, str]]) -> None: ...


class Sender:
    def __init__(
        self,
        registrar: Register,
        ledger: LedgerPort,
        stats: Stats,
        *,
        stop: asyncio.Event,
        failed: Callable[[str], None],
        resolver: Resolve | None = None,
    ) -> None:
        self.registrar = registrar
        self.ledger = ledger
        self.stats = stats
        self.stop = stop
        self._failed = failed
        self.resolver = resolver

    async def loop(self, batches: asyncio.Queue[list[Item] | None]) -> None:
        while (batch := await batches.get()) is not None:
            if not self.stop.is_set():  # after a stop: not sent, still PLANNED in the ledger
                await self.send(batch)
        await batches.put(None)  # let the other senders see the end too

    async def send(self, batch: list[Item]) -> None:
        try:
            outcomes = await self.registrar.register(
                batch, self.ledger, readonly=batch[0].readonly_endpoint, stop=self.stop
            )
        except Interrupted as e:
            log.info("batch left for the next run", extra={"items": len(batch), "why": str(e)})
            return
        except ClaimLost as e:  # nothing was marked SENT, nothing sent: another process has it
            log.warning(str(e), extra={"items": len(batch)})
            lost = set(e.idents)
            # The rest of the batch is still ours but unsent: give it back to be taken again.
            await self.ledger.release_claims([it.ident for it in batch if it.ident not in lost])
            return
        try:
            await self.ledger.record_outcomes(outcomes)
        except ClaimLost as e:
            # Paused past our claims: another process took these items over and records
            # them; ours are refused (the rest is committed) and not counted here.
            log.warning(str(e), extra={"items": len(e.idents)})
            refused = set(e.idents)
            outcomes = [o for o in outcomes if (o.path, o.name) not in refused]
        missing: list[tuple[str, str]] = []
        objects = {i.ident: len(i.keys) for i in batch}
        for o in outcomes:
            if o.state is State.REGISTERED:
                self.stats.registered += 1
                self.stats.registered_objects += objects.get((o.path, o.name), 1)
                if not o.v7_id:
                    missing.append((o.path, o.name))
            elif o.state is State.BLOCKED:
                self.stats.blocked += 1
                count_reason(self.stats.blocked_by_reason, o.reason)
            else:
                self._failed(o.reason)
        if missing and self.resolver is not None:
            self.resolver.add(missing)
