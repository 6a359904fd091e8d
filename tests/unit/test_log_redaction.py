"""The chassis log filter: secrets and personal data never reach a log line.

Each test logs through the real handler that setup_logging installs and reads the JSON line it
wrote, so the filter is exercised exactly as a service uses it.
"""
from __future__ import annotations

import io
import json
import logging

import pytest

from services.chassis.logs import redact, setup_logging

JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiIxMjMiLCJlbWFpbCI6ImFAYi5jIn0."
       "c2lnbmF0dXJlLWJ5dGVzLWhlcmUtYW5kLW1vcmU")
API_KEY = "ak_1a2b3c4d_Zm9vYmFyYmF6cXV4LXNlY3JldC1rZXktdmFsdWU"


@pytest.fixture
def lines():
    """setup_logging's handler, writing into a buffer; yields a function returning the parsed lines."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    setup_logging("redaction-test", "DEBUG")
    handler = root.handlers[0]
    buf = io.StringIO()
    handler.setStream(buf)

    def read() -> list[dict]:
        handler.flush()
        return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]

    yield read
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


log = logging.getLogger("aistack.test.redaction")


def one(read) -> tuple[dict, str]:
    (line,) = read()
    return line, json.dumps(line)


def test_email_in_message_and_args(lines):
    log.info("user %s logged in from %s", "alice.smith+ops@example.co.uk", "10.0.0.1")
    line, raw = one(lines)
    assert "alice" not in raw and "example.co.uk" not in raw
    assert line["message"] == "user [REDACTED_EMAIL] logged in from 10.0.0.1"


def test_jwt_and_bearer_token(lines):
    log.warning("rejected token %s", JWT)
    log.info("headers: Authorization: Bearer opaque-token-value-123456")
    first, second = lines()
    assert JWT not in json.dumps(first) and "[REDACTED_JWT]" in first["message"]
    assert "opaque-token-value-123456" not in second["message"]
    assert "Bearer" in second["message"] and "[REDACTED]" in second["message"]


def test_api_key(lines):
    log.info("introspecting key=%s for service", API_KEY)
    log.info("called with X-API-Key %s", API_KEY)
    raw = json.dumps(lines())
    assert "Zm9vYmFy" not in raw and "1a2b3c4d" not in raw
    assert raw.count("[REDACTED") >= 2


@pytest.mark.parametrize("text,secret", [
    ('password=hunter2-secret&user=bob', "hunter2-secret"),
    ('{"email": "x", "password": "correct horse battery"}', "correct horse battery"),
    ("login failed: password: 'p@ss w0rd'", "p@ss w0rd"),
    ("refresh_token=rt_abcdefghijklmnop", "rt_abcdefghijklmnop"),
    ("client_secret: s3cr3t-value", "s3cr3t-value"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ('{"authorization": "Token abcdef123456"}', "abcdef123456"),
    ("connecting to postgresql://aistack:db-pass-123@db.internal:5432/aistack", "db-pass-123"),
])
def test_password_pairs_and_credentials(lines, text, secret):
    log.info("event: %s", text)
    line, raw = one(lines)
    assert secret not in raw, line["message"]
    assert "[REDACTED" in line["message"]


def test_extra_fields_are_scrubbed(lines):
    log.info("request", extra={"email": "bob@example.com", "password": "pw-in-extra",
                               "headers": {"Authorization": f"Bearer {JWT}", "accept": "application/json"},
                               "body": {"username": "carol@example.org", "new_password": "n3w-pw"},
                               "attempts": 3, "path": "/v1/auth/token"})
    line, raw = one(lines)
    for secret in ("bob@example.com", "pw-in-extra", JWT, "carol@example.org", "n3w-pw"):
        assert secret not in raw
    assert line["password"] == "[REDACTED]"
    assert line["headers"]["Authorization"] == "[REDACTED]"
    assert line["headers"]["accept"] == "application/json"
    assert line["attempts"] == 3 and line["path"] == "/v1/auth/token"


def test_exception_text_is_scrubbed(lines):
    try:
        raise ValueError(f"bad credentials for dave@example.net with token {JWT}")
    except ValueError:
        log.exception("login failed")
    line, raw = one(lines)
    assert "dave@example.net" not in raw and JWT not in raw
    assert "ValueError" in line["exc_info"] and "[REDACTED_EMAIL]" in line["exc_info"]


def test_dict_message(lines):
    log.info({"event": "signup", "email": "erin@example.com", "password": "pw"})
    line, raw = one(lines)
    assert "erin@example.com" not in raw and '"pw"' not in raw
    assert line["event"] == "signup"


def test_ordinary_lines_are_untouched(lines):
    """Lines without secrets pass as they were: ids, numbers, paths, model names, token counts."""
    text = ("prediction ffb36293d338488c8c36c58c51110769 model=fraud version=2 cached=false "
            "prompt_tokens=12 rate limit 100% at /v1/predict/fraud; refresh_token_reused")
    log.info(text)
    log.info("took %.1f ms for %d rows", 12.5, 3)
    first, second = lines()
    assert first["message"] == text
    assert second["message"] == "took 12.5 ms for 3 rows"
    assert first["service"] == "redaction-test" and first["level"] == "INFO"


def test_uvicorn_and_child_loggers_go_through_the_filter(lines):
    logging.getLogger("uvicorn.error").info("client sent password=%s", "from-uvicorn")
    logging.getLogger("sqlalchemy.engine").warning("url postgresql://u:pw12345@h/db")
    raw = json.dumps(lines())
    assert "from-uvicorn" not in raw and "pw12345" not in raw


def test_redact_is_idempotent():
    once = redact(f"user a@b.io password=x token {JWT} key {API_KEY}")
    assert redact(once) == once
