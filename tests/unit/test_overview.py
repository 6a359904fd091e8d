"""The admin overview's arithmetic: Prometheus text in, rates, quantiles and ratios out."""
from __future__ import annotations

import json

import pytest

from services.gateway.overview import (
    Overview,
    Scrape,
    Upstreams,
    Window,
    parse_metrics,
    quantile,
    samples,
)

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def exposition(ok: int, errors: int, latencies: list[float], hits: int = 0, misses: int = 0,
               predictions: dict | None = None, route: str = "/v1/predict/{model}") -> str:
    """What chassis/metrics.py and the orchestrator expose, for these cumulative totals."""
    lines = ["# HELP aistack_http_requests_total HTTP requests served",
             "# TYPE aistack_http_requests_total counter",
             f'aistack_http_requests_total{{service="s",method="POST",route="{route}",status="200"}} {ok}',
             f'aistack_http_requests_total{{service="s",method="POST",route="{route}",status="503"}} {errors}',
             'aistack_http_requests_total{service="s",method="GET",route="/admin/overview",status="200"} 999',
             "# HELP aistack_http_request_duration_seconds HTTP request latency",
             "# TYPE aistack_http_request_duration_seconds histogram"]
    for le in (*BOUNDS, float("inf")):
        n = sum(1 for x in latencies if x <= le)
        label = "+Inf" if le == float("inf") else repr(le)
        lines.append(f'aistack_http_request_duration_seconds_bucket{{service="s",method="POST",route="{route}",'
                     f'le="{label}"}} {n}')
        lines.append(f'aistack_http_request_duration_seconds_bucket{{service="s",method="GET",'
                     f'route="/admin/overview",le="{label}"}} 999')
    lines += [f'aistack_http_request_duration_seconds_count{{service="s",method="POST",route="{route}"}} {len(latencies)}',
              f'aistack_http_request_duration_seconds_sum{{service="s",method="POST",route="{route}"}} {sum(latencies)}',
              "# HELP aistack_orchestrator_cache_requests_total Response cache lookups by result",
              "# TYPE aistack_orchestrator_cache_requests_total counter",
              f'aistack_orchestrator_cache_requests_total{{model="fraud",result="hit"}} {hits}',
              f'aistack_orchestrator_cache_requests_total{{model="fraud",result="miss"}} {misses}',
              "# HELP aistack_orchestrator_predictions_total Predictions served (rows)",
              "# TYPE aistack_orchestrator_predictions_total counter"]
    for (version, cached), n in (predictions or {}).items():
        lines.append(f'aistack_orchestrator_predictions_total{{model="fraud",version="{version}",'
                     f'cached="{cached}"}} {n}')
    return "\n".join(lines) + "\n"


def test_parse_sums_routes_and_leaves_the_dashboard_out():
    s = parse_metrics(exposition(8, 2, [0.004, 0.02, 0.2], hits=3, misses=1,
                                 predictions={("1", "false"): 5, ("1", "true"): 2, ("2", "false"): 4}))
    assert s.requests == 10 and s.errors == 2
    assert s.buckets[0.005] == 1 and s.buckets[0.025] == 2 and s.buckets[float("inf")] == 3
    assert s.cache == {("fraud", "hit"): 3, ("fraud", "miss"): 1}
    assert s.predictions == {("fraud", "1"): 7, ("fraud", "2"): 4}


def test_only_the_series_read_are_parsed_and_agree_with_prometheus_clients_parser():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()  # a real exposition around ours: neighbours by prefix, escapes
    Counter("aistack_http_requests_in_flight_like", "a neighbour by prefix", registry=registry).inc()
    Histogram("aistack_model_inference_seconds", "other", registry=registry).observe(0.1)
    requests = Counter("aistack_http_requests", "ours", ["route", "status"], registry=registry)
    requests.labels('/v1/a"b\\c{x}', "200").inc(4)
    requests.labels("/admin/overview", "200").inc(9)
    requests.labels("/v1/b", "503").inc(2)
    mixed = generate_latest(registry).decode() + exposition(8, 2, [0.004, 0.02, 0.2], hits=3, misses=1,
                                                            predictions={("1", "false"): 5})
    names = {name for name, _, _ in samples(mixed)}
    assert names == {"aistack_http_requests_total", "aistack_http_request_duration_seconds_bucket",
                     "aistack_orchestrator_cache_requests_total", "aistack_orchestrator_predictions_total"}
    routes = {labels.get("route") for name, labels, _ in samples(mixed) if name == "aistack_http_requests_total"}
    reference = {s.labels.get("route") for f in text_string_to_metric_families(mixed)
                 if f.name == "aistack_http_requests" for s in f.samples if s.name.endswith("_total")}
    assert routes == reference and '/v1/a"b\\c{x}' in routes
    s = parse_metrics(mixed)
    assert s.requests == 8 + 2 + 4 + 2 and s.errors == 2 + 2
    assert s.cache[("fraud", "hit")] == 3 and s.buckets[float("inf")] == 3


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.95, {0.1: 0.0, 1.0: 0.0, float("inf"): 10.0}) == 1.0  # beyond the top bound
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.5, {}) is None


def test_window_uses_deltas_and_survives_a_counter_reset():
    before = parse_metrics(exposition(100, 10, [0.2] * 110, hits=40, misses=60))
    after = parse_metrics(exposition(150, 10, [0.2] * 110 + [0.004] * 50, hits=90, misses=60))
    w = Window(seconds=10.0)
    w.add(after, before)
    stats = w.stats()
    assert stats["rps"] == 5.0 and stats["error_rate"] == 0.0 and stats["requests"] == 50
    assert stats["cache_hit_ratio"] == 1.0
    assert stats["p50_ms"] == pytest.approx(2.5) and stats["p95_ms"] <= 5.0
    restarted = parse_metrics(exposition(3, 1, [0.01] * 4))
    w = Window(seconds=2.0)
    w.add(restarted, after)  # the process restarted: counters start from zero again
    assert w.stats()["rps"] == 2.0 and w.stats()["error_rate"] == 0.25


def test_no_traffic_means_no_ratios():
    s = parse_metrics(exposition(5, 0, [0.01] * 5))
    w = Window(seconds=5.0)
    w.add(s, s)
    assert w.stats() == {"rps": 0.0, "p50_ms": None, "p95_ms": None, "error_rate": None,
                         "cache_hit_ratio": None, "requests": 0}
    assert Window().stats()["rps"] is None
    assert isinstance(Scrape().buckets, dict)


class FakeStack:
    """Replicas answering /ready, /metrics and /openapi.json from counters the test moves."""

    def __init__(self):
        self.totals = {"http://orch-a": [0, 0], "http://orch-b": [0, 0], "http://model": [0, 0]}
        self.down: set[str] = set()
        self.calls: list[str] = []

    async def fetch(self, url: str, headers: dict) -> tuple[int, bytes]:
        self.calls.append(url)
        base, _, path = url.partition("//")[2].partition("/")
        base = "http://" + base
        if base in self.down:
            raise ConnectionError("refused")
        if path == "ready":
            return 200, b'{"status": "ready"}'
        if path == "openapi.json":
            return 200, json.dumps({"info": {"version": "0.1.0"}}).encode()
        ok, hits = self.totals[base]
        return 200, exposition(ok, 0, [0.01] * ok, hits=hits, misses=ok - hits,
                               predictions={("2", "false"): ok}).encode()

    def move(self, base: str, requests: int, hits: int) -> None:
        self.totals[base][0] += requests
        self.totals[base][1] += hits


async def _get(doc: dict, status: int = 200):
    async def get(path: str, headers: dict | None = None):
        if isinstance(doc, Exception):
            raise doc
        return status, json.dumps(doc(path) if callable(doc) else doc).encode()
    return get


async def test_overview_aggregates_replicas_models_and_jobs():
    fake = FakeStack()
    ov = Overview(fake.fetch, {"orchestrator": ["http://orch-a", "http://orch-b"], "model": ["http://model"]},
                  every_s=5, window_s=60, summary_s=60, self_metrics=lambda: exposition(0, 0, []),
                  self_version="0.1.0")
    await ov.scrape_once()
    fake.move("http://orch-a", 30, 10)
    fake.move("http://orch-b", 10, 10)
    fake.down.add("http://model")
    await ov.scrape_once()

    policies = {"fraud": {"routes": {"1": 90, "2": 10}}, "minilm": {"routes": {}}}
    model = await _get(lambda p: [{"name": "fraud", "version": "1", "state": "READY"},
                                  {"name": "fraud", "version": "2", "state": "READY"},
                                  {"name": "minilm", "version": "1", "state": "READY"}]
                       if p == "/v2/repository/index" else {"versions": ["1", "2"], "platform": "sklearn"})
    usage = [{"principal": "apikey:7", "requests": 3, "rows": 30, "cached_rows": 10, "models": {"fraud": 30}}]
    orchestrator = await _get(lambda p: {"principals": usage} if p.startswith("/admin/usage")
                              else {"policy": policies[p.split("/")[3]]})
    pipeline = await _get({"jobs": [{"id": "j2", "status": "succeeded"}, {"id": "j1", "status": "running"}]})
    doc = await ov.snapshot({"X-Principal": "admin"}, Upstreams(model, orchestrator, pipeline))

    services = {s["name"]: s for s in doc["services"]}
    assert services["gateway"]["replicas"][0]["status"] == "ready"
    orch = services["orchestrator"]
    assert orch["status"] == "ready" and [r["version"] for r in orch["replicas"]] == ["0.1.0", "0.1.0"]
    assert orch["requests"] == 40 and orch["cache_hit_ratio"] == 0.5 and orch["error_rate"] == 0.0
    assert orch["p95_ms"] is not None and orch["p95_ms"] <= 10.0
    assert services["model"]["status"] == "down" and "refused" in services["model"]["replicas"][0]["detail"]
    assert doc["traffic"]["summary"]["cache_hit_ratio"] == 0.5
    assert len(doc["traffic"]["series"]) == 1 and doc["traffic"]["series"][0]["cache_hit_ratio"] == 0.5
    fraud = next(m for m in doc["models"] if m["name"] == "fraud")
    assert [v["version"] for v in fraud["versions"]] == ["1", "2"] and fraud["policy"]["routes"] == {"1": 90, "2": 10}
    assert fraud["predictions_per_s"] > 0 and set(fraud["by_version"]) == {"2"}
    assert [j["id"] for j in doc["jobs"]] == ["j1", "j2"]  # running first
    assert doc["usage"] == usage  # per-principal usage from the orchestrator's API, not /metrics
    assert doc["errors"] == {}
    # The version is fetched once, not on every scrape.
    assert sum(1 for c in fake.calls if c == "http://orch-a/openapi.json") == 1


async def test_overview_reports_what_it_could_not_reach():
    fake = FakeStack()
    ov = Overview(fake.fetch, {"orchestrator": ["http://orch-a"]}, every_s=5)
    down = await _get(ConnectionError("refused"))
    doc = await ov.snapshot({}, Upstreams(down, down, down))
    assert doc["models"] == [] and doc["jobs"] == []
    assert "model server unreachable" in doc["errors"]["models"]
    assert "pipeline unreachable" in doc["errors"]["jobs"]
    assert doc["usage"] == [] and "orchestrator unreachable" in doc["errors"]["usage"]
    assert len(ov.ring) == 1  # an overview before the first scrape scrapes now: health is known
    assert doc["services"][0]["replicas"][0]["status"] == "ready" and doc["traffic"]["series"] == []
