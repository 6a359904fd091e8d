"""Property-based fuzzing of every service's OpenAPI with schemathesis, against the running stack.

Each service is fuzzed directly (the services trust their network: no credentials except auth,
which checks tokens itself) and the public API once more through the gateway with an admin token.
Both schema-valid (positive) and schema-breaking (negative) requests are generated; every response
must be free of 5xx, match its operation's declared response schema and have a declared status.

Bounded for CI on two cores: MAX_EXAMPLES per operation and mode, no shrinking, derandomized (the
same cases every run). Operations that would damage the stack the rest of the suite shares are
left out, each with its reason (EXCLUDED).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import hypothesis
import pytest
import requests
from hypothesis import HealthCheck, Phase

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

# Cases per operation and mode; AISTACK_FUZZ_EXAMPLES=500 for a deeper run by hand.
MAX_EXAMPLES = int(os.environ.get("AISTACK_FUZZ_EXAMPLES", "20"))
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]

# (method, path regex) -> why it is not fuzzed against the shared stack.
EXCLUDED: dict[tuple[str, str], str] = {
    ("POST", r"^/v1/auth/token$"): "failed logins from one address start the per-IP lockout (15 min), "
                                   "which would lock every later login of the test run out",
    ("POST", r"^/admin/signing-keys/rotate$"): "rotates the stack's token signing key under every other test",
    ("POST", r"^/admin/users$"): "creates accounts in the run's shared user table",
    ("POST", r"^/admin/api-keys$"): "creates credentials in the run's shared key table",
    ("DELETE", r"^/admin/cache/"): "flushes the prediction cache other tests count hits on",
    ("PUT", r"^/admin/models/\{model\}/policy$"): "changes routing policies of shared models",
    ("POST", r"^/admin/models/\{model\}/policy/rollback$"): "changes routing policies of shared models",
    ("POST", r"^/admin/models/\{model\}/train$"): "queues a training run (minutes of CPU, new model versions)",
    ("POST", r"^/v1/jobs/\{job_id\}/cancel$"): "cancels other tests' batch jobs",
    ("POST", r"^/v1/jobs/batch-inference$"): "queues batch jobs on the shared worker",
    ("POST", r"^/admin/features/(entities|views|apply|materialize)$"): "writes the shared feature registry / "
                                                                      "online store the other tests read",
    ("PUT", r"^/admin/features/"): "rewrites the shared feature registry",
    ("DELETE", r"^/admin/features/"): "deletes from the shared feature registry",
    ("POST", r"^/v1/features/push$"): "overwrites the online feature values other tests read",
}


def excluded(method: str, path: str) -> str | None:
    for (m, pattern), why in EXCLUDED.items():
        if m == method.upper() and re.search(pattern, path):
            return why
    return None


@dataclass
class Target:
    name: str
    schema_from: str  # the service whose /openapi.json describes the operations
    send_to: str  # the service the requests go to
    with_token: bool


# Through the gateway: the upstreams' own schemas, sent to the gateway's public paths.
GATEWAY_PUBLIC = re.compile(r"^/(v1/(predict|embeddings|feedback|features|jobs|auth)|admin/)")
TARGETS = [
    Target("gateway", "gateway", "gateway", True),
    Target("auth", "auth", "auth", True),
    Target("orchestrator", "orchestrator", "orchestrator", False),
    Target("model", "model", "model", False),
    Target("features", "features", "features", False),
    Target("pipeline", "pipeline", "pipeline", False),
    Target("via-gateway:orchestrator", "orchestrator", "gateway", True),
    Target("via-gateway:features", "features", "gateway", True),
    Target("via-gateway:auth", "auth", "gateway", True),
    Target("via-gateway:pipeline", "pipeline", "gateway", True),
]
# Paths the gateway does not route (the upstream's internal or unexposed operations).
NOT_ROUTED = re.compile(r"^/(internal/|health|ready|metrics|admin/features/stats$)")


# Random path parameters almost never name a real model: each operation with {model} runs once more
# with the stack's real ones, so that bodies reach the model server, its batcher and the runtimes.
KNOWN_PATH_PARAMETERS = [{"model": "fraud", "version": "2"}, {"model": "minilm", "version": "1"}]


def fuzz_operation(operation, base_url: str, headers: dict, mode: GenerationMode,
                   path_parameters: dict | None = None) -> list[str]:
    """Run one operation's cases; the first failing case, as readable text."""
    failures: list[str] = []
    session = requests.Session()

    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                         print_blob=False, report_multiple_bugs=False)
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case):
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # a FailureGroup of schemathesis; reported below
            failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}] -> "
                            f"{response.status_code}: {str(exc).strip()[:1500]}\n  reproduce: "
                            f"{case.as_curl_command(headers=headers)}")
            raise

    try:
        run()
    except (Exception, BaseExceptionGroup):  # noqa: S110, BLE001 - the failure text is recorded
        pass
    finally:
        session.close()
    return failures[:1]


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_fuzz(stack, admin_headers, target: Target):
    # The gateway shows its schema to operators only (an admin token or the internal token).
    schema = schemathesis.openapi.from_url(f"{stack.url(target.schema_from)}/openapi.json", timeout=30,
                                           headers=dict(admin_headers))
    base_url = stack.url(target.send_to)
    headers = dict(admin_headers) if target.with_token else {}
    failures, fuzzed, skipped = [], 0, []
    for result in schema.get_all_operations():
        operation = result.ok()
        method, path = operation.method.upper(), operation.path
        if target.send_to == "gateway" and target.schema_from != "gateway" and (
                not GATEWAY_PUBLIC.match(path) or NOT_ROUTED.match(path)):
            continue
        if method == "GET" and re.match(r"^/(health|ready|metrics)$", path):
            continue  # platform endpoints: covered by the chassis tests, no inputs to fuzz
        why = excluded(method, path)
        if why:
            skipped.append(f"{method} {path}: {why}")
            continue
        fuzzed += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += fuzz_operation(operation, base_url, headers, mode)
        for known in KNOWN_PATH_PARAMETERS if "{model}" in path else ():
            pinned = {k: v for k, v in known.items() if "{" + k + "}" in path}
            failures += fuzz_operation(operation, base_url, headers, GenerationMode.POSITIVE, pinned)
    assert fuzzed, f"no operation of {target.name} was fuzzed"
    assert not failures, f"{len(failures)} failing operation(s) of {target.name}:\n\n" + "\n\n".join(failures)
