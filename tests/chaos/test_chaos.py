"""Chaos: the stack as local processes under load while parts of it fail.

One stack for the module, on datastores of its own (embedded PostgreSQL and Redis that these
tests stop and restart; never the machine's servers), with two model replicas behind the
orchestrators and two orchestrator replicas behind the gateway:

    gateway -> orchestrator A, orchestrator B -> model A, model B

Load is a fixed number of authenticated predictions from a few client threads through the
gateway. Each test asserts outcomes only (which requests failed, what came back), never timings;
each one is bounded by a pytest timeout. The tests run in file order: each leaves the stack as
the next one expects (a replica fewer after the first two).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Self

import httpx
import pytest

from tests.conftest import STACK_ENV, free_port

pytestmark = pytest.mark.e2e

ROW = {"amount": 10.0, "txn_count_24h": 5, "txn_amount_24h": 400.0, "avg_amount_30d": 40.0,
       "account_age_days": 30, "chargebacks_90d": 1, "distinct_merchants_7d": 6}
WORKERS = 4


# -- the stack --------------------------------------------------------------------------------------
@dataclass
class Chaos:
    stack: object
    postgres: object
    redis: object
    database_url: str
    procs: dict = field(default_factory=dict)  # name -> Proc (model, model-b, orchestrator, orchestrator-b...)
    headers: dict = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.stack.url("gateway")

    def kill(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].popen.pid, sig)

    # Embedded servers come back on the port they had: every service holds its URL.
    def stop_redis(self) -> int:
        port = self.redis.port
        self.redis.stop()
        return port

    def start_redis(self, port: int) -> None:
        _retry_spawn(lambda: self.redis._spawn(port), f"redis on {port}")

    def stop_postgres(self) -> int:
        port = self.postgres.port
        self.postgres.stop()
        return port

    def start_postgres(self, port: int) -> None:
        from services.chassis.embedded import _Unprivileged

        runner = _Unprivileged()
        _retry_spawn(lambda: self.postgres._spawn(runner, port), f"postgres on {port}")


def _retry_spawn(spawn, what: str) -> None:
    deadline = time.monotonic() + 30
    while not spawn():  # False: the port is not free yet
        assert time.monotonic() < deadline, f"could not restart {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, models_dir):
    from services.chassis.embedded import EmbeddedPostgres, EmbeddedRedis
    from services.chassis.migrate import upgrade_all
    from services.cli.stack import DEFAULT_PORTS, Stack, ensure_database
    from tests.e2e.conftest import login

    root = tmp_path_factory.mktemp("chaos")
    pg, rd = EmbeddedPostgres(root / "postgres"), EmbeddedRedis(root / "redis")
    stack = None
    try:
        database_url = ensure_database(pg.start(), "aistack")
        redis_url = rd.start()
        data_dir = root / "stack"
        data_dir.mkdir()
        (data_dir / "models").symlink_to(models_dir)
        stack = Stack(data_dir, database_url=database_url, redis_url=redis_url,
                      ports={name: free_port() for name in DEFAULT_PORTS},
                      extra_env={**STACK_ENV, "PIPELINE_PERSIST_EVERY_S": "2"})
        stack._admin_credentials()
        upgrade_all(database_url)

        plan = {p.name: p for p in stack._plan()}
        model_b = _replica(plan["model"], "model-b", "MODEL_PORT", stack.host)
        orch_b = _replica(plan["orchestrator"], "orchestrator-b", "ORCHESTRATOR_PORT", stack.host)
        models = f"{stack.url('model')},{_url(model_b, 'MODEL_PORT', stack.host)}"
        for orch in (plan["orchestrator"], orch_b):
            orch.env["ORCHESTRATOR_MODEL_URLS"] = orch.env["ORCHESTRATOR_MODEL_URL"] = models
        plan["gateway"].env["GATEWAY_ORCHESTRATOR_URLS"] = (
            f"{stack.url('orchestrator')},{_url(orch_b, 'ORCHESTRATOR_PORT', stack.host)}")
        order = [plan["model"], model_b, plan["features"], plan["auth"], plan["orchestrator"], orch_b,
                 plan["gateway"], plan["pipeline"], plan["worker"]]
        stack.launch(order, ready_timeout=240)

        r = login(stack.url("gateway"), stack.admin_email, stack.admin_password)
        assert r.status_code == 200, r.text
        c = Chaos(stack, pg, rd, database_url, {p.name: p for p in order},
                  {"Authorization": f"Bearer {r.json()['access_token']}"})
        yield c
    finally:
        if stack is not None:
            stack.stop()
        rd.stop()
        pg.stop()


def _replica(proc, name: str, port_var: str, host: str):
    env = {**proc.env, port_var: str(free_port()), "OTEL_SERVICE_NAME": name}
    return replace(proc, name=name, env=env, ready_url=f"{_url_of(env, port_var, host)}/ready",
                   log_path=proc.log_path.with_name(f"{name}.log"), popen=None)


def _url(proc, port_var: str, host: str) -> str:
    return _url_of(proc.env, port_var, host)


def _url_of(env: dict, port_var: str, host: str) -> str:
    return f"http://{host}:{env[port_var]}"


# -- load -------------------------------------------------------------------------------------------
class Load:
    """`total` predictions of distinct inputs from WORKERS threads; every outcome is recorded."""

    def __init__(self, chaos: Chaos, total: int):
        self.url, self.headers, self.total = chaos.gateway, chaos.headers, total
        self.base = random.randint(10_000, 10_000_000) * 1.0  # inputs no earlier request used
        self._next = itertools.count()
        self._lock = threading.Condition()
        self.results: list[tuple[int, int | None, str, dict | None]] = []
        self.retry_after: dict[int, str | None] = {}  # request index -> its Retry-After, if any
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)]

    def row(self, i: int) -> dict:
        return {**ROW, "amount": self.base + i}

    def __enter__(self) -> Self:
        # The gateway's key cache must know the token's kid first (see test_cold_jwks_cache...).
        eventually(lambda: httpx.post(f"{self.url}/v1/predict/fraud", json={"inputs": ROW}, headers=self.headers,
                                      timeout=60).status_code == 200, "a first authenticated prediction")
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads), "load threads did not finish"

    def _work(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as client:
            while (i := next(self._next)) < self.total:
                try:
                    r = client.post("/v1/predict/fraud", json={"inputs": self.row(i)})
                    outcome = (i, r.status_code, r.text[:300], r.json() if r.status_code == 200 else None)
                    self.retry_after[i] = r.headers.get("retry-after")
                except httpx.HTTPError as exc:
                    outcome = (i, None, repr(exc), None)
                with self._lock:
                    self.results.append(outcome)
                    self._lock.notify_all()

    def wait_done(self, n: int, timeout: float = 120) -> int:
        """Block until at least n requests have finished; the number finished."""
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.results) >= n, timeout), \
                f"only {len(self.results)} of {n} requests finished"
            return len(self.results)

    @property
    def failures(self) -> list:
        return [(i, status, text) for i, status, text, _ in self.results if status != 200]


def predict(chaos: Chaos, row: dict) -> httpx.Response:
    return httpx.post(f"{chaos.gateway}/v1/predict/fraud", json={"inputs": row}, headers=chaos.headers, timeout=60)


def eventually(check, what: str, timeout: float = 90, diagnose=None):
    """Poll check() until it returns something truthy (bounded; recovery, not speed, is tested);
    on failure, diagnose() (e.g. a log's tail) joins the message."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f}s (last: {last!r})" + (f"\n{diagnose()}" if diagnose else ""))


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.timeout(360)  # includes starting the module's stack
def test_first_concurrent_requests_on_a_fresh_gateway_all_succeed(chaos):
    """The stack's gateway started beside auth, so its startup JWKS fetch may have failed; the first
    burst of requests with a valid token must still all succeed."""
    barrier = threading.Barrier(WORKERS)
    results = []

    def one(i):
        barrier.wait(30)
        r = predict(chaos, {**ROW, "amount": 0.5 + i})
        results.append((r.status_code, r.text[:200]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    failed = [r for r in results if r[0] != 200]
    assert len(results) == WORKERS and not failed, failed


@pytest.mark.timeout(180)
def test_killing_one_of_two_model_replicas_under_load_fails_no_request(chaos):
    with Load(chaos, total=80) as load:
        load.wait_done(20)
        chaos.kill("model-b", signal.SIGKILL)  # no goodbye
    assert len(load.results) == 80
    assert load.failures == [], load.failures
    # Still a full answer from the survivor, uncached (distinct inputs).
    r = predict(chaos, {**ROW, "amount": random.random() * 1e6})
    assert r.status_code == 200 and r.json()["cached"] is False


@pytest.mark.timeout(180)
def test_sigterm_to_an_orchestrator_under_load_fails_no_request(chaos):
    proc = chaos.procs["orchestrator-b"].popen
    with Load(chaos, total=80) as load:
        load.wait_done(20)
        chaos.kill("orchestrator-b", signal.SIGTERM)
    assert load.failures == [], load.failures
    # Graceful: the replica finished its requests and exited on its own.
    proc.wait(60)
    assert proc.returncode in (0, -signal.SIGTERM), chaos.procs["orchestrator-b"].tail()


@pytest.mark.timeout(180)
def test_redis_stopped_under_load_answers_truthfully_and_recovers_on_its_own(chaos):
    """Without Redis the gateway cannot follow revocations (issue 13): within its grace
    (GATEWAY_REVOCATION_GRACE_S) predictions flow uncached, after it the gateway fails closed. Every
    answer is a 200 or a 503/429 in the error shape with Retry-After: never a 500, never a hang."""
    cached_row = {**ROW, "amount": random.random() * 1e6}
    assert predict(chaos, cached_row).json()["cached"] is False
    assert predict(chaos, cached_row).json()["cached"] is True

    def fails_closed():
        r = predict(chaos, {**ROW, "amount": random.random() * 1e6})
        assert r.status_code in (200, 503), r.text
        return r if r.status_code == 503 else None

    with Load(chaos, total=90) as load:
        load.wait_done(15)
        before = list(load.results)
        port = chaos.stop_redis()
        try:
            load.wait_done(len(before) + 30)  # requests kept being answered while Redis was down
            closed = eventually(fails_closed, "the gateway failing closed without its revocation state")
        finally:
            chaos.start_redis(port)
    assert [res for res in before if res[1] != 200] == [], before
    assert len(load.results) == 90  # every request got an answer: none hung
    for i, status, text, body in load.results:
        if status == 200:
            assert body["cached"] is False, (i, body)  # distinct inputs: never a hit
            continue
        assert status in (503, 429) and load.retry_after[i], (i, status, text)
        assert "\"error\"" in text and "\"code\"" in text, (i, text)
    assert closed.json()["error"]["code"] == "revocation_state_unavailable" and closed.headers["retry-after"]
    assert set(closed.json()["error"]) == {"code", "message", "details"}

    # Back: predictions succeed again on their own (no restart of any service).
    eventually(lambda: predict(chaos, {**ROW, "amount": random.random() * 1e6}).status_code == 200,
               "predictions after Redis came back")

    # Back: the cache serves hits again (Redis came back empty), and every service is ready.
    fresh = {**ROW, "amount": random.random() * 1e6}

    def cache_hits():
        first, second = predict(chaos, fresh), predict(chaos, fresh)
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        return second.json()["cached"]

    eventually(cache_hits, "cache hits after Redis came back")
    for name in ("gateway", "orchestrator", "auth", "features"):
        ready = f"{chaos.stack.url(name)}/ready"
        eventually(lambda url=ready: httpx.get(url, timeout=5).status_code == 200, f"{name} ready after Redis came back")


async def _stored(database_url: str, ids: list[str]) -> int:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT count(DISTINCT prediction_id) FROM pipeline.predictions WHERE prediction_id = ANY($1::text[])", ids)
    finally:
        await conn.close()


@pytest.mark.timeout(240)
def test_postgres_stopped_tokens_and_cache_work_writes_land_after_it_returns(chaos):
    gw = chaos.gateway
    cached_row = {**ROW, "amount": random.random() * 1e6}
    assert predict(chaos, cached_row).status_code == 200
    assert predict(chaos, cached_row).json()["cached"] is True
    policy = {"policy": {"routes": {}}, "reason": "chaos: written while Postgres was down"}

    port = chaos.stop_postgres()
    try:
        # Token verification is local to the gateway (cached JWKS): already-issued tokens work.
        with Load(chaos, total=40) as load:
            pass
        assert load.failures == [], load.failures
        ids = [res[3]["prediction_id"] for res in load.results]
        # Cached predictions keep working.
        r = predict(chaos, cached_row)
        assert r.status_code == 200 and r.json()["cached"] is True, r.text
        # A write fails cleanly: 503 with Retry-After in the shared error shape, not a 500.
        w = httpx.put(f"{gw}/admin/models/fraud/policy", json=policy, headers=chaos.headers, timeout=60)
        assert w.status_code == 503, w.text
        assert set(w.json()["error"]) == {"code", "message", "details"} and "retry-after" in w.headers
    finally:
        chaos.start_postgres(port)

    # The write succeeds once Postgres is back.
    eventually(lambda: httpx.put(f"{gw}/admin/models/fraud/policy", json=policy, headers=chaos.headers,
                                 timeout=30).status_code == 200, "the policy write after Postgres came back")
    history = httpx.get(f"{gw}/admin/models/fraud/policy/history", headers=chaos.headers, timeout=30).json()
    assert any(h.get("reason") == policy["reason"] for h in history), history[:3]
    # Nothing lost: every prediction made while Postgres was down reaches the prediction log table.
    worker = chaos.procs["worker"]
    eventually(lambda: asyncio.run(_stored(chaos.database_url, ids)) == len(ids),
               "predictions made while Postgres was down persisted", timeout=120,
               diagnose=lambda: f"stored {asyncio.run(_stored(chaos.database_url, ids))} of {len(ids)}; worker "
                                f"exit code {worker.popen.poll()}; its log:\n{worker.tail(40)}")
