"""Gateway benchmark, measured side by side in one run.

1. Latency of POST /v1/predict/fraud through the gateway (JWT check, scope, Redis token bucket,
   proxy) vs straight to the orchestrator, same body, one request at a time, rounds interleaved
   so that drift hits both alike. The answer comes from the orchestrator's cache on both paths,
   so the ratio shows the gateway's own cost.
2. Local JWT verifications per second (RS256, one core): the gateway's verify() with a cached
   JWKS, with and without the revocation check (issue 13: auth's revocations held in memory, here
   10,000 entries), rounds interleaved; and jose's decode alone.

Starts the stack as processes (services.cli.stack.Stack, no Celery worker) on free ports. With
DATABASE_URL set, a throwaway database is created on that server and dropped afterwards; REDIS_URL
should name a Redis db of its own (else an embedded Redis starts).

    .venv/bin/python -m bench.gateway [--rounds 20] [--per-round 25] [--markdown]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

ROW = {"amount": 42.0, "txn_count_24h": 3, "txn_amount_24h": 120.0, "avg_amount_30d": 35.0,
       "account_age_days": 400, "chargebacks_90d": 0, "distinct_merchants_7d": 4}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drop_database(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def latency(stack, token: str, rounds: int, per_round: int) -> dict[str, list[float]]:
    body = json.dumps({"inputs": ROW}).encode()
    headers = {"content-type": "application/json"}
    samples: dict[str, list[float]] = {"gateway": [], "direct": []}
    with httpx.Client(base_url=stack.url("gateway"), headers={**headers, "Authorization": f"Bearer {token}"},
                      timeout=30) as gw, httpx.Client(base_url=stack.url("orchestrator"), headers=headers,
                                                      timeout=30) as direct:
        for client in (gw, direct):  # warm up connections and the cache
            for _ in range(20):
                client.post("/v1/predict/fraud", content=body).raise_for_status()
        for r in range(rounds):
            order = (("gateway", gw), ("direct", direct)) if r % 2 == 0 else (("direct", direct), ("gateway", gw))
            for name, client in order:
                for _ in range(per_round):
                    t = time.perf_counter()
                    resp = client.post("/v1/predict/fraud", content=body)
                    samples[name].append(time.perf_counter() - t)
                    if resp.status_code != 200:
                        raise RuntimeError(f"{name}: {resp.status_code} {resp.text[:200]}")
    return samples


def jwt_rate(stack, token: str, seconds: float) -> dict[str, float]:
    from jose import jwt

    from services.gateway.security import JWKSCache, TokenVerifier
    from services.gateway.settings import GatewaySettings

    s = GatewaySettings()

    async def fetch():
        return httpx.get(f"{stack.url('auth')}/.well-known/jwks.json", timeout=10).json()  # noqa: ASYNC210

    from services.gateway.revocation import RevocationMap

    jwks = JWKSCache(fetch, 300, 5)
    # cache_size=0: every call verifies the signature and claims (a token seen for the first time)
    verifier = TokenVerifier(jwks, s.jwt_issuer, s.jwt_audience, s.algorithms, s.jwt_leeway_s, cache_size=0)
    remembered = TokenVerifier(jwks, s.jwt_issuer, s.jwt_audience, s.algorithms, s.jwt_leeway_s)
    revocations = RevocationMap(None, grace_s=1e9)  # as if subscribed: alive, 10,000 entries
    revocations.entries = {f"user:{i:08d}": time.time() - 60 for i in range(10_000)}
    revocations.alive_at = time.monotonic()
    checked = TokenVerifier(jwks, s.jwt_issuer, s.jwt_audience, s.algorithms, s.jwt_leeway_s, revocations,
                            cache_size=0)

    async def rate(v: TokenVerifier, budget: float) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < budget:
            for _ in range(100):
                await v.verify(token)
            n += 100
        return n, time.perf_counter() - t0

    async def full() -> tuple[float, float]:
        await verifier.verify(token)
        totals = {"plain": [0, 0.0], "checked": [0, 0.0]}
        for r in range(10):  # interleaved rounds: drift hits both alike
            for name, v in ((("plain", verifier), ("checked", checked)) if r % 2 == 0
                            else (("checked", checked), ("plain", verifier))):
                n, t = await rate(v, seconds / 10)
                totals[name][0] += n
                totals[name][1] += t
        return totals["plain"][0] / totals["plain"][1], totals["checked"][0] / totals["checked"][1]

    verify_rate, checked_rate = asyncio.run(full())

    async def again() -> float:  # the same token again: the gateway remembers it (issue 18)
        await remembered.verify(token)
        n, t = await rate(remembered, seconds)
        return n / t

    remembered_rate = asyncio.run(again())
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            revocations.not_before("user:not-there", "sid:not-there")
        n += 1000
    lookup_ns = (time.perf_counter() - t0) / n * 1e9
    header = jwt.get_unverified_header(token)
    alg, key = verifier.jwks.keys[header["kid"]]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            verifier.decode(token, alg, key)
        n += 100
    return {"verify": verify_rate, "verify_checked": checked_rate, "remembered": remembered_rate, "revocation_lookup_ns": lookup_ns,
            "decode": n / (time.perf_counter() - t0), "alg": alg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--jwt-seconds", type=float, default=3.0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from services.cli.stack import DEFAULT_PORTS, Stack, ensure_database

    server = os.environ.get("DATABASE_URL")
    name = f"aistack_bench_{os.getpid()}"
    database_url = ensure_database(server, name) if server else None

    with tempfile.TemporaryDirectory(prefix="aistack-bench-") as tmp:
        quiet = {"LOG_LEVEL": "WARNING", "OTEL_SDK_DISABLED": "true",
                 # the limiter still runs (one Redis script call per request); it just never says no
                 "GATEWAY_RATE_LIMIT_RPM": json.dumps({"admin": 10_000_000})}
        quiet.update({f"{n.upper()}_LOG_LEVEL": "WARNING" for n in DEFAULT_PORTS})
        stack = Stack(Path(tmp), database_url=database_url, redis_url=os.environ.get("REDIS_URL"),
                      ports={n: _port() for n in DEFAULT_PORTS}, worker=False, extra_env=quiet)
        stack.start()
        try:
            r = httpx.post(f"{stack.url('gateway')}/v1/auth/token",
                           data={"username": stack.admin_email, "password": stack.admin_password}, timeout=30)
            r.raise_for_status()
            token = r.json()["access_token"]
            samples = latency(stack, token, args.rounds, args.per_round)
            rates = jwt_rate(stack, token, args.jwt_seconds)
        finally:
            stack.stop()
            if server:
                asyncio.run(_drop_database(server, name))

    p50 = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    p99 = {k: statistics.quantiles(v, n=100)[98] * 1000 for k, v in samples.items()}
    mean = {k: statistics.fmean(v) * 1000 for k, v in samples.items()}
    n = len(samples["gateway"])
    rows = [
        ("POST /v1/predict/fraud, p50 ms", f"{p50['gateway']:.2f}", f"{p50['direct']:.2f}",
         f"{p50['gateway'] / p50['direct']:.2f}x"),
        ("POST /v1/predict/fraud, p99 ms", f"{p99['gateway']:.2f}", f"{p99['direct']:.2f}",
         f"{p99['gateway'] / p99['direct']:.2f}x"),
        ("POST /v1/predict/fraud, mean ms", f"{mean['gateway']:.2f}", f"{mean['direct']:.2f}",
         f"{mean['gateway'] / mean['direct']:.2f}x"),
    ]
    if args.markdown:
        print(f"| {n} sequential requests each, interleaved | through gateway | straight to orchestrator | ratio |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\n| local JWT verification ({rates['alg']}, one core) | per second |\n|---|---|")
        print(f"| gateway TokenVerifier.verify (header, kid lookup, signature, claims) | {rates['verify']:,.0f} |")
        print(f"| the same plus the revocation check (10,000 entries in memory) | {rates['verify_checked']:,.0f} |")
        print(f"| python-jose decode alone | {rates['decode']:,.0f} |")
        print(f"| a token verified before (remembered until its exp), revocation checked | {rates['remembered']:,.0f} |")
        cost_us = (1 / rates["verify_checked"] - 1 / rates["verify"]) * 1e6
        print(f"\nRevocation check: {rates['revocation_lookup_ns']:,.0f} ns per lookup alone; "
              f"{cost_us:+.2f} µs per verification side by side (no network round trip).")
    else:
        for row in rows:
            print(f"{row[0]:<34} gateway {row[1]:>8}  direct {row[2]:>8}  ratio {row[3]}")
        print(f"gateway overhead p50: {p50['gateway'] - p50['direct']:.2f} ms")
        print(f"JWT verifications/s ({rates['alg']}): verify {rates['verify']:,.0f}, "
              f"with revocation check {rates['verify_checked']:,.0f}, decode {rates['decode']:,.0f}")
        print(f"revocation lookup alone: {rates['revocation_lookup_ns']:,.0f} ns")


if __name__ == "__main__":
    main()
