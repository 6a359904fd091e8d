"""The demo seed: defaults.yaml's registry plus synthetic history for the demo view, materialised.

Only for `FEATURES_SEED_DEMO` (the local stack and the demo); production registries come from
`aistack features apply`.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from .client import DEMO_VIEW
from .dtypes import to_ms
from .online import OnlineLookup, OnlineRow
from .registry import load_doc, lock_sql

if TYPE_CHECKING:
    from .service import FeatureStore

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
DEMO_SOURCE = "demo-seed"
_SEED_LOCK = "features.seed"


def demo_id(i: int) -> str:
    return f"C{i + 1:04d}"


def demo_rows(customers: int, snapshots: int, now: datetime) -> list[OnlineRow]:
    """Daily snapshots of the synthetic customer features, the last one at `now`."""
    from services.demo.synthetic import CUSTOMER_FEATURES, customer_history

    history = customer_history(customers, snapshots)
    rows = []
    for k, snap in enumerate(history):
        event_ms = to_ms(now - timedelta(days=len(history) - 1 - k))
        for i in range(customers):
            rows.append(OnlineRow(demo_id(i), event_ms,
                                  {f: round(float(snap[f][i]), 4) for f in CUSTOMER_FEATURES}))
    return rows


async def seed_demo(store: FeatureStore, customers: int = 1000, snapshots: int = 4) -> dict:
    """Apply defaults.yaml, seed synthetic history for the demo view if it has none, materialise.

    Idempotent and safe with several replicas starting at once (a session advisory lock).
    Seeded-only history older than half the TTL gets a fresh snapshot, so the demo keeps
    working after a restart days later.
    """
    report: dict[str, Any] = {"seeded_rows": 0}
    now = datetime.now(UTC)
    async with store.engine.connect() as lock_conn:
        await lock_conn.execute(lock_sql(session=True), {"k": _SEED_LOCK})
        await lock_conn.commit()
        try:
            changes = await store.apply(load_doc(DEFAULTS_FILE))
            report["changes"] = [c.model_dump() for c in changes if c.action != "unchanged"]
            view = (await store.registry(fresh=True)).view(DEMO_VIEW)
            newest = await store.offline.newest_event(view.name)
            stale = newest is not None and view.ttl_seconds > 0 and \
                now - newest > timedelta(seconds=view.ttl_seconds / 2)
            if newest is None:
                report["seeded_rows"] = await store.offline.insert(
                    view.name, demo_rows(customers, snapshots, now), DEMO_SOURCE)
            elif stale and await store.offline.only_source(view.name, DEMO_SOURCE):
                report["seeded_rows"] = await store.offline.insert(
                    view.name, demo_rows(customers, 1, now), DEMO_SOURCE)
            if store.online_store is not None:
                report["materialized"] = await store.materialize([view.name])
                probe = await store.online_store.read([OnlineLookup(view.name, demo_id(0), ["_ts"])])
                if probe[0][0] is None:  # Redis lost its data: copy the whole history back
                    report["rematerialized"] = await store.materialize(
                        [view.name], start=datetime(1970, 1, 1, tzinfo=UTC))
        finally:
            await lock_conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": _SEED_LOCK})
            await lock_conn.commit()
    return report
