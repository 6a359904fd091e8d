"""Prediction-log persistence: the orchestrator's streams into Postgres through a consumer group.

Entries are acknowledged only after the transaction that stores them commits. While Postgres is
down nothing is acknowledged: the entries stay pending in the group and the next run (which reads
its pending entries first) stores them. Redelivery is harmless: primary keys + ON CONFLICT.
"""
from __future__ import annotations

import logging

import redis.asyncio as aioredis
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.orchestrator.contract import FEEDBACK_STREAM, PREDICTION_STREAM, FeedbackEntry, PredictionEntry

from .tables import feedback, predictions

log = logging.getLogger("aistack.pipeline.logstore")

CONSUMER = "persister"


def _insert_predictions():
    stmt = pg_insert(predictions)
    return stmt.on_conflict_do_nothing(index_elements=[predictions.c.prediction_id, predictions.c.row])


def _insert_feedback():
    """A later label for the same row replaces an earlier one, never the other way round."""
    stmt = pg_insert(feedback)
    return stmt.on_conflict_do_update(
        index_elements=[feedback.c.prediction_id, feedback.c.row],
        set_={"label": stmt.excluded.label, "time": stmt.excluded.time, "stream_id": stmt.excluded.stream_id},
        where=feedback.c.time <= stmt.excluded.time)

def prediction_rows(stream_id: str, fields: dict) -> list[dict]:
    """One row per predicted input row: inputs[i] with outputs[i] (the entry as the contract reads it)."""
    e = PredictionEntry.from_fields(fields)
    common = {"prediction_id": e.id, "time": e.when, "principal": e.principal, "model": e.model,
              "version": e.version, "input_hash": e.input_hash, "latency_ms": e.latency_ms,
              "cached": e.cached, "stream_id": stream_id}
    n = max(len(e.inputs), len(e.outputs))
    return [{**common, "row": i, "inputs": e.inputs[i] if i < len(e.inputs) else None,
             "outputs": e.outputs[i] if i < len(e.outputs) else None} for i in range(n)]


def feedback_row(stream_id: str, fields: dict) -> dict:
    e = FeedbackEntry.from_fields(fields)
    return {"prediction_id": e.prediction_id, "row": e.row, "label": e.label, "principal": e.principal,
            "model": e.model, "version": e.version, "time": e.when, "stream_id": stream_id}


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except aioredis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _read(redis: aioredis.Redis, stream: str, group: str, start: str, count: int) -> list:
    got = await redis.xreadgroup(group, CONSUMER, {stream: start}, count=count)
    return got[0][1] if got else []


async def persist_stream(redis: aioredis.Redis, engine: AsyncEngine, stream: str, group: str,
                         count: int = 1000, max_batches: int = 50) -> dict:
    """Store pending then new entries of one stream, a batch per transaction; ack after commit."""
    await ensure_group(redis, stream, group)
    stored = skipped = 0
    start = "0"  # this consumer's pending entries first (read before, never acknowledged)
    for _ in range(max_batches):
        entries = await _read(redis, stream, group, start, count)
        gone = [i for i, f in entries if not f]  # a pending entry trimmed from the stream comes back empty
        if gone:
            await redis.xack(stream, group, *gone)
        entries = [(i, f) for i, f in entries if f]
        if not entries:
            if start == "0":
                start = ">"
                continue
            break
        rows, bad = [], []
        for entry_id, fields in entries:
            sid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                if stream == FEEDBACK_STREAM:
                    rows.append(feedback_row(sid, fields))
                else:
                    rows.extend(prediction_rows(sid, fields))
            except (ValueError, TypeError, KeyError) as exc:
                bad.append(sid)
                log.warning("unreadable log entry skipped", extra={"stream": stream, "id": sid, "error": str(exc)})
        if rows:
            async with engine.begin() as conn:
                await conn.execute(_insert_feedback() if stream == FEEDBACK_STREAM else _insert_predictions(), rows)
        # Committed: now (and only now) the entries leave the group's pending list.
        await redis.xack(stream, group, *[i for i, _ in entries])
        stored += len(rows)
        skipped += len(bad)
        if start == "0" and len(entries) < count:
            start = ">"
    return {"stream": stream, "stored_rows": stored, "skipped_entries": skipped}


async def persist(redis: aioredis.Redis, engine: AsyncEngine, group: str = "pipeline", count: int = 1000) -> list[dict]:
    return [await persist_stream(redis, engine, PREDICTION_STREAM, group, count),
            await persist_stream(redis, engine, FEEDBACK_STREAM, group, count)]


async def pending(redis: aioredis.Redis, stream: str, group: str = "pipeline") -> int:
    try:
        info = await redis.xpending(stream, group)
    except aioredis.ResponseError:
        return 0
    return int(info["pending"])
