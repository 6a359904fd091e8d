"""compose.yaml's wiring, proven without Docker.

Each aistack service of compose.yaml runs as a local process with the environment compose would
give its container (x-env anchors, ${VAR:-default} interpolation, the image's ENV), the command
compose would run, and one translation: compose hostnames become 127.0.0.1 on free ports
(postgres and redis become this run's own database and Redis db, otel-collector an OTLP receiver
in the test), volume paths become temporary directories. They start in depends_on order, gated
as compose gates them (service_completed_successfully, service_healthy via the healthcheck URL).
Then a prediction goes through the gateway, authenticated as compose's bootstrap admin.
"""
from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.conftest import _admin, _with_db, claimed_redis_db, free_port
from tests.e2e.test_tracing import SERVER, OtlpReceiver

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
INFRA = {"postgres", "redis", "otel-collector", "jaeger", "loki", "prometheus", "grafana"}
ROW = {"amount": 250.0, "txn_count_24h": 5, "txn_amount_24h": 400.0, "avg_amount_30d": 40.0,
       "account_age_days": 30, "chargebacks_90d": 1, "distinct_merchants_7d": 6}


# -- what compose would do ----------------------------------------------------------------------
_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        val = env.get(name)
        if op in (":-", ":?") and not val:
            val = None
        if val is not None:
            return val
        if op and op.endswith("?"):
            raise AssertionError(f"compose would refuse to start: {name} unset ({arg})")
        return arg if op else ""
    return _VAR.sub(sub, value)


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def required_variables() -> set[str]:
    return {m.group("name") for m in _VAR.finditer(COMPOSE_TEXT) if m.group("op") in (":?", "?")}


def dotenv_for_test() -> dict[str, str]:
    """Values for every variable .env.example lists: fresh secrets, never the placeholders."""
    from cryptography.fernet import Fernet

    values = {name: secrets.token_urlsafe(16) for name in env_example()}
    values["AUTH_KEY_ENCRYPTION_KEY"] = Fernet.generate_key().decode()
    values["AUTH_BOOTSTRAP_ADMIN_EMAIL"] = "admin@compose.test"
    return values


def image_env(service: str) -> dict[str, str]:
    """The ENV of the Dockerfile's runtime stage (what the image gives every container)."""
    text = (ROOT / "Dockerfile").read_text()
    stage = text.split(" AS runtime", 1)[1].split("\nFROM ", 1)[0]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", stage, re.MULTILINE):
        for pair in block.replace("\\\n", " ").split():
            key, _, value = pair.partition("=")
            env[key] = value.replace("${SERVICE}", service)
    env.pop("PATH", None)
    return env


def built_service(name: str) -> str:
    """The SERVICE build argument of the image a compose service runs."""
    image = SERVICES[name].get("image")
    for spec in SERVICES.values():
        if spec.get("image") == image and "build" in spec and "profiles" not in spec:
            return spec["build"]["args"]["SERVICE"]
    raise AssertionError(f"no service builds {image} for {name}")


def health_url(name: str) -> tuple[int, str] | None:
    test = " ".join(SERVICES[name].get("healthcheck", {}).get("test", []))
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/[^'\" ]*)", test)
    return (int(m.group(1)), m.group(2)) if m else None


def app_services() -> list[str]:
    """aistack's own processes that a plain `docker compose up` starts (no profiles)."""
    return [n for n, s in SERVICES.items()
            if n not in INFRA and str(s.get("image", "")).startswith("aistack/") and not s.get("profiles")]


def is_one_shot(name: str) -> bool:
    return any(dep.get("condition") == "service_completed_successfully" and dep_name == name
               for s in SERVICES.values() for dep_name, dep in (s.get("depends_on") or {}).items())


# -- structure ------------------------------------------------------------------------------------
def test_secrets_come_from_the_env_file_and_the_example_lists_them_all():
    example = env_example()
    missing = required_variables() - set(example)
    assert not missing, f".env.example lacks {sorted(missing)}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".dockerignore").read_text().split()
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "AUTH_KEY_ENCRYPTION_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert name in required_variables(), f"{name} must be required, not defaulted"
        assert "change-me" in example[name]


def test_every_long_running_service_has_a_healthcheck_and_gated_dependencies():
    for name in app_services():
        spec = SERVICES[name]
        if is_one_shot(name) or name == "beat":
            continue
        assert spec.get("healthcheck"), name
        for dep, cond in (spec.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert cond.get("condition") in ("service_healthy", "service_completed_successfully",
                                             "service_started"), (name, dep)
            if cond["condition"] == "service_healthy":
                assert SERVICES[dep].get("healthcheck"), f"{name} waits for {dep}'s health, which has none"


def test_model_runs_two_replicas_and_the_gpu_profile_reserves_an_nvidia_device():
    assert SERVICES["model"]["deploy"]["replicas"] == 2
    gpu = SERVICES["model-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]


def test_prometheus_scrapes_every_service_and_the_worker():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = set()
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            targets.update(sc["targets"])
        for sd in job.get("dns_sd_configs", []):
            targets.update(f"{n}:{sd['port']}" for n in sd["names"])
    for name in app_services():
        if is_one_shot(name) or name == "beat":
            continue
        port, _ = health_url(name)
        assert f"{name}:{port}" in targets, f"prometheus does not scrape {name}:{port}"
    for host_path, _ in (v.split(":", 1) for s in SERVICES.values() for v in s.get("volumes", [])
                         if isinstance(v, str) and v.startswith("./")):
        assert (ROOT / host_path).exists(), f"compose mounts missing {host_path}"


def test_logs_go_over_otlp_to_loki_and_grafana_links_them_to_traces():
    """Issue 17.6: the logging service. Every process exports its log records over OTLP; the
    collector sends them to Loki; Grafana links a Loki line's trace id to Jaeger and back."""
    env = SERVICES["gateway"]["environment"]
    assert env["OTEL_LOGS_EXPORTER"] == "otlp" and env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector")
    collector = yaml.safe_load((ROOT / "deploy/otel-collector.yaml").read_text())
    logs = collector["service"]["pipelines"]["logs"]
    assert "otlp" in logs["receivers"]
    (exporter,) = logs["exporters"]
    assert collector["exporters"][exporter]["endpoint"] == "http://loki:3100/otlp"
    assert "loki" in SERVICES and "loki" in SERVICES["otel-collector"]["depends_on"]
    loki = yaml.safe_load((ROOT / "deploy/loki/loki.yaml").read_text())
    assert loki["limits_config"]["allow_structured_metadata"] is True  # trace ids ride as metadata

    sources = {}
    for path in (ROOT / "deploy/grafana/provisioning/datasources").glob("*.yaml"):
        sources.update({d["uid"]: d for d in yaml.safe_load(path.read_text())["datasources"]})
    to_trace = sources["loki"]["jsonData"]["derivedFields"][0]
    assert to_trace["datasourceUid"] == "jaeger" and to_trace["matcherRegex"] == "trace_id"
    to_logs = sources["jaeger"]["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == "loki" and "trace_id=" in to_logs["query"]


# -- the whole stack as processes, wired by compose.yaml ----------------------------------------------
@pytest.fixture(scope="module")
def fresh_database_url(postgres_server_url):
    """An empty database: compose's migrate service must create every schema itself."""
    name = f"aistack_compose_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(postgres_server_url, f'CREATE DATABASE "{name}"'))
    yield _with_db(postgres_server_url, name)
    asyncio.run(_admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def own_redis_url(redis_server_url):
    with claimed_redis_db(redis_server_url) as url:
        yield url


class ComposeAsProcesses:
    def __init__(self, data_dir: Path, database_url: str, redis_url: str, otlp_endpoint: str, models_dir: Path):
        self.data_dir, self.models_dir = data_dir, models_dir
        self.database_url, self.redis_url, self.otlp = database_url, redis_url, otlp_endpoint
        self.dotenv = dotenv_for_test()
        # (service, container port) -> local port
        self.ports = {(n, health_url(n)[0]): free_port() for n in app_services() if health_url(n)}

    def local_port(self, service: str, port: int) -> int:
        key = (service, port)
        assert key in self.ports, f"nothing in compose listens on {service}:{port}"
        return self.ports[key]

    def map_value(self, service: str, key: str, value: str, volumes: dict[str, Path]) -> str:
        if value == "0.0.0.0":
            return "127.0.0.1"
        own = [p for (s, p) in self.ports if s == service]
        if key.endswith("_PORT") and value.isdigit() and int(value) in own:
            return str(self.local_port(service, int(value)))

        def url(m: re.Match) -> str:
            parts = urlsplit(m.group(0))
            host, port = parts.hostname, parts.port
            if host == "postgres":
                assert key == "DATABASE_URL" and port == 5432, (service, key, value)
                return self.database_url
            if host == "redis":
                assert key == "REDIS_URL" and port == 6379, (service, key, value)
                return self.redis_url
            if host == "otel-collector":
                assert port == 4318, "the services export OTLP over HTTP"
                return self.otlp
            if host in SERVICES:
                return f"http://127.0.0.1:{self.local_port(host, port)}{parts.path}"
            return m.group(0)

        value = re.sub(r"[a-z]+://[^\s,]+", url, value)
        for target, local in volumes.items():
            if value == target or value.startswith(target + "/"):
                return str(local) + value[len(target):]
        return value

    def volumes(self, service: str) -> dict[str, Path]:
        out = {}
        for v in SERVICES[service].get("volumes", []):
            name, target = v.split(":")[:2]
            if name == "models":
                out[target] = self.models_dir
            else:
                out[target] = self.data_dir / "volumes" / name
                out[target].mkdir(parents=True, exist_ok=True)
        return out

    def proc(self, name: str):
        from services.cli.stack import Proc

        spec = SERVICES[name]
        svc = built_service(name)
        volumes = self.volumes(name)
        compose_env = {k: interpolate(str(v), self.dotenv) for k, v in (spec.get("environment") or {}).items()}
        env = {**os.environ, **{k: self.map_value(name, k, v, volumes)
                                for k, v in {**image_env(svc), **compose_env}.items()}}
        command = spec.get("command") or ["python", "-m", f"services.{svc}"]  # the image's CMD
        command = [self.map_value(name, "", interpolate(str(a), self.dotenv), volumes) for a in command]
        bin_dir = Path(sys.executable).parent
        argv = {"python": [sys.executable], "aistack": [str(bin_dir / "aistack")],
                "celery": [sys.executable, "-m", "celery"]}[command[0]] + command[1:]
        health = health_url(name)
        ready = f"http://127.0.0.1:{self.local_port(name, health[0])}{health[1]}" if health else None
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return Proc(name, argv, env, ready, logs / f"{name}.log")

    def waves(self) -> list[list[str]]:
        """depends_on order: each wave needs only what earlier waves started (compose's order)."""
        todo, done, waves = set(app_services()), set(INFRA), []
        while todo:
            wave = sorted(n for n in todo if set(SERVICES[n].get("depends_on") or {}) <= done)
            assert wave, f"depends_on cycle or unknown dependency among {sorted(todo)}"
            waves.append(wave)
            done |= set(wave)
            todo -= set(wave)
        return waves


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory, fresh_database_url, own_redis_url, models_dir):
    from services.cli.stack import Stack

    receiver = OtlpReceiver()
    data_dir = tmp_path_factory.mktemp("compose")
    plan = ComposeAsProcesses(data_dir, fresh_database_url, own_redis_url, receiver.endpoint, models_dir)
    stack = Stack(data_dir, database_url=fresh_database_url, redis_url=own_redis_url)
    try:
        for wave in plan.waves():
            for name in (n for n in wave if is_one_shot(n)):
                p = plan.proc(name)
                done = subprocess.run(p.argv, env=p.env, capture_output=True, text=True, timeout=600,
                                      check=False)
                assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            stack.launch([plan.proc(n) for n in wave if not is_one_shot(n)], ready_timeout=240)
        yield plan, stack, receiver
    finally:
        stack.stop()
        receiver.close()


def test_the_stack_compose_describes_serves_a_prediction(compose_stack):
    plan, stack, receiver = compose_stack
    running = {p.name for p in stack.procs}
    assert {"gateway", "auth", "orchestrator", "model", "features", "pipeline", "worker", "beat"} <= running
    assert all(p.popen.poll() is None for p in stack.procs), [p.name for p in stack.procs if p.popen.poll()]

    gateway = f"http://127.0.0.1:{plan.local_port('gateway', 8000)}"
    email, password = plan.dotenv["AUTH_BOOTSTRAP_ADMIN_EMAIL"], plan.dotenv["AUTH_BOOTSTRAP_ADMIN_PASSWORD"]
    login = httpx.post(f"{gateway}/v1/auth/token", data={"username": email, "password": password}, timeout=30)
    assert login.status_code == 200, login.text
    headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    r = httpx.post(f"{gateway}/v1/predict/fraud", json={"inputs": ROW}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fraud" and body["outputs"]["label"] in (0, 1)

    # Every hop reported to the collector under the name compose gives it.
    names = {n: SERVICES[n]["environment"]["OTEL_SERVICE_NAME"] for n in ("gateway", "orchestrator", "model")}
    spans = receiver.wait_for(r.headers["x-trace-id"], lambda spans: {s.service for s in spans
                                                                      if s.kind == SERVER} >= set(names.values()))
    assert {s.service for s in spans} >= set(names.values())
