"""Orchestrator bench: cache hit vs miss on minilm, and the orchestrator hop vs the model server.

Runs the stack as real processes (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are
set) and measures every variant side by side in one run, printing ratios.

    .venv/bin/python bench/orchestrator.py [--n 300] [--profile 15]

`--profile S` then records the orchestrator with py-spy (the bench/hotspots.py recipe) for S seconds
of cache hits from 4 callers and prints where its CPU goes; raw stacks in var/bench/hotspots-orchestrator.txt.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from services.chassis.embedded import free_port
from services.cli.stack import DEFAULT_PORTS, Stack


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
    ap.add_argument("--profile", type=float, default=0, help="seconds of py-spy on the orchestrator's hits")
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

        server_ms: dict[str, list[float]] = {"miss": [], "hit": []}

        def via_orchestrator(i: int, headers=None, variant: str | None = None) -> None:
            r = orch.post("/v1/embeddings", json={"model": args.model, "input": text(i)}, headers=headers or {})
            r.raise_for_status()
            if variant:  # the orchestrator's own time (Server-Timing), without the client and the wire
                server_ms[variant].append(float(r.headers["Server-Timing"].rpartition("dur=")[2]))

        for i in range(20):  # warm up both paths
            direct(i)
            via_orchestrator(i, {"Cache-Control": "no-cache"})
        # Interleave the variants so that noise hits each alike.
        results: dict[str, list[float]] = {"direct": [], "orch_nocache": [], "miss": [], "hit": []}
        via_orchestrator(-1)  # the hit variant always asks for this text
        for i in range(args.n):
            results["direct"] += timed(lambda _, i=i: direct(10_000 + i), 1)
            results["orch_nocache"] += timed(lambda _, i=i: via_orchestrator(20_000 + i, {"Cache-Control": "no-cache"}), 1)
            results["miss"] += timed(lambda _, i=i: via_orchestrator(30_000 + i, variant="miss"), 1)
            results["hit"] += timed(lambda _: via_orchestrator(-1, variant="hit"), 1)
        p50 = {k: statistics.median(v) for k, v in results.items()}
        lines = [
            f"model {args.model} v{version}, {args.n} sequential requests per variant, one text each",
            f"model server direct (v2 infer):        {summary(results['direct'])}",
            f"orchestrator, cache bypassed:          {summary(results['orch_nocache'])}",
            f"orchestrator, cache miss:              {summary(results['miss'])}",
            f"orchestrator, cache hit:               {summary(results['hit'])}",
            (f"orchestrator hop cost (p50 no-cache / direct): {p50['orch_nocache'] / p50['direct']:.2f}x "
             f"(+{p50['orch_nocache'] - p50['direct']:.2f} ms)"),
            f"cache hit speed-up (p50 miss / hit):   {p50['miss'] / p50['hit']:.2f}x",
            (f"inside the orchestrator (Server-Timing p50): miss {statistics.median(server_ms['miss']):.2f} ms, "
             f"hit {statistics.median(server_ms['hit']):.2f} ms, "
             f"{statistics.median(server_ms['miss']) / statistics.median(server_ms['hit']):.2f}x"),
        ]
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("\n".join(lines), flush=True)
        if args.profile:
            profile_hits(stack, args.model, text(-1), args.profile)
    finally:
        stack.stop()


def profile_hits(stack: Stack, model: str, text: str, seconds: float, callers: int = 4) -> None:
    """py-spy on the orchestrator while `callers` threads send the same (cached) embedding request."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is not a package
    from bench.hotspots import summarise

    proc = next(p for p in stack.procs if p.name == "orchestrator")
    out = Path("var/bench/hotspots-orchestrator.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy_proc = subprocess.Popen([spy, "record", "--pid", str(proc.popen.pid), "--subprocesses", "--duration",
                                 str(int(seconds)), "--rate", "200", "--format", "raw", "--nonblocking",
                                 "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds + 1

    def drive(_: int) -> int:
        n = 0
        with httpx.Client(base_url=stack.url("orchestrator")) as client:
            while time.monotonic() < deadline:
                client.post("/v1/embeddings", json={"model": model, "input": text}).raise_for_status()
                n += 1
        return n

    with ThreadPoolExecutor(callers) as pool:
        total = sum(pool.map(drive, range(callers)))
    _, err = spy_proc.communicate(timeout=120)
    if spy_proc.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.decode()[-1000:]}")
    print(f"\nprofile: {total / seconds:.0f} cache hits/s from {callers} callers; stacks: {out}\n")
    print(summarise(out))


if __name__ == "__main__":
    main()
