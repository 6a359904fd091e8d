"""Model server benchmark: ratios measured side by side in one run.

1. served with dynamic batching vs served without (MODEL_DYNAMIC_BATCHING=false), same models,
   same concurrent load, rounds interleaved so drift hits both alike;
2. served (HTTP + v2 JSON + queue) vs the raw runtime call in-process, one request at a time.

    .venv/bin/python -m bench.bench_model [--seconds 3] [--concurrency 32] [--markdown]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from services.demo.synthetic import FRAUD_FEATURES, transactions
from services.model.build import build
from services.model.repository import read_manifest
from services.model.runtimes import load_runtime

SENTENCES = ["a card payment of 30 euros at a bakery", "refund request for order 1234",
             "the weather in Paris is nice today", "my card was charged twice for one purchase",
             "how do I reset my password", "I love machine learning"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(repo: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "MODEL_REPOSITORY": str(repo), "MODEL_PORT": str(port),
           "MODEL_DYNAMIC_BATCHING": str(batching).lower(), "MODEL_LOG_LEVEL": "WARNING",
           }
    proc = subprocess.Popen([sys.executable, "-m", "services.model"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("model server exited during start-up")
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("model server did not become ready")


def fraud_request(i: int) -> dict:
    x, _ = transactions(n=64, seed=5)
    row = x[i % 64]
    return {"inputs": [{"name": f, "datatype": "FP32", "shape": [1], "data": [float(row[j])]}
                       for j, f in enumerate(FRAUD_FEATURES)]}


def text_request(i: int) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [SENTENCES[i % len(SENTENCES)]]}]}


CASES = {  # name -> (model, version, request maker)
    "fraud v2 (sklearn)": ("fraud", "2", fraud_request),
    "minilm v1 (torch fp32)": ("minilm", "1", text_request),
    "minilm v2 (onnx int8)": ("minilm", "2", text_request),
}


async def load(url: str, model: str, version: str, make, concurrency: int, seconds: float) -> float:
    """Requests per second with `concurrency` callers each sending one 1-row request at a time."""
    bodies = [make(i) for i in range(64)]
    path = f"/v2/models/{model}/versions/{version}/infer"
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        await client.post(path, json=bodies[0])  # warm-up
        stop = time.perf_counter() + seconds

        async def caller(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < stop:
                r = await client.post(path, json=bodies[i % 64])
                r.raise_for_status()
                done += 1
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        return done / (time.perf_counter() - start)


def raw_rate(repo: Path, model: str, version: str, make, seconds: float) -> float:
    """The runtime's own predict, in-process, one 1-row call at a time."""
    from services.model.service import decode_inputs

    path = repo / model / version
    manifest = read_manifest(path)
    runtime = load_runtime(path, manifest)
    inputs = [decode_inputs(make(i), manifest.inputs) for i in range(64)]
    runtime.predict(inputs[0])
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runtime.predict(inputs[n % 64])
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="print a table for docs/benchmarks.md")
    ap.add_argument("--model", choices=sorted({m for m, _, _ in CASES.values()}), help="one model only")
    args = ap.parse_args()
    cases = {k: v for k, v in CASES.items() if args.model in (None, v[0])}

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        build(repo, only=[args.model] if args.model else None)
        servers = {True: serve(repo, True), False: serve(repo, False)}
        try:
            rows = []
            for case, (model, version, make) in cases.items():
                # Every measurement once per round, rounds interleaved: load from others on the
                # machine hits all four alike; the medians are reported.
                r: dict[str, list[float]] = {"batch": [], "none": [], "served": [], "raw": []}
                for _ in range(args.rounds):
                    r["batch"].append(asyncio.run(load(servers[True][1], model, version, make,
                                                       args.concurrency, args.seconds)))
                    r["none"].append(asyncio.run(load(servers[False][1], model, version, make,
                                                      args.concurrency, args.seconds)))
                    r["served"].append(asyncio.run(load(servers[True][1], model, version, make, 1, args.seconds)))
                    r["raw"].append(raw_rate(repo, model, version, make, args.seconds))
                with_b, without_b, served_1, raw = (float(np.median(r[k])) for k in ("batch", "none", "served", "raw"))
                rows.append((case, with_b, without_b, with_b / without_b, served_1, raw, served_1 / raw))
                print(f"{case}: batching {with_b:.0f} req/s vs no batching {without_b:.0f} req/s "
                      f"-> x{with_b / without_b:.2f}; served {served_1:.0f} req/s vs raw {raw:.0f} calls/s "
                      f"-> {served_1 / raw:.2f}", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=15)

    cpu = os.cpu_count()
    print(f"\n{args.concurrency} concurrent callers, 1 row per request, {args.seconds:.0f} s x {args.rounds} "
          f"rounds each, server and load generator on the same {cpu}-CPU machine, CPU only.")
    if args.markdown:
        print("\n| model | batching req/s | no batching req/s | batching / none | served req/s (1 caller) "
              "| raw calls/s | served / raw |\n|---|---|---|---|---|---|---|")
        for case, wb, nb, r1, s1, raw, r2 in rows:
            print(f"| {case} | {wb:.0f} | {nb:.0f} | **{r1:.2f}x** | {s1:.0f} | {raw:.0f} | {r2:.2f} |")


if __name__ == "__main__":
    main()
