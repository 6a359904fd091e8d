"""The admin overview: what the gateway knows about the whole stack, aggregated in one answer.

A background loop scrapes every upstream replica (and the gateway itself) every few seconds:
`/ready` for health, `/metrics` (Prometheus text) for traffic, `/openapi.json` now and then for the
version. The samples stay in a small in-process ring; requests per second, p50/p95 latency (from
histogram bucket deltas), error rate (status >= 500) and the response-cache hit ratio are computed
from the deltas between samples, never from lifetime totals. Models, versions, traffic policies and
running jobs are read from their owners' APIs when an overview is asked for.

Framework-free: an async `fetch(url, headers) -> (status, body)` callable does all the I/O.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("aistack.gateway.overview")

Fetch = Callable[..., Awaitable[tuple[int, bytes]]]

REQUESTS = "aistack_http_requests"  # counter family name (the parser drops _total)
LATENCY = "aistack_http_request_duration_seconds"
CACHE = "aistack_orchestrator_cache_requests"
PREDICTIONS = "aistack_orchestrator_predictions"
# The dashboard's own traffic is not the traffic an operator wants to see.
IGNORED_ROUTES = frozenset({"/admin/overview", "/admin/", "/admin", "/admin/assets"})
JOB_STATES_ACTIVE = ("queued", "running")


# -- one scrape of one replica -------------------------------------------------------------------
@dataclass
class Scrape:
    """Cumulative counters of one replica at one moment (what /metrics said)."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    cache: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, result) -> count
    predictions: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, version) -> rows


def parse_metrics(text: str) -> Scrape:
    """Sum the families the overview needs over routes and methods (dashboard routes left out)."""
    out = Scrape()
    for name, labels, value in samples(text):
        if name == REQUESTS_TOTAL:
            if labels.get("route") in IGNORED_ROUTES:
                continue
            out.requests += value
            if _status(labels.get("status")) >= 500:
                out.errors += value
        elif name == LATENCY_BUCKET:
            if labels.get("route") not in IGNORED_ROUTES:
                le = float(labels["le"])
                out.buckets[le] = out.buckets.get(le, 0.0) + value
        elif name == CACHE_TOTAL:
            key = (labels.get("model", ""), labels.get("result", ""))
            out.cache[key] = out.cache.get(key, 0.0) + value
        elif name == PREDICTIONS_TOTAL:
            key = (labels.get("model", ""), labels.get("version", ""))
            out.predictions[key] = out.predictions.get(key, 0.0) + value
    return out


REQUESTS_TOTAL, LATENCY_BUCKET = f"{REQUESTS}_total", f"{LATENCY}_bucket"
CACHE_TOTAL, PREDICTIONS_TOTAL = f"{CACHE}_total", f"{PREDICTIONS}_total"
_WANTED = (REQUESTS_TOTAL, LATENCY_BUCKET, CACHE_TOTAL, PREDICTIONS_TOTAL)
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def samples(text: str):
    """(name, labels, value) of the sample lines of the four series read here, in Prometheus text
    format. Only those lines are parsed, with one regex each: prometheus_client's general parser,
    run over every family of every replica every few seconds, was most of an idle gateway's CPU
    (issue 18 profile)."""
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        brace = line.find("{")
        if brace == -1:
            name, _, rest = line.partition(" ")
            labels = {}
        else:
            close = line.rfind("}")
            name, rest = line[:brace], line[close + 1:]
            labels = {k: _unescape(v) for k, v in _LABEL.findall(line, brace + 1, close)}
        if name not in _WANTED:  # a longer name with the same prefix
            continue
        try:
            yield name, labels, float(rest.split()[0])
        except (IndexError, ValueError):
            continue


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value)


def _status(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _delta(now: float, before: float) -> float:
    """Counter increase; a counter that went down was reset (process restart): count from zero."""
    return now - before if now >= before else now


def _delta_map(now: dict, before: dict) -> dict:
    return {k: _delta(v, before.get(k, 0.0)) for k, v in now.items()}


@dataclass
class Window:
    """Increases over an interval, summed over replicas."""

    seconds: float = 0.0
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    cache: dict[tuple[str, str], float] = field(default_factory=dict)
    predictions: dict[tuple[str, str], float] = field(default_factory=dict)

    def add(self, now: Scrape, before: Scrape) -> None:
        self.requests += _delta(now.requests, before.requests)
        self.errors += _delta(now.errors, before.errors)
        for attr in ("buckets", "cache", "predictions"):
            mine = getattr(self, attr)
            for k, v in _delta_map(getattr(now, attr), getattr(before, attr)).items():
                mine[k] = mine.get(k, 0.0) + v

    def stats(self) -> dict:
        s = self.seconds or math.nan
        hits = sum(v for (_, r), v in self.cache.items() if r == "hit")
        lookups = sum(self.cache.values())
        return {"rps": _round(self.requests / s), "p50_ms": _ms(quantile(0.5, self.buckets)),
                "p95_ms": _ms(quantile(0.95, self.buckets)),
                "error_rate": _round(self.errors / self.requests) if self.requests else None,
                "cache_hit_ratio": _round(hits / lookups) if lookups else None,
                "requests": round(self.requests)}


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile as Prometheus computes it: linear inside the bucket holding the rank."""
    if not buckets:
        return None
    items = sorted(buckets.items())
    total = items[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the largest finite bound: the bound is the best we know
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _round(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)


# -- the ring of samples ---------------------------------------------------------------------------
@dataclass
class Replica:
    service: str
    url: str  # "" for the gateway itself
    status: str = "unknown"  # ready | not_ready | down | unknown
    detail: str = ""
    version: str | None = None
    version_at: float = -math.inf
    checked_at: float | None = None


@dataclass
class Tick:
    t: float  # wall clock, for charts
    mono: float
    scrapes: dict[tuple[str, str], Scrape]  # (service, url) -> scrape; missing when it failed


class Overview:
    """Scrapes the replicas into a ring and answers the admin overview from it."""

    def __init__(self, fetch: Fetch, services: dict[str, list[str]], *, every_s: float = 5.0,
                 window_s: float = 300.0, summary_s: float = 60.0, self_name: str = "gateway",
                 self_metrics: Callable[[], str] | None = None, self_version: str | None = None,
                 version_every_s: float = 60.0, timeout_s: float = 3.0, upstreams: Upstreams | None = None):
        self.upstreams = upstreams
        self.fetch, self.every_s, self.window_s, self.summary_s = fetch, every_s, window_s, summary_s
        self.timeout_s, self.version_every_s = timeout_s, version_every_s
        self.self_name, self.self_metrics = self_name, self_metrics
        self.replicas: list[Replica] = []
        if self_metrics is not None:
            self.replicas.append(Replica(self_name, "", status="ready", version=self_version))
        for name, urls in services.items():
            self.replicas += [Replica(name, u) for u in urls]
        self.ring: deque[Tick] = deque(maxlen=max(2, int(window_s / every_s) + 2))

    # -- scraping ----------------------------------------------------------------------------------
    async def _get(self, url: str, headers: dict | None = None) -> tuple[int, bytes]:
        return await asyncio.wait_for(self.fetch(url, headers or {}), self.timeout_s)

    async def _scrape(self, r: Replica, now: float) -> Scrape | None:
        if not r.url:  # the gateway itself: its own registry, no HTTP
            r.checked_at = now
            return parse_metrics(self.self_metrics())
        ready, metrics = await asyncio.gather(self._get(f"{r.url}/ready"), self._get(f"{r.url}/metrics"),
                                              return_exceptions=True)
        r.checked_at = now
        if isinstance(ready, BaseException):
            r.status, r.detail = "down", f"{type(ready).__name__}: {ready}"[:200] if str(ready) else type(ready).__name__
        else:
            status, body = ready
            r.status = "ready" if status == 200 else "not_ready"
            r.detail = "" if status == 200 else _error_message(body, status)
        if r.status != "down" and time.monotonic() - r.version_at > self.version_every_s:
            r.version_at = time.monotonic()
            try:
                status, body = await self._get(f"{r.url}/openapi.json")
                if status == 200:
                    r.version = json.loads(body).get("info", {}).get("version")
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.debug("version of %s failed: %s", r.url, exc)
        if isinstance(metrics, BaseException) or metrics[0] != 200:
            return None
        try:
            return parse_metrics(metrics[1].decode("utf-8", "replace"))
        except Exception as exc:  # noqa: BLE001 - a bad exposition must not stop the others
            log.warning("cannot parse metrics of %s: %s", r.url, exc)
            return None

    async def scrape_once(self) -> Tick:
        now = time.monotonic()
        results = await asyncio.gather(*(self._scrape(r, now) for r in self.replicas), return_exceptions=True)
        scrapes = {(r.service, r.url): s for r, s in zip(self.replicas, results)
                   if isinstance(s, Scrape)}
        tick = Tick(time.time(), now, scrapes)
        self.ring.append(tick)
        return tick

    async def run(self) -> None:
        """Scrape forever, every every_s seconds (cancel the task to stop)."""
        while True:
            started = time.monotonic()
            try:
                await self.scrape_once()
            except Exception as exc:  # noqa: BLE001 - keep the loop alive
                log.warning("overview scrape failed: %s", exc)
            await asyncio.sleep(max(0.1, self.every_s - (time.monotonic() - started)))

    # -- arithmetic over the ring ------------------------------------------------------------------
    @staticmethod
    def window(before: Tick, now: Tick, service: str | None = None) -> Window:
        w = Window(seconds=max(1e-9, now.mono - before.mono))
        for key, scrape in now.scrapes.items():
            if service is not None and key[0] != service:
                continue
            prev = before.scrapes.get(key)
            if prev is not None:
                w.add(scrape, prev)
        return w

    def _since(self, seconds: float) -> tuple[Tick, Tick] | None:
        if len(self.ring) < 2:
            return None
        now = self.ring[-1]
        before = next((t for t in self.ring if now.mono - t.mono <= seconds + self.every_s / 2), self.ring[0])
        if before is now:
            before = self.ring[-2]
        return before, now

    def summary(self, service: str | None) -> dict:
        pair = self._since(self.summary_s)
        stats = self.window(*pair, service).stats() if pair else Window().stats()
        stats["window_s"] = round(pair[1].mono - pair[0].mono, 1) if pair else 0.0
        return stats

    def series(self, service: str | None) -> list[dict]:
        ticks = list(self.ring)
        return [{"t": round(now.t, 3), **self.window(before, now, service).stats()}
                for before, now in itertools.pairwise(ticks)]

    def model_traffic(self) -> dict[str, dict]:
        """Predictions per second (rows) by model and version, and cache hit ratio by model."""
        pair = self._since(self.summary_s)
        if not pair:
            return {}
        w = self.window(*pair)
        out: dict[str, dict] = {}
        for (model, version), rows in w.predictions.items():
            m = out.setdefault(model, {"predictions_per_s": 0.0, "by_version": {}, "cache_hit_ratio": None})
            m["by_version"][version] = round(m["by_version"].get(version, 0.0) + rows / w.seconds, 4)
            m["predictions_per_s"] = round(m["predictions_per_s"] + rows / w.seconds, 4)
        for model in {m for m, _ in w.cache}:
            hits = w.cache.get((model, "hit"), 0.0)
            lookups = sum(v for (m, _), v in w.cache.items() if m == model)
            m = out.setdefault(model, {"predictions_per_s": 0.0, "by_version": {}, "cache_hit_ratio": None})
            m["cache_hit_ratio"] = round(hits / lookups, 4) if lookups else None
        return out

    def services(self) -> list[dict]:
        names = list(dict.fromkeys(r.service for r in self.replicas))
        out = []
        for name in names:
            mine = [r for r in self.replicas if r.service == name]
            out.append({
                "name": name,
                "status": _worst(r.status for r in mine),
                "replicas": [{"url": r.url or "(this gateway)", "status": r.status, "detail": r.detail,
                              "version": r.version} for r in mine],
                **self.summary(name),
            })
        return out

    # -- the answer ----------------------------------------------------------------------------------
    async def snapshot(self, headers: dict[str, str], upstreams: Upstreams | None = None) -> dict:
        """Everything the dashboard's first screen shows. `headers` go to the admin APIs upstream
        (the caller's principal, as the gateway forwards it)."""
        upstreams = upstreams or self.upstreams
        if len(self.ring) < 2:  # first call right after start: have something to compare
            await self.scrape_once()
        models, jobs, usage = await asyncio.gather(self._models(upstreams, headers), self._jobs(upstreams, headers),
                                                   self._usage(upstreams, headers))
        traffic = self.model_traffic()
        for m in models.get("models", []):
            m.update(traffic.get(m["name"], {"predictions_per_s": 0.0, "by_version": {}, "cache_hit_ratio": None}))
        summary = self.summary(self.self_name)
        cache = self.summary("orchestrator")
        summary["cache_hit_ratio"] = cache["cache_hit_ratio"]
        gw_series = self.series(self.self_name)
        cache_series = {p["t"]: p["cache_hit_ratio"] for p in self.series("orchestrator")}
        for p in gw_series:
            p["cache_hit_ratio"] = cache_series.get(p["t"])
        errors = {k: v for k, v in (("models", models.get("error")), ("jobs", jobs.get("error")),
                                    ("usage", usage.get("error"))) if v}
        return {
            "generated_at": round(time.time(), 3),
            "scrape_every_s": self.every_s, "window_s": self.window_s, "summary_s": self.summary_s,
            "services": self.services(),
            "traffic": {"summary": summary, "series": gw_series},
            "models": models.get("models", []),
            "jobs": jobs.get("jobs", []),
            "usage": usage.get("principals", []),
            "errors": errors,
        }

    async def _models(self, up: Upstreams, headers: dict) -> dict:
        try:
            status, body = await up.model("/v2/repository/index")
            if status != 200:
                return {"error": f"model server answered {status}"}
            index = json.loads(body)
        except Exception as exc:  # noqa: BLE001
            return {"error": f"model server unreachable: {type(exc).__name__}"}
        by_name: dict[str, list[dict]] = {}
        for row in index:
            by_name.setdefault(row["name"], []).append(
                {"version": str(row["version"]), "state": row.get("state", ""), "reason": row.get("reason", "")})

        async def one(name: str, versions: list[dict]) -> dict:
            meta, policy = await asyncio.gather(up.model(f"/v2/models/{name}"),
                                                up.orchestrator(f"/admin/models/{name}/policy", headers),
                                                return_exceptions=True)
            out = {"name": name, "versions": versions, "platform": None, "policy": None}
            if not isinstance(meta, BaseException) and meta[0] == 200:
                doc = json.loads(meta[1])
                out["platform"] = doc.get("platform")
                out["latest"] = (doc.get("versions") or [None])[-1]
            if isinstance(policy, BaseException):
                out["policy_error"] = f"orchestrator unreachable: {type(policy).__name__}"
            elif policy[0] == 200:
                out["policy"] = json.loads(policy[1]).get("policy")
            else:
                out["policy_error"] = _error_message(policy[1], policy[0])
            return out

        return {"models": list(await asyncio.gather(*(one(n, vs) for n, vs in sorted(by_name.items()))))}

    async def _usage(self, up: Upstreams, headers: dict) -> dict:
        """Top principals by rows today: per-principal usage comes from the orchestrator's usage API,
        never from a metrics label (docs/metrics.md)."""
        doc = await _get_json(up.orchestrator, "orchestrator", "/admin/usage?days=1&limit=10", headers)
        return doc if "error" in doc else {"principals": doc.get("principals", [])}

    async def _jobs(self, up: Upstreams, headers: dict) -> dict:
        doc = await _get_json(up.pipeline, "pipeline", "/v1/jobs?limit=50", headers)
        if "error" in doc:
            return doc
        jobs = doc.get("jobs", [])
        # Running jobs first, then the most recent others (the list is newest first).
        active = [j for j in jobs if j.get("status") in JOB_STATES_ACTIVE]
        recent = [j for j in jobs if j.get("status") not in JOB_STATES_ACTIVE][:10]
        return {"jobs": active + recent}


@dataclass
class Upstreams:
    """GET one path on some replica of each upstream: async (path, headers) -> (status, body)."""

    model: Callable[..., Awaitable[tuple[int, bytes]]]
    orchestrator: Callable[..., Awaitable[tuple[int, bytes]]]
    pipeline: Callable[..., Awaitable[tuple[int, bytes]]]


_ORDER = {"down": 0, "not_ready": 1, "unknown": 2, "ready": 3}


def _worst(statuses) -> str:
    statuses = list(statuses)
    if not statuses:
        return "unknown"
    if all(s == "ready" for s in statuses):
        return "ready"
    if any(s == "ready" for s in statuses):
        return "degraded"
    return min(statuses, key=lambda s: _ORDER.get(s, 2))


async def _get_json(call, name: str, path: str, headers: dict) -> dict:
    """An upstream's JSON object, or {"error": why} when it cannot be reached or answers an error."""
    try:
        status, body = await call(path, headers)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{name} unreachable: {type(exc).__name__}"}
    if status != 200:
        return {"error": _error_message(body, status)}
    return json.loads(body)


def _error_message(body: bytes, status: int) -> str:
    try:
        doc = json.loads(body)
        err = doc.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("code") or status)[:300]
        if err:
            return str(err)[:300]
    except Exception:  # noqa: BLE001,S110
        pass
    return f"HTTP {status}"
