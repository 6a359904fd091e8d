"""aistack against the servers a user would pick instead: MLServer (serving) and Feast (features).

One command, ratios measured side by side in one run:

    .venv/bin/python -m bench.peers [--rounds 3] [--seconds 3] [--no-docs]

- installs MLServer 1.7.1 + mlserver-sklearn and Feast (with its Redis extra) into their own
  virtualenvs under var/bench/ (once; from the package registry);
- serves the same scikit-learn fraud model (services/model/build.py, exported with joblib into
  MLServer's model-settings layout, adaptive batching on both with the same max batch size and
  delay) with aistack's model server and with `mlserver start`;
- serves the same 1,000 customers x 6 float features (the demo view, read back from aistack and
  written into Feast) with aistack's features service and with `feast serve` (Redis online store
  on a claimed, empty Redis db of REDIS_SERVER, default redis://127.0.0.1:6379; aistack's
  offline store in a throwaway database on DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/postgres);
- runs interleaved rounds (the order flips every round, so load from others hits both alike):
  1-row infer at 1 and 32 callers, a 1,000-row infer; online reads of 1 and 100 entities at 1 and
  16 callers. Per case: req/s, p50, p99 and server CPU per request (psutil on the server's
  process tree), as medians over the rounds and as aistack / peer ratios, with the machine's load
  average during each round;
- writes the table into docs/benchmarks.md (between the `peers` markers; --no-docs to skip).

Every server runs its defaults otherwise: no trace exporter, logs at WARNING, one process each
(MLServer with parallel_workers 0, Feast with one worker and no access log).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var" / "bench"
PEERS = {
    "mlserver": ["mlserver==1.7.1", "mlserver-sklearn==1.7.1"],
    "feast": ["feast[redis]==0.67.0"],
}
VIEW = "customer_transactions"


# -- peer virtualenvs -----------------------------------------------------------------------------
def peer_venv(name: str) -> Path:
    """var/bench/<name>: a virtualenv with the peer's packages, created once."""
    path = VAR / name
    marker = path / ".aistack-bench"
    wanted = " ".join(PEERS[name])
    if marker.exists() and marker.read_text() == wanted:
        return path
    print(f"installing {wanted} into {path} ...", flush=True)
    if not (path / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", *PEERS[name]], check=True)
    marker.write_text(wanted)
    return path


# -- servers --------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def cpu_s(self) -> float:
        """CPU seconds of the server's whole process tree (Feast runs a gunicorn master + worker)."""
        total = 0.0
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start(name: str, cmd: list[str], env: dict, url: str, ready_path: str, workdir: Path,
          timeout: float = 300) -> Server:
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(cmd, env=env, cwd=str(workdir), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = Server(name, url, proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited during start-up:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{name} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _port() -> int:
    from services.chassis.embedded import free_port

    return free_port()


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def serve_aistack_model(repo: Path, workdir: Path) -> Server:
    port = _port()
    env = {**_base_env(), "MODEL_REPOSITORY": str(repo), "MODEL_PORT": str(port), "MODEL_LOG_LEVEL": "WARNING"}
    return start("aistack-model", [sys.executable, "-m", "services.model"], env, f"http://127.0.0.1:{port}",
                 "/v2/models/fraud/ready", workdir)


def serve_mlserver(version_dir: Path, manifest, workdir: Path) -> Server:
    """The same estimator file in MLServer's layout: settings.json + <model>/model-settings.json."""
    venv = peer_venv("mlserver")
    models = workdir / "mlserver"
    (models / "fraud").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(version_dir / "model.joblib", models / "fraud" / "model.joblib")
    port = _port()
    (models / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": _port(), "metrics_port": _port(), "host": "127.0.0.1",
        "parallel_workers": 0, "logging_level": "WARNING", "debug": False}))
    (models / "fraud" / "model-settings.json").write_text(json.dumps({
        "name": "fraud", "implementation": "mlserver_sklearn.SKLearnModel",
        "max_batch_size": manifest.max_batch_size, "max_batch_time": manifest.max_queue_delay_ms / 1000.0,
        "parameters": {"uri": "./model.joblib", "version": manifest.version}}))
    # One OpenMP thread per pass, as aistack's sklearn runtime picks for small batches itself: the
    # comparison is of the platforms, not of OpenMP's spinning workers on a busy 2-core machine.
    env = {**_base_env(), "OMP_NUM_THREADS": "1"}
    return start("mlserver", [str(venv / "bin" / "mlserver"), "start", str(models)], env,
                 f"http://127.0.0.1:{port}", "/v2/models/fraud/ready", workdir)


async def _create_database(server_url: str, name: str, drop: bool = False) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        if drop:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def serve_aistack_features(database_url: str, redis_url: str, workdir: Path) -> Server:
    port = _port()
    env = {**_base_env(), "DATABASE_URL": database_url, "REDIS_URL": redis_url, "FEATURES_PORT": str(port),
           "FEATURES_LOG_LEVEL": "WARNING", "FEATURES_SEED_DEMO": "true", "FEATURES_SEED_CUSTOMERS": "1000"}
    return start("aistack-features", [sys.executable, "-m", "services.features"], env,
                 f"http://127.0.0.1:{port}", "/ready", workdir, timeout=600)


FEAST_SETUP = r'''
import datetime, json, sys
from pathlib import Path
import pandas as pd
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.types import Float64

repo, data = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
features = data["features"]
df = pd.DataFrame([{"customer_id": r["id"], **{f: float(r["values"][f]) for f in features}} for r in data["rows"]])
now = datetime.datetime.now(datetime.timezone.utc)
df["event_timestamp"] = now
df["created"] = now
df.to_parquet(repo / "customers.parquet")
customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)
source = FileSource(path=str(repo / "customers.parquet"), timestamp_field="event_timestamp",
                    created_timestamp_column="created")
view = FeatureView(name="customer_transactions", entities=[customer], ttl=datetime.timedelta(days=7),
                   schema=[Field(name=f, dtype=Float64) for f in features], online=True, source=source)
store = FeatureStore(repo_path=str(repo))
store.apply([customer, view])
store.write_to_online_store("customer_transactions", df)
print("feast online store written:", len(df), "rows")
'''


def serve_feast(rows: list[dict], features: list[str], redis_url: str, workdir: Path) -> Server:
    venv = peer_venv("feast")
    repo = workdir / "feast_repo"
    repo.mkdir(parents=True, exist_ok=True)
    host_port, db = redis_url.split("//", 1)[1].rsplit("/", 1)
    (repo / "feature_store.yaml").write_text(
        "project: aistack_bench\n"
        f"registry: {repo / 'registry.db'}\n"
        "provider: local\n"
        "online_store:\n  type: redis\n"
        f"  connection_string: \"{host_port},db={db}\"\n"
        "offline_store:\n  type: file\n"
        "entity_key_serialization_version: 3\n")
    (repo / "data.json").write_text(json.dumps({"features": features, "rows": rows}))
    (repo / "setup_feast.py").write_text(FEAST_SETUP)
    done = subprocess.run([str(venv / "bin" / "python"), str(repo / "setup_feast.py"), str(repo),
                           str(repo / "data.json")], check=False, cwd=str(repo), capture_output=True, text=True, env=_base_env())
    if done.returncode != 0:
        raise RuntimeError(f"feast setup failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    port = _port()
    cmd = [str(venv / "bin" / "feast"), "-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(port),
           "--no-access-log", "--workers", "1", "--max-requests", "1000000000"]
    return start("feast", cmd, _base_env(), f"http://127.0.0.1:{port}", "/health", workdir)


# -- load -----------------------------------------------------------------------------------------
@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # server CPU per request


async def _load(server: Server, path: str, bodies: list[bytes], callers: int, seconds: float,
                check) -> Sample:
    """`callers` concurrent keep-alive connections, each sending its next request when the last
    answered. The load generator is aiohttp: httpx's async client cost ~1 ms of CPU per request, so
    at 16 callers it, not either server, set the pace (both servers then read ~900 req/s)."""
    import aiohttp

    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=callers, force_close=False)
    async with aiohttp.ClientSession(base_url=server.url, connector=connector,
                                     headers={"content-type": "application/json"},
                                     timeout=aiohttp.ClientTimeout(total=60)) as c:
        async def post(body: bytes) -> tuple[int, bytes]:
            async with c.post(path, data=body) as r:
                return r.status, await r.read()

        for i in range(min(callers, 8)):  # warm up connections and caches
            check(*await post(bodies[i % len(bodies)]))
        stop = time.perf_counter() + seconds

        async def caller(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                status, content = await post(bodies[i % len(bodies)])
                latencies.append(time.perf_counter() - t)
                check(status, content)
                i += callers

        cpu0, start_t = server.cpu_s(), time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(callers)))
        elapsed, cpu = time.perf_counter() - start_t, server.cpu_s() - cpu0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return Sample(len(latencies) / elapsed, q[49] * 1000, q[98] * 1000, cpu / len(latencies) * 1000)


def _ok(server: str):
    def check(status: int, content: bytes) -> None:
        if status != 200:
            raise RuntimeError(f"{server}: {status} {content[:300]!r}")
    return check


@dataclass
class Case:
    group: str
    name: str
    callers: int
    aistack: tuple[Server, str, list[bytes]]
    peer: tuple[Server, str, list[bytes]]
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {"aistack": [], "peer": []})
    loads: list[float] = field(default_factory=list)


def model_cases(ai: Server, ml: Server) -> list[Case]:
    from services.demo.synthetic import FRAUD_FEATURES, transactions

    x, _ = transactions(n=1000, seed=11)

    def ours(rows) -> bytes:
        return json.dumps({"inputs": [{"name": f, "datatype": "FP32", "shape": [len(rows)],
                                       "data": [float(r[j]) for r in rows]} for j, f in enumerate(FRAUD_FEATURES)]}
                          ).encode()

    def theirs(rows) -> bytes:
        # mlserver-sklearn: one [N, 7] tensor; predict_proba is the same single pass aistack makes.
        return json.dumps({"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [len(rows), len(FRAUD_FEATURES)],
                                       "data": [float(v) for r in rows for v in r]}],
                           "outputs": [{"name": "predict_proba"}]}).encode()

    one_ai = [ours([x[i]]) for i in range(64)]
    one_ml = [theirs([x[i]]) for i in range(64)]
    path = "/v2/models/fraud/infer"
    return [
        Case("model", "infer 1 row", 1, (ai, path, one_ai), (ml, path, one_ml)),
        Case("model", "infer 1 row", 32, (ai, path, one_ai), (ml, path, one_ml)),
        Case("model", "infer 1,000 rows", 1, (ai, path, [ours(x)]), (ml, path, [theirs(x)])),
    ]


def feature_cases(ai: Server, fe: Server, features: list[str], ids: list[str]) -> list[Case]:
    refs = [f"{VIEW}:{f}" for f in features]

    def ours(batch) -> bytes:
        return json.dumps({"entity": "customer", "ids": batch, "features": refs}).encode()

    def theirs(batch) -> bytes:
        return json.dumps({"features": refs, "entities": {"customer_id": batch}}).encode()

    singles = [[ids[i]] for i in range(0, 1000, 7)]
    hundreds = [ids[i:i + 100] for i in range(0, 1000, 100)]
    cases = []
    for label, batches in (("online read, 1 entity", singles), ("online read, 100 entities", hundreds)):
        for callers in (1, 16):
            cases.append(Case("features", label, callers,
                              (ai, "/v1/features/online", [ours(b) for b in batches]),
                              (fe, "/get-online-features", [theirs(b) for b in batches])))
    return cases


def run_rounds(cases: list[Case], rounds: int, seconds: float) -> list[dict]:
    loads = []
    for r in range(rounds):
        load_start = os.getloadavg()[0]
        for case in cases:
            order = ("aistack", "peer") if (r + len(case.name)) % 2 == 0 else ("peer", "aistack")
            case.loads.append(os.getloadavg()[0])
            for who in order:
                server, path, bodies = getattr(case, who)
                case.samples[who].append(asyncio.run(_load(server, path, bodies, case.callers, seconds,
                                                           _ok(server.name))))
        loads.append({"round": r + 1, "load_start": load_start, "load_end": os.getloadavg()[0]})
        print(f"round {r + 1}/{rounds} done, load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return loads


def _median(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def table(cases: list[Case]) -> str:
    lines = [("| case | callers | aistack req/s | peer req/s | **req/s ratio** | aistack p50 / p99 ms "
              "| peer p50 / p99 ms | **p50 ratio** | aistack CPU ms/req | peer CPU ms/req | **CPU ratio** "
              "| load avg (1 min) per round |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        a, p = c.samples["aistack"], c.samples["peer"]
        # Ratios per round (both measured back to back), then their median.
        rps = statistics.median(x.rps / y.rps for x, y in zip(a, p))
        p50 = statistics.median(x.p50_ms / y.p50_ms for x, y in zip(a, p))
        cpu = statistics.median(x.cpu_ms / y.cpu_ms for x, y in zip(a, p) if y.cpu_ms > 0)
        peer = "MLServer" if c.group == "model" else "Feast"
        lines.append(
            f"| {c.name} ({peer}) | {c.callers} | {_median(a, 'rps'):.0f} | {_median(p, 'rps'):.0f} | **{rps:.2f}x** "
            f"| {_median(a, 'p50_ms'):.2f} / {_median(a, 'p99_ms'):.2f} | {_median(p, 'p50_ms'):.2f} / "
            f"{_median(p, 'p99_ms'):.2f} | **{p50:.2f}x** | {_median(a, 'cpu_ms'):.2f} | {_median(p, 'cpu_ms'):.2f} "
            f"| **{cpu:.2f}x** | {', '.join(f'{x:.1f}' for x in c.loads)} |")
    return "\n".join(lines)


BEGIN, END = "<!-- peers:begin (bench/peers.py writes this section) -->", "<!-- peers:end -->"


def write_docs(section: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--only", choices=["model", "features"], help="one half only")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    for name in PEERS:
        if args.only in (None, "model" if name == "mlserver" else "features"):
            peer_venv(name)
    VAR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="peers-", dir=VAR))
    servers: list[Server] = []
    cleanups = []
    try:
        cases: list[Case] = []
        if args.only in (None, "model"):
            from services.model.build import build
            from services.model.repository import read_manifest, version_key

            repo = workdir / "models"
            build(repo, only=["fraud"])
            version = max((p.name for p in (repo / "fraud").iterdir() if (p / "manifest.json").exists()
                           or (p / "model.joblib").exists()), key=version_key)
            manifest = read_manifest(repo / "fraud" / version)
            ai = serve_aistack_model(repo, workdir)
            servers.append(ai)
            ml = serve_mlserver(repo / "fraud" / version, manifest, workdir)
            servers.append(ml)
            cases += model_cases(ai, ml)
        if args.only in (None, "features"):
            from services.demo.synthetic import CUSTOMER_FEATURES

            redis_server = os.environ.get("REDIS_SERVER", "redis://127.0.0.1:6379")
            pg = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
            ours_db, feast_db = _claim_redis(redis_server), _claim_redis(redis_server)
            cleanups += [ours_db[1], feast_db[1]]
            name = f"aistack_peers_{secrets.token_hex(3)}"
            asyncio.run(_create_database(pg, name))
            cleanups.append(lambda: asyncio.run(_create_database(pg, name, drop=True)))
            database_url = pg.rsplit("/", 1)[0] + "/" + name
            from services.chassis.migrate import upgrade

            upgrade("features", database_url)
            fs = serve_aistack_features(database_url, ours_db[0], workdir)
            servers.append(fs)
            ids = [f"C{i + 1:04d}" for i in range(1000)]
            r = httpx.post(fs.url + "/v1/features/online", timeout=60, json={
                "entity": "customer", "ids": ids, "features": [f"{VIEW}:{f}" for f in CUSTOMER_FEATURES]})
            r.raise_for_status()
            rows = [{"id": e["id"], "values": e["values"]} for e in r.json()["results"]]
            missing = sum(1 for e in rows if any(v is None for v in e["values"].values()))
            if missing:
                raise RuntimeError(f"{missing} of 1000 demo customers have missing online values")
            fe = serve_feast(rows, CUSTOMER_FEATURES, feast_db[0], workdir)
            servers.append(fe)
            cases += feature_cases(fs, fe, CUSTOMER_FEATURES, ids)

        loads = run_rounds(cases, args.rounds, args.seconds)
        out = table(cases)
        cpu = psutil.cpu_count()
        note = (f"{args.rounds} interleaved rounds x {args.seconds:.0f} s per case and server; medians; ratios are "
                f"aistack / peer per round, then their median (req/s: higher is better for aistack; p50 and "
                f"CPU: lower). Servers and load generator (aiohttp) share one {cpu}-CPU machine; load average "
                f"(1 min) at the start of each case per round in the last column; rounds: "
                + "; ".join(f"{x['round']}: {x['load_start']:.1f} -> {x['load_end']:.1f}" for x in loads) + ".")
        print("\n" + out + "\n\n" + note)
        if not args.no_docs:
            write_docs("### aistack vs MLServer 1.7.1 and Feast 0.67 (bench/peers.py)\n\n"
                       f"Command: `.venv/bin/python -m bench.peers` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n\n"
                       f"{out}\n\n{note}")
    finally:
        for s in servers:
            s.stop()
        for fn in cleanups:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - cleanup is best effort, the results are printed
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def _claim_redis(server: str):
    """An empty Redis db (1-15) of our own, claimed atomically; flushed afterwards."""
    import redis

    for db in secrets.SystemRandom().sample(range(1, 16), 15):
        client = redis.Redis.from_url(f"{server}/{db}")
        if client.dbsize() == 0 and client.set("aistack:test-claim", os.getpid(), nx=True):
            return f"{server}/{db}", lambda c=client: (c.flushdb(), c.close())
        client.close()
    raise RuntimeError("no empty Redis database (1-15) to claim")


if __name__ == "__main__":
    main()
