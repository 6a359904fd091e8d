"""Policy persistence: history in Postgres, current policy in memory, changes fanned out over
Redis pub/sub so every replica switches at once without a database read per request."""
from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.chassis.errors import AppError

from .models import policies
from .policy import Policy

log = logging.getLogger("aistack.orchestrator.policy")
CHANNEL = "orchestrator:policy"


class PolicyStore:
    def __init__(self, engine: AsyncEngine, redis: aioredis.Redis):
        self.engine, self.redis = engine, redis
        self.current: dict[str, Policy] = {}
        self._listener: asyncio.Task | None = None

    def get(self, model: str) -> Policy:
        return self.current.get(model) or Policy()

    async def load(self, model: str | None = None) -> None:
        newest = select(func.max(policies.c.id)).group_by(policies.c.model)
        query = select(policies.c.model, policies.c.policy).where(policies.c.id.in_(newest))
        if model:
            query = query.where(policies.c.model == model)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        for m, p in rows:
            self.current[m] = Policy.model_validate(p)

    async def set(self, model: str, policy: Policy, author: str, reason: str = "") -> dict:
        async with self.engine.begin() as conn:
            row = (await conn.execute(
                insert(policies).values(model=model, policy=policy.model_dump(mode="json"), author=author,
                                        reason=reason).returning(policies)
            )).mappings().one()
        self.current[model] = policy
        try:
            await self.redis.publish(CHANNEL, model)
        except aioredis.RedisError:
            # Others pick the change up on their periodic reload; this replica already has it.
            log.warning("policy change not broadcast: redis unavailable", extra={"model": model})
        return _record(row)

    async def history(self, model: str, limit: int = 100) -> list[dict]:
        query = (select(policies).where(policies.c.model == model).order_by(policies.c.id.desc()).limit(limit))
        async with self.engine.connect() as conn:
            return [_record(r) for r in (await conn.execute(query)).mappings()]

    async def rollback(self, model: str, to_id: int | None, author: str) -> dict:
        """Re-apply an earlier policy as a new history entry (default: the one before the current)."""
        history = await self.history(model, limit=1000)
        if to_id is None:
            if len(history) < 2:
                raise AppError(409, "nothing_to_roll_back", f"model '{model}' has no earlier policy")
            target = history[1]
        else:
            target = next((h for h in history if h["id"] == to_id), None)
            if target is None:
                raise AppError(404, "policy_not_found", f"model '{model}' has no policy {to_id}")
        return await self.set(model, Policy.model_validate(target["policy"]), author,
                              f"rollback to policy {target['id']}")

    # -- live updates -----------------------------------------------------------------------
    def start(self, reload_every_s: float = 30.0) -> None:
        self._listener = asyncio.create_task(self._listen(reload_every_s))

    async def stop(self) -> None:
        if self._listener:
            # redis-py's pubsub can swallow a cancellation (then waits out its read timeout): repeat it.
            while not self._listener.done():
                self._listener.cancel()
                await asyncio.wait({self._listener}, timeout=1.0)
            await asyncio.gather(self._listener, return_exceptions=True)

    async def _listen(self, reload_every_s: float) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    await self.load()  # catch up on anything missed while unsubscribed
                    while True:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=reload_every_s)
                        if msg is None:
                            await self.load()
                        else:
                            await self.load(msg["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis or db outage: keep serving the policies we hold
                if asyncio.current_task().cancelling():  # stop() cancelled us; the client turned it into this
                    raise asyncio.CancelledError from exc
                log.warning("policy listener error; retrying", extra={"error": str(exc)})
                await asyncio.sleep(2.0)


def _record(row) -> dict:
    return {"id": row["id"], "model": row["model"], "policy": row["policy"], "author": row["author"],
            "reason": row["reason"], "created_at": row["created_at"].isoformat()}
