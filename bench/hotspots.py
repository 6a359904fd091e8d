"""Where a service's CPU goes under load: py-spy on a real server process, summarised.

(Not named profile.py: bench/ is first on sys.path when a bench script runs, and a bench/profile.py
would shadow the standard library's `profile`, which cProfile and torch import.)

    .venv/bin/python -m bench.hotspots [--target model|features] [--callers 32] [--seconds 15]

Starts the service the way bench/peers.py does (aistack defaults: no trace exporter, logs at
WARNING), drives it with `--callers` concurrent 1-row infers (model) or 1-entity online reads
(features), and records it with py-spy (`pip install py-spy`; needs ptrace: run as root or with
CAP_SYS_PTRACE). Prints the share of on-CPU samples per area (the buckets issue 18 used) and the
hottest functions; the raw collapsed stacks go to var/bench/hotspots-<target>.txt, which
https://www.speedscope.app or `flamegraph.pl` turn into a flame graph. By hand:

    py-spy record --pid <server pid> --duration 15 --rate 200 --format raw -o stacks.txt
    py-spy top --pid <server pid>
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import peers

# Areas by the file a leaf frame sits in (first match wins).
AREAS = [
    ("OpenTelemetry", ("opentelemetry",)),
    ("model (sklearn / numpy)", ("sklearn", "numpy", "threadpoolctl", "joblib")),
    ("aistack model server", ("services/model",)),
    ("aistack features", ("services/features",)),
    ("aistack chassis", ("services/chassis",)),
    ("redis-py / hiredis", ("redis/", "hiredis")),
    ("FastAPI / Starlette / pydantic", ("fastapi", "starlette", "pydantic")),
    ("uvicorn / httptools", ("uvicorn", "httptools", "h11")),
    ("anyio thread pool", ("anyio", "concurrent/futures", "threading.py")),
    ("asyncio / uvloop event loop", ("asyncio", "uvloop")),
    ("prometheus_client", ("prometheus_client",)),
    ("logging / json", ("logging", "jsonlogger", "orjson", "json/")),
]


def area(frame: str) -> str:
    for name, needles in AREAS:
        if any(n in frame for n in needles):
            return name
    return "other"


def summarise(raw: Path, top: int = 25) -> str:
    """Collapsed stacks (frame;frame;...;leaf count) -> self time per area and per function."""
    by_area: collections.Counter = collections.Counter()
    by_leaf: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        leaf = frames[-1]
        # The idle loop waiting in select/epoll is off-CPU time, not cost.
        if "select" in leaf and ("selectors" in leaf or "epoll" in leaf) or "_worker (concurrent" in leaf:
            continue
        # Attribute to the innermost frame that is not the interpreter's own glue.
        owner = next((f for f in reversed(frames) if area(f) != "other"), leaf)
        by_area[area(owner)] += n
        by_leaf[leaf] += n
        total += n
    if not total:
        return "no on-CPU samples"
    lines = [f"{total} on-CPU samples", "", "| area | share |", "|---|---|"]
    lines += [f"| {a} | {100 * n / total:.1f}% |" for a, n in by_area.most_common()]
    lines += ["", "hottest leaf functions:"]
    lines += [f"  {100 * n / total:5.1f}%  {leaf}" for leaf, n in by_leaf.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=["model", "features"], default="model")
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=200)
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    peers.VAR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="hotspots-", dir=peers.VAR))
    out = peers.VAR / f"hotspots-{args.target}.txt"
    cleanups = []
    server = None
    try:
        if args.target == "model":
            from services.model.build import build

            build(workdir / "models", only=["fraud"])
            server = peers.serve_aistack_model(workdir / "models", workdir)
            case = peers.model_cases(server, server)[1]
            path, bodies = case.aistack[1], case.aistack[2]
        else:
            import secrets

            from services.chassis.migrate import upgrade
            from services.demo.synthetic import CUSTOMER_FEATURES

            redis_url, flush = peers._claim_redis(os.environ.get("REDIS_SERVER", "redis://127.0.0.1:6379"))
            cleanups.append(flush)
            pg = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
            name = f"aistack_profile_{secrets.token_hex(3)}"
            asyncio.run(peers._create_database(pg, name))
            cleanups.append(lambda: asyncio.run(peers._create_database(pg, name, drop=True)))
            database_url = pg.rsplit("/", 1)[0] + "/" + name
            upgrade("features", database_url)
            server = peers.serve_aistack_features(database_url, redis_url, workdir)
            ids = [f"C{i + 1:04d}" for i in range(1000)]
            case = peers.feature_cases(server, server, CUSTOMER_FEATURES, ids)[1]
            path, bodies = case.aistack[1], case.aistack[2]
        spy_proc = subprocess.Popen([spy, "record", "--pid", str(server.proc.pid), "--duration",
                                     str(int(args.seconds)), "--rate", str(args.rate), "--format", "raw",
                                     "--nonblocking", "-o", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sample = asyncio.run(peers._load(server, path, bodies, args.callers, args.seconds + 1, peers._ok(server.name)))
        _, err = spy_proc.communicate(timeout=120)
        if spy_proc.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode()[-1000:]}")
        print(f"{args.target}: {sample.rps:.0f} req/s at {args.callers} callers, {sample.cpu_ms:.2f} ms server CPU "
              f"per request, load average {os.getloadavg()[0]:.1f}\nstacks: {out}\n")
        print(summarise(out))
    finally:
        if server is not None:
            server.stop()
        for fn in cleanups:
            fn()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
