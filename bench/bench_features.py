"""Feature store bench: online read of 100 entities, one pipelined Redis round trip vs one
request per entity, measured side by side (interleaved) in one run; prints the ratio.

Uses REDIS_URL if set, else an embedded Redis. Reads go through the store's own OnlineStore
(what POST /v1/features/online calls), with the demo view's six float features.

    .venv/bin/python bench/bench_features.py [--entities 100] [--n 200]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.chassis.clients import redis_client
from services.demo.synthetic import CUSTOMER_FEATURES
from services.features.online import OnlineLookup, OnlineRow, OnlineStore

VIEW = "customer_transactions"


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"p50 {q[49]:.3f} ms, p95 {q[94]:.3f} ms"


async def run(url: str, entities: int, n: int) -> None:
    redis = redis_client(url)
    store = OnlineStore(redis, prefix=f"features:bench{secrets.token_hex(3)}:")
    ids = [f"C{i + 1:04d}" for i in range(entities)]
    now_ms = int(time.time() * 1000)
    await store.write(VIEW, 0, [OnlineRow(i, now_ms, {f: float(k) for k, f in enumerate(CUSTOMER_FEATURES)})
                                for i in ids], now_ms)
    lookups = [OnlineLookup(VIEW, i, CUSTOMER_FEATURES) for i in ids]

    async def pipelined():
        await store.read(lookups)

    async def one_by_one():
        for lk in lookups:
            await store.read([lk])

    timings: dict[str, list[float]] = {"pipelined": [], "per_entity": []}
    for fn in (pipelined, one_by_one):  # warm up
        await fn()
    for _ in range(n):
        for name, fn in (("pipelined", pipelined), ("per_entity", one_by_one)):
            t = time.perf_counter()
            await fn()
            timings[name].append((time.perf_counter() - t) * 1000)
    await store.drop_view(VIEW)
    await redis.aclose()
    print(f"online read of {entities} entities x {len(CUSTOMER_FEATURES)} features, n={n}")
    print(f"  pipelined (1 round trip): {summary(timings['pipelined'])}")
    print(f"  one request per entity:   {summary(timings['per_entity'])}")
    ratio = statistics.median(timings["per_entity"]) / statistics.median(timings["pipelined"])
    print(f"  ratio (per-entity / pipelined, p50): {ratio:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entities", type=int, default=100)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    url = os.environ.get("REDIS_URL")
    server = None
    if not url:
        from services.chassis.embedded import EmbeddedRedis

        server = EmbeddedRedis(Path(tempfile.mkdtemp()) / "redis")
        url = server.start()
    try:
        asyncio.run(run(url, args.entities, args.n))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
