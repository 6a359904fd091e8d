"""Revocation: per-subject not-before times, auth's published contract to the gateways (issue 13).

Postgres (`auth.revocations`) is the truth. Every change is mirrored into the Redis hash
`auth:revocations` (field -> not-before, epoch seconds as a decimal string) and announced on the
pub/sub channel `auth:revocations:events` (JSON {"subject", "not_before"}, or {"resync": true}
after a bulk change). A gateway loads the hash at start, subscribes, and refuses on each request,
from memory:

- `user:<id>`: every access token of that user with iat < not-before, and any API key of that user
  (as owner) whose cached introspection answer is older than not-before;
- `sid:<family>`: the access tokens of one session (logout);
- `apikey:<id>`: a cached introspection answer of that key older than not-before.

Entries live for `horizon_s` (the access-token lifetime plus margins): after that every token they
could refuse has expired and every cache has been refreshed, so they are pruned, and with them the
subject ids they carry. A sync loop re-mirrors Postgres into Redis every `sync_s` seconds, which
covers changes made without Redis (the `aistack users` CLI) and a failed publish.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from prometheus_client import Counter
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from .models import Revocation

log = logging.getLogger("aistack.auth.revocation")

REVOCATIONS_HASH = "auth:revocations"
REVOCATIONS_CHANNEL = "auth:revocations:events"
PUBLISH_ERRORS = Counter("aistack_auth_revocation_publish_errors_total",
                         "Revocations not mirrored to Redis at once (the sync loop retries)")


class Revocations:
    def __init__(self, sessions: async_sessionmaker, redis, horizon_s: float, sync_s: float = 2.0):
        self.sessions, self.redis, self.horizon_s, self.sync_s = sessions, redis, horizon_s, sync_s

    async def revoke(self, *subjects: str) -> float:
        """Credentials of these subjects issued before now are dead; returns the not-before time.

        Called after the state change has committed, so an introspection or a token issued from
        the old state is always older than the not-before it finds."""
        if not subjects:
            return 0.0
        nb = round(time.time(), 3)
        rows = [{"subject": s, "not_before": nb} for s in dict.fromkeys(subjects)]
        async with self.sessions.begin() as session:
            stmt = pg_insert(Revocation).values(rows)
            await session.execute(stmt.on_conflict_do_update(
                index_elements=["subject"], set_={"not_before": stmt.excluded.not_before}))
        await self._publish({r["subject"]: nb for r in rows})
        return nb

    async def _publish(self, entries: dict[str, float]) -> bool:
        if self.redis is None:
            return False
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(REVOCATIONS_HASH, mapping={k: repr(v) for k, v in entries.items()})
                for subject, nb in entries.items():
                    pipe.publish(REVOCATIONS_CHANNEL, json.dumps({"subject": subject, "not_before": nb}))
                await pipe.execute()
            return True
        except Exception as exc:  # noqa: BLE001 - Postgres has it; the sync loop mirrors it soon
            PUBLISH_ERRORS.inc()
            log.warning("revocation not published to Redis yet: %s", exc)
            return False

    async def not_before(self, *subjects: str) -> float:
        """The latest not-before of these subjects (0 when none): auth's own per-request check."""
        async with self.sessions() as session:
            values = await session.scalars(select(Revocation.not_before).where(Revocation.subject.in_(subjects)))
            return max(values, default=0.0)

    async def sync(self) -> int:
        """Prune expired entries, then make the Redis hash equal to Postgres; announce any change."""
        cutoff = time.time() - self.horizon_s
        async with self.sessions.begin() as session:
            await session.execute(delete(Revocation).where(Revocation.not_before < cutoff))
            rows = {r.subject: r.not_before for r in await session.scalars(select(Revocation))}
        if self.redis is None:
            return 0
        current = {(k.decode() if isinstance(k, bytes) else k): float(v)
                   for k, v in (await self.redis.hgetall(REVOCATIONS_HASH)).items()}
        stale = [k for k in current if k not in rows]
        changed = {k: v for k, v in rows.items() if current.get(k) != v}
        if stale:
            await self.redis.hdel(REVOCATIONS_HASH, *stale)
        if changed:
            await self.redis.hset(REVOCATIONS_HASH, mapping={k: repr(v) for k, v in changed.items()})
        if stale or changed:
            await self.redis.publish(REVOCATIONS_CHANNEL, json.dumps({"resync": True}))
        return len(changed) + len(stale)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - Redis or Postgres down: next round
                log.warning("revocation sync failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sync_s)
