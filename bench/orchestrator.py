"""Orchestrator bench: cache hit vs miss on minilm, and the orchestrator hop vs the model server.

Runs the stack as real processes (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are
set) and measures every variant side by side in one run, printing ratios.

    .venv/bin/python bench/orchestrator.py [--n 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from services.cli.stack import DEFAULT_PORTS, Stack
from services.chassis.embedded import free_port


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"p50 {q[49]:.2f} ms, p95 {q[94]:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--model", default="minilm")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="aistack-bench-"))
    stack = Stack(data, database_url=os.environ.get("DATABASE_URL"), redis_url=os.environ.get("REDIS_URL"),
                  ports={k: free_port() for k in DEFAULT_PORTS}, worker=False)
    stack.start()
    try:
        orch, model = httpx.Client(base_url=stack.url("orchestrator")), httpx.Client(base_url=stack.url("model"))
        meta = model.get(f"/v2/models/{args.model}").json()
        version = meta["parameters"]["version"]
        run = uuid.uuid4().hex[:8]

        def text(i: int) -> str:
            return f"run {run} sentence number {i}: the quick brown fox jumps over the lazy dog"

        def direct(i: int) -> None:
            body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text(i)]}]}
            model.post(f"/v2/models/{args.model}/versions/{version}/infer", json=body).raise_for_status()

        def via_orchestrator(i: int, headers=None) -> None:
            orch.post("/v1/embeddings", json={"model": args.model, "input": text(i)},
                      headers=headers or {}).raise_for_status()

        for i in range(20):  # warm up both paths
            direct(i)
            via_orchestrator(i, {"Cache-Control": "no-cache"})
        # Interleave the variants so that noise hits each alike.
        results: dict[str, list[float]] = {"direct": [], "orch_nocache": [], "miss": [], "hit": []}
        via_orchestrator(-1)  # the hit variant always asks for this text
        for i in range(args.n):
            results["direct"] += timed(lambda _: direct(10_000 + i), 1)
            results["orch_nocache"] += timed(lambda _: via_orchestrator(20_000 + i, {"Cache-Control": "no-cache"}), 1)
            results["miss"] += timed(lambda _: via_orchestrator(30_000 + i), 1)
            results["hit"] += timed(lambda _: via_orchestrator(-1), 1)
        p50 = {k: statistics.median(v) for k, v in results.items()}
        lines = [
            f"model {args.model} v{version}, {args.n} sequential requests per variant, one text each",
            f"model server direct (v2 infer):        {summary(results['direct'])}",
            f"orchestrator, cache bypassed:          {summary(results['orch_nocache'])}",
            f"orchestrator, cache miss:              {summary(results['miss'])}",
            f"orchestrator, cache hit:               {summary(results['hit'])}",
            f"orchestrator hop cost (p50 no-cache / direct): {p50['orch_nocache'] / p50['direct']:.2f}x "
            f"(+{p50['orch_nocache'] - p50['direct']:.2f} ms)",
            f"cache hit speed-up (p50 miss / hit):   {p50['miss'] / p50['hit']:.2f}x",
        ]
        print("\n".join(lines))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
