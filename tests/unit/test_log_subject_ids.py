"""Issue 20: logs carry no subject identifiers (docs/privacy.md): ids in URL paths and entity ids in
query strings are redacted by the chassis's log filter, whatever logger wrote the line."""
from __future__ import annotations

import uuid

import pytest

from services.chassis.logs import redact

UID = str(uuid.uuid4())


@pytest.mark.parametrize("line", [
    f'HTTP Request: DELETE http://127.0.0.1:9100/internal/subjects/{UID} "HTTP/1.1 200 OK"',
    f'HTTP Request: GET http://127.0.0.1:8002/internal/subjects/apikey%3A{UID} "HTTP/1.1 200 OK"',
    f"PATCH /admin/users/{UID} 200",
    f"principal apikey:{UID} did something",
    f"user {UID.upper()} disabled",
    f'HTTP Request: GET http://127.0.0.1:9100/v1/jobs/{UID.replace("-", "")}/result "HTTP/1.1 200 OK"',
])
def test_subject_ids_never_reach_a_log_line(line):
    out = redact(line)
    assert UID not in out.lower() and UID.replace("-", "") not in out.lower() and "[" in out


def test_entity_ids_in_query_strings_are_redacted_and_plain_text_is_kept():
    out = redact("HTTP Request: DELETE http://127.0.0.1:8004/internal/subjects?entity=customer&ids=C0042 200")
    assert "C0042" not in out and "/internal/subjects?[REDACTED]" in out
    assert redact("trace 0af7651916cd43dd8448eb211c80319c; what? yes") == "trace 0af7651916cd43dd8448eb211c80319c; what? yes"
