"""Auth's revocations, kept in memory at each gateway replica (issue 13; docs/security.md).

Auth publishes per-subject not-before times in the Redis hash `auth:revocations` and announces each
change on the channel `auth:revocations:events` (services/auth/revocation.py). This replica
subscribes first, then loads the whole hash, and applies every event as it arrives: the check on
each request is a dictionary lookup, no network round trip. The whole hash is reloaded on a
`resync` event, after a reconnect and every `reload_s`.

Failing closed: while the subscription is down the map may be missing revocations, so once it has
been down for longer than `grace_s` every authenticated request answers 503 until it is back.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from prometheus_client import Counter, Gauge

from services.chassis.errors import AppError

log = logging.getLogger("aistack.gateway.revocation")

REVOCATIONS_HASH = "auth:revocations"
REVOCATIONS_CHANNEL = "auth:revocations:events"
EVENTS = Counter("aistack_gateway_revocation_events_total", "Revocation events applied", ["kind"])
ENTRIES = Gauge("aistack_gateway_revocation_entries", "Revocation entries held in memory")
STALE = Counter("aistack_gateway_revocation_stale_total", "Requests refused: revocation state too old")


class RevocationMap:
    def __init__(self, redis, grace_s: float = 3.0, reload_s: float = 60.0, ping_s: float = 0.5):
        self.redis, self.grace_s, self.reload_s, self.ping_s = redis, grace_s, reload_s, ping_s
        self.entries: dict[str, float] = {}
        self.alive_at: float | None = None  # monotonic time the subscription last proved alive
        self.ready = asyncio.Event()

    # -- the per-request check ------------------------------------------------------------------
    def not_before(self, *subjects: str) -> float:
        """The latest not-before of these subjects; raises 503 if the map cannot be trusted now."""
        if self.alive_at is None or time.monotonic() - self.alive_at > self.grace_s:
            STALE.inc()
            raise AppError(503, "revocation_state_unavailable",
                           "cannot confirm that this credential is still valid; try again shortly",
                           headers={"Retry-After": "2"})
        get = self.entries.get
        return max((get(s, 0.0) for s in subjects), default=0.0)

    # -- keeping it current ---------------------------------------------------------------------
    def apply(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
            subject, nb = str(event["subject"]), float(event["not_before"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable revocation event")
            return
        if nb > self.entries.get(subject, 0.0):
            self.entries[subject] = nb
        EVENTS.labels("event").inc()
        ENTRIES.set(len(self.entries))

    async def load(self) -> None:
        raw = await self.redis.hgetall(REVOCATIONS_HASH)
        entries = {}
        for k, v in raw.items():
            with contextlib.suppress(ValueError):
                entries[k.decode() if isinstance(k, bytes) else k] = float(v)
        # Events that arrived while loading are newer than nothing: keep the larger value.
        for k, v in self.entries.items():
            if k in entries and v > entries[k]:
                entries[k] = v
        self.entries = entries
        EVENTS.labels("load").inc()
        ENTRIES.set(len(entries))

    async def _session(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(REVOCATIONS_CHANNEL)
            await self.load()  # after subscribing: nothing published meanwhile is missed
            loaded = last_ping = time.monotonic()
            self.alive_at = loaded
            self.ready.set()
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=self.ping_s)
                now = time.monotonic()
                if msg is not None and msg.get("type") == "message":
                    data = msg["data"]
                    if b'"resync"' in (data if isinstance(data, bytes) else data.encode()):
                        await self.load()
                        loaded = now
                    else:
                        self.apply(data)
                    self.alive_at = now
                elif msg is not None:  # pong or subscribe confirmation: the connection is alive
                    self.alive_at = now
                if now - last_ping >= self.ping_s:
                    await pubsub.ping()
                    last_ping = now
                if now - loaded >= self.reload_s:
                    await self.load()
                    loaded = now
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def run(self) -> None:
        """Forever: (re)subscribe and follow the channel; back off while Redis is unreachable."""
        backoff = 0.2
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect; requests fail closed after grace_s
                log.warning("revocation subscription lost: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.2
