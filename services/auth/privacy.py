"""Audit log and data subjects (docs/privacy.md), framework-free like service.py.

Audit: auth's own admin actions are inserted directly; other services append to the Redis stream
`auth:audit:events` (services/chassis/internal.py) and `AuditLog.consume` stores those entries
(consumer group `auth`, acknowledged after the insert commits, idempotent on the entry id).

Data subject: a user. Their principals, as the gateway names callers in X-Principal, are the user
id and `apikey:<id>` of each API key they own; their linked entities are the rows of
`auth.subject_links` (admin-managed: which customer ids are this person). Export gathers auth's own
rows and asks the owners' internal APIs (pipeline, orchestrator, features) for theirs.

Erasure is a state machine kept in `auth.erasures` (issue 20): *frozen* (the account and all its
keys disabled, every token and cached key revoked at every gateway, in one step, before anything is
erased) -> *erasing* (each service's erase called, and retried until it confirms; a service that
stays down leaves the erasure pending and the background loop retries it) -> *done* (the account,
its keys, sessions and links deleted; the audit record lists which services confirmed and when).
The key rows (id -> owner) live until the end, so data written under `apikey:<id>` is always found.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from services.chassis.errors import AppError
from services.chassis.internal import AUDIT_STREAM, internal_headers

from .models import ApiKey, AuditEntry, Erasure, RefreshToken, SubjectLink, User

log = logging.getLogger("aistack.auth.privacy")
GROUP = "auth"
ERASING_SERVICES = ("pipeline", "orchestrator", "features")
_DEV_SALT = "aistack-development-audit-salt"


def _s(fields: dict, key: str) -> str:
    v = fields.get(key.encode(), fields.get(key, b""))
    return v.decode() if isinstance(v, bytes) else str(v)


def audit_view(e: AuditEntry) -> dict:
    return {"id": e.id, "time": e.time, "service": e.service, "actor": e.actor, "actor_role": e.actor_role,
            "action": e.action, "target": e.target, "details": e.details}


class AuditLog:
    def __init__(self, sessions: async_sessionmaker, redis=None):
        self.sessions, self.redis = sessions, redis

    async def record(self, actor: str, action: str, target: str = "", *, actor_role: str = "",
                     details: dict | None = None, service: str = "auth") -> None:
        async with self.sessions.begin() as session:
            session.add(AuditEntry(service=service, actor=actor or "unknown", actor_role=actor_role or "",
                                   action=action, target=target or "", details=details or {}))

    async def list(self, *, action: str | None = None, actor: str | None = None, target: str | None = None,
                   service: str | None = None, since: datetime | None = None, until: datetime | None = None,
                   before_id: int | None = None, limit: int = 100) -> list[dict]:
        q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        for col, value in ((AuditEntry.actor, actor), (AuditEntry.target, target), (AuditEntry.service, service)):
            if value:
                q = q.where(col == value)
        if action:  # "policy" matches policy.set and policy.rollback
            q = q.where((AuditEntry.action == action) | AuditEntry.action.startswith(action + "."))
        if since:
            q = q.where(AuditEntry.time >= since)
        if until:
            q = q.where(AuditEntry.time < until)
        if before_id:
            q = q.where(AuditEntry.id < before_id)
        async with self.sessions() as session:
            return [audit_view(e) for e in await session.scalars(q)]

    # -- the stream of the other services ------------------------------------------------------
    async def store_entries(self, entries: list) -> int:
        rows = []
        for entry_id, fields in entries:
            sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            try:
                details = orjson.loads(fields.get(b"details") or b"{}")
                when = datetime.fromtimestamp(float(_s(fields, "time") or 0), UTC)
            except (ValueError, TypeError):
                details, when = {"unreadable": True}, datetime.now(UTC)
            rows.append({"time": when, "service": _s(fields, "service")[:32] or "unknown",
                         "actor": _s(fields, "actor")[:200] or "unknown", "actor_role": _s(fields, "actor_role")[:32],
                         "action": _s(fields, "action")[:64] or "unknown", "target": _s(fields, "target")[:300],
                         "details": details if isinstance(details, dict) else {"value": details}, "stream_id": sid})
        if rows:
            async with self.sessions.begin() as session:
                await session.execute(pg_insert(AuditEntry).values(rows).on_conflict_do_nothing(
                    index_elements=["stream_id"]))
        return len(rows)

    async def consume_once(self, consumer: str, block_ms: int | None = 2000, count: int = 200) -> int:
        """Store one batch: entries other consumers left pending (dead replica) first, then new ones."""
        stored = 0
        claimed = await self.redis.xautoclaim(AUDIT_STREAM, GROUP, consumer, min_idle_time=30_000,
                                              start_id="0-0", count=count)
        stale = [e for e in claimed[1] if e[1]]
        for entries in (stale, await self._read(consumer, "0", count, None), await self._read(consumer, ">",
                                                                                               count, block_ms)):
            entries = [e for e in entries if e[1]]
            if entries:
                stored += await self.store_entries(entries)
                await self.redis.xack(AUDIT_STREAM, GROUP, *[i for i, _ in entries])
        return stored

    async def _read(self, consumer: str, start: str, count: int, block_ms: int | None) -> list:
        got = await self.redis.xreadgroup(GROUP, consumer, {AUDIT_STREAM: start}, count=count, block=block_ms)
        return got[0][1] if got else []

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(AUDIT_STREAM, GROUP, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def consume(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; Redis or Postgres trouble is retried (entries stay pending).

        Stopping by event, not by cancelling a blocked XREADGROUP, lets shutdown finish cleanly.
        """
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        while not stop.is_set():
            try:
                await self.ensure_group()
                while not stop.is_set():
                    await self.consume_once(consumer, block_ms=500)
            except Exception as exc:  # noqa: BLE001 - Redis or Postgres down: retry, entries stay pending
                log.warning("audit stream consumer error; retrying: %s", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)


class Subjects:
    """Export and erasure of a user's data across the services."""

    def __init__(self, sessions: async_sessionmaker, audit: AuditLog, http: httpx.AsyncClient, settings,
                 revocations=None):
        self.sessions, self.audit, self.http, self.s = sessions, audit, http, settings
        self.revocations = revocations
        if not settings.audit_salt:
            log.warning("AUTH_AUDIT_SALT is not set: erasure records hash subjects with a fixed development "
                        "salt. Set it in any shared deployment.")
        self.salt = (settings.audit_salt or _DEV_SALT).encode()

    def subject_hash(self, user_id: str) -> str:
        """A keyed hash: the same subject always gets the same value, unguessable without the salt."""
        return hmac.new(self.salt, str(user_id).encode(), hashlib.sha256).hexdigest()[:32]

    async def _state(self, uid: uuid.UUID):
        async with self.sessions() as session:
            user = await session.get(User, uid)
            keys = list(await session.scalars(select(ApiKey).where(ApiKey.owner_id == uid).order_by(ApiKey.created_at)))
            links = list(await session.scalars(select(SubjectLink).where(SubjectLink.user_id == uid)
                                               .order_by(SubjectLink.entity, SubjectLink.entity_id)))
            sessions_ = list(await session.scalars(select(RefreshToken).where(RefreshToken.user_id == uid)
                                                   .order_by(RefreshToken.created_at)))
        return user, keys, links, sessions_

    @staticmethod
    def principals(uid: uuid.UUID, keys: list[ApiKey]) -> list[str]:
        return [str(uid), *[f"apikey:{k.id}" for k in keys]]

    @staticmethod
    def _entities(links: list[SubjectLink]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for link in links:
            out.setdefault(link.entity, []).append(link.entity_id)
        return out

    async def _call(self, service: str, method: str, path: str, *, params=None, body=None) -> dict:
        base = {"orchestrator": self.s.orchestrator_url, "pipeline": self.s.pipeline_url,
                "features": self.s.features_url}[service].rstrip("/")
        try:
            r = await self.http.request(method, base + path, params=params,
                                        content=orjson.dumps(body) if body is not None else None,
                                        headers={**internal_headers(self.s.internal_token),
                                                 **({"content-type": "application/json"} if body is not None else {})})
        except httpx.HTTPError as exc:
            raise AppError(503, "subject_service_unavailable", f"{service} is unreachable; retry later",
                           {"service": service, "error": type(exc).__name__}, headers={"Retry-After": "5"}) from None
        if r.status_code != 200:
            raise AppError(503 if r.status_code >= 500 else 502, "subject_service_error",
                           f"{service} answered {r.status_code}; retry later", {"service": service},
                           headers={"Retry-After": "5"})
        return r.json()

    async def api_key_owner(self, key_id: str) -> uuid.UUID | None:
        try:
            kid = uuid.UUID(str(key_id))
        except ValueError:
            return None
        async with self.sessions() as session:
            return await session.scalar(select(ApiKey.owner_id).where(ApiKey.id == kid))

    # -- links ---------------------------------------------------------------------------------
    async def links(self, user_id: uuid.UUID) -> list[dict]:
        _, _, links, _ = await self._state(user_id)
        return [{"entity": lk.entity, "entity_id": lk.entity_id, "created_at": lk.created_at} for lk in links]

    async def link(self, user_id: uuid.UUID, entity: str, entity_id: str) -> None:
        async with self.sessions.begin() as session:
            await session.execute(pg_insert(SubjectLink).values(user_id=user_id, entity=entity, entity_id=entity_id)
                                  .on_conflict_do_nothing())

    async def unlink(self, user_id: uuid.UUID, entity: str, entity_id: str) -> int:
        async with self.sessions.begin() as session:
            return (await session.execute(delete(SubjectLink).where(
                SubjectLink.user_id == user_id, SubjectLink.entity == entity,
                SubjectLink.entity_id == entity_id))).rowcount

    # -- export --------------------------------------------------------------------------------
    async def export(self, user_id: uuid.UUID) -> dict:
        user, keys, links, sessions_ = await self._state(user_id)
        if user is None:
            raise AppError(404, "user_not_found", "no such user")
        out: dict[str, Any] = {
            "generated_at": datetime.now(UTC),
            "account": {"id": user.id, "email": user.email, "role": user.role, "disabled": user.disabled,
                        "created_at": user.created_at},
            # Key metadata only: the key itself is never stored, its hash is never exported.
            "api_keys": [{"id": k.id, "prefix": k.prefix, "name": k.name, "role": k.role, "scopes": k.scopes,
                          "created_at": k.created_at, "expires_at": k.expires_at, "last_used_at": k.last_used_at,
                          "revoked_at": k.revoked_at} for k in keys],
            "sessions": [{"created_at": t.created_at, "expires_at": t.expires_at, "used_at": t.used_at,
                          "revoked_at": t.revoked_at} for t in sessions_],
            "linked_entities": [{"entity": lk.entity, "entity_id": lk.entity_id} for lk in links],
            "principals": self.principals(user.id, keys),
            "predictions": [], "feedback": [], "jobs": [], "prediction_log": [], "feedback_log": [],
            "features": [],
        }
        for principal in out["principals"]:
            await self._principal_data(out, principal)
        for entity, ids in self._entities(links).items():
            out["features"].append(await self._call("features", "GET", "/internal/subjects",
                                                    params={"entity": entity, "ids": ids}))
        return out

    async def export_key(self, key_id: str) -> dict:
        """What one API key's principal did: that key's metadata and data, nothing of its owner's."""
        try:
            kid = uuid.UUID(str(key_id))
        except ValueError:
            raise AppError(404, "api_key_not_found", "no such API key") from None
        async with self.sessions() as session:
            k = await session.get(ApiKey, kid)
        if k is None:
            raise AppError(404, "api_key_not_found", "no such API key")
        principal = f"apikey:{k.id}"
        out: dict[str, Any] = {
            "generated_at": datetime.now(UTC), "principals": [principal],
            "api_key": {"id": k.id, "prefix": k.prefix, "name": k.name, "role": k.role, "scopes": k.scopes,
                        "created_at": k.created_at, "expires_at": k.expires_at, "last_used_at": k.last_used_at},
            "predictions": [], "feedback": [], "jobs": [], "prediction_log": [], "feedback_log": []}
        await self._principal_data(out, principal)
        return out

    async def _principal_data(self, out: dict, principal: str) -> None:
        """Add what the pipeline and the orchestrator hold under one principal to an export."""
        quoted = "/internal/subjects/" + quote(principal, safe="")
        pipe = await self._call("pipeline", "GET", quoted)
        orch = await self._call("orchestrator", "GET", quoted)
        for name, src in (("predictions", pipe), ("feedback", pipe), ("jobs", pipe),
                          ("prediction_log", orch), ("feedback_log", orch)):
            out[name] += [{**item, "principal": principal} for item in src.get(name, [])]

    # -- erase ---------------------------------------------------------------------------------
    async def erase(self, user_id: uuid.UUID, *, actor: str, actor_role: str, by_self: bool) -> dict:
        """Freeze the subject, erase them in every service (retried), then delete the account.

        Idempotent: erasing again (or an id whose account is gone) removes what is left. When a
        service does not confirm within the request's retries the answer says `pending` and lists
        it; the background loop (`run`) keeps retrying until it confirms."""
        erasure_id = await self.freeze(user_id, actor=actor, actor_role=actor_role, by_self=by_self)
        return await self.advance(erasure_id, attempts=self.s.erase_attempts)

    async def freeze(self, user_id: uuid.UUID, *, actor: str, actor_role: str, by_self: bool) -> uuid.UUID:
        """Step 1, before any service erases: account disabled, every key revoked, every session
        ended, all of it revoked at every gateway. Reuses a pending erasure of the same subject."""
        subject = self.subject_hash(str(user_id))
        async with self.sessions.begin() as session:
            await session.execute(update(User).where(User.id == user_id).values(disabled=True))
            await session.execute(update(ApiKey).where(ApiKey.owner_id == user_id, ApiKey.revoked_at.is_(None))
                                  .values(revoked_at=datetime.now(UTC)))
            await session.execute(update(RefreshToken).where(RefreshToken.user_id == user_id,
                                                             RefreshToken.revoked_at.is_(None))
                                  .values(revoked_at=datetime.now(UTC)))
            key_ids = list(await session.scalars(select(ApiKey.id).where(ApiKey.owner_id == user_id)))
            pending = await session.scalar(select(Erasure).where(Erasure.user_id == user_id, Erasure.state != "done")
                                           .with_for_update())
            if pending is None:
                pending = Erasure(id=uuid.uuid4(), subject_hash=subject, user_id=user_id, state="frozen",
                                  requested_by="subject" if by_self else "admin",
                                  actor=f"subject:{subject}" if by_self else actor, actor_role=actor_role or "",
                                  confirmed={}, attempts=0)
                session.add(pending)
            erasure_id = pending.id
        if self.revocations is not None:
            await self.revocations.revoke(f"user:{user_id}", *[f"apikey:{k}" for k in key_ids])
        # Requests already past a gateway's check when the revocation landed finish first.
        await asyncio.sleep(self.s.erase_settle_s)
        return erasure_id

    async def advance(self, erasure_id: uuid.UUID, attempts: int = 1) -> dict:
        """Steps 2 and 3: call every service that has not confirmed yet, then finish if all did."""
        for attempt in range(max(1, attempts)):
            async with self.sessions() as session:
                e = await session.get(Erasure, erasure_id)
            if e is None or e.state == "done":
                return {"erasure_id": erasure_id.hex, "state": "done"}
            confirmed, error = dict(e.confirmed or {}), None
            try:
                await self._erase_services(e.user_id, confirmed)
            except AppError as exc:
                error = exc.message
            async with self.sessions.begin() as session:
                row = await session.get(Erasure, erasure_id, with_for_update=True)
                row.confirmed, row.attempts = confirmed, row.attempts + 1
                row.state, row.last_error = ("erasing", error) if error else (row.state, None)
            if error is None:
                return await self._finish(erasure_id)
            log.warning("erasure pending (attempt %d): %s", attempt + 1, error)
            if attempt + 1 < attempts:
                await asyncio.sleep(min(2.0 ** attempt, self.s.erase_retry_s))
        return {"erasure_id": erasure_id.hex, "subject_hash": e.subject_hash, "state": "pending",
                "confirmed": confirmed, "pending": [s for s in ERASING_SERVICES if s not in confirmed],
                "error": error}

    async def _erase_services(self, user_id: uuid.UUID, confirmed: dict) -> None:
        """Each service in turn; one that confirms is recorded with its counts and time and never
        called again for this erasure. Raises AppError for the first that does not confirm."""
        _, keys, links, _ = await self._state(user_id)

        def done(service: str, counts: dict) -> None:
            confirmed[service] = {"at": datetime.now(UTC).isoformat(), "counts": counts}

        def add(into: dict, result: dict) -> None:
            for k, v in result.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    into[k] = into.get(k, 0) + v

        principals = self.principals(user_id, keys)
        if "pipeline" not in confirmed or "orchestrator" not in confirmed:
            pipe, orch = {}, {}
            for principal in principals:
                path = "/internal/subjects/" + quote(principal, safe="")
                erased = await self._call("pipeline", "DELETE", path)
                add(pipe, erased)
                add(orch, await self._call("orchestrator", "DELETE", path,
                                           body={"predictions": erased.get("refs", [])}))
                # Entries the pipeline was persisting from the log while the orchestrator dropped it.
                add(pipe, await self._call("pipeline", "DELETE", path))
            done("pipeline", pipe)
            done("orchestrator", orch)
        if "features" not in confirmed:
            feats: dict = {}
            for entity, ids in self._entities(links).items():
                add(feats, await self._call("features", "DELETE", "/internal/subjects",
                                            params={"entity": entity, "ids": ids}))
            done("features", feats)

    async def _finish(self, erasure_id: uuid.UUID) -> dict:
        """Step 3: every service confirmed; the account goes, and the audit record says who confirmed when."""
        async with self.sessions() as session:
            e = await session.get(Erasure, erasure_id)
        user_id, subject = e.user_id, e.subject_hash
        if e.state == "done":  # finished meanwhile by another replica or the retry loop
            return {"erasure_id": erasure_id.hex, "subject_hash": subject, "state": "done"}
        user, keys, _, _ = await self._state(user_id)
        counts: dict[str, dict[str, int]] = {s: dict(c.get("counts", {})) for s, c in e.confirmed.items()}
        auth_counts: dict[str, int] = {}
        async with self.sessions.begin() as session:
            row = await session.get(Erasure, erasure_id, with_for_update=True)
            if row.state == "done":  # finished meanwhile by another replica or the retry loop
                return {"erasure_id": erasure_id.hex, "subject_hash": subject, "state": "done", "counts": counts}
            auth_counts["refresh_tokens"] = (await session.execute(
                delete(RefreshToken).where(RefreshToken.user_id == user_id))).rowcount
            auth_counts["api_keys"] = (await session.execute(
                delete(ApiKey).where(ApiKey.owner_id == user_id))).rowcount
            auth_counts["linked_entities"] = (await session.execute(
                delete(SubjectLink).where(SubjectLink.user_id == user_id))).rowcount
            auth_counts["users"] = (await session.execute(delete(User).where(User.id == user_id))).rowcount
            # Earlier audit entries about (or by) the subject keep the event, not the identifier.
            for col in (AuditEntry.actor, AuditEntry.target):
                await session.execute(update(AuditEntry).where(col == str(user_id)).values({col: f"subject:{subject}"}))
            for key in keys:
                await session.execute(update(AuditEntry).where(AuditEntry.target == str(key.id))
                                      .values(target=f"subject:{subject}:apikey"))
            row.state, row.user_id, row.finished_at = "done", None, datetime.now(UTC)
            row.confirmed = {**row.confirmed, "auth": {"at": datetime.now(UTC).isoformat(), "counts": auth_counts}}
            confirmations = {s: c["at"] for s, c in row.confirmed.items()}
            requested_by, actor, actor_role = row.requested_by, row.actor, row.actor_role
        counts["auth"] = auth_counts
        await self.audit.record(actor, "subject.erase", f"subject:{subject}", actor_role=actor_role, details={
            "erasure_id": erasure_id.hex, "subject_hash": subject, "requested_by": requested_by,
            "account_existed": user is not None, "counts": counts, "confirmed": confirmations})
        log.info("subject erased", extra={"erasure_id": erasure_id.hex})
        return {"erasure_id": erasure_id.hex, "subject_hash": subject, "state": "done", "counts": counts,
                "confirmed": confirmations}

    async def retry_pending(self) -> int:
        """One round of the background loop: advance every erasure not done yet."""
        # "frozen" ones are in the hands of a request unless that request died (an old one).
        stuck = datetime.now(UTC) - timedelta(seconds=60)
        async with self.sessions() as session:
            ids = list(await session.scalars(select(Erasure.id).where(
                (Erasure.state == "erasing") | ((Erasure.state == "frozen") & (Erasure.created_at < stuck)))))
        for erasure_id in ids:
            await self.advance(erasure_id)
        return len(ids)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.s.erase_retry_s)
            if stop.is_set():
                return
            try:
                await self.retry_pending()
            except Exception as exc:  # noqa: BLE001 - next round
                log.warning("erasure retry failed: %s", exc)
