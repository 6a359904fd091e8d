"""JSON logs on stdout, each line carrying the current trace and span ids, with secrets scrubbed.

Every record that reaches the root handler goes through `RedactingFilter` first: e-mail
addresses, JWTs, API keys, Bearer/Basic credentials, Authorization headers, passwords (and other
secret-named fields) and credentials inside URLs are replaced by `[REDACTED]` markers, in the
message, its arguments, the `extra` fields and the formatted traceback alike.

Subject identifiers (issue 20, docs/privacy.md): logs carry none. Every UUID (user ids, `apikey:<id>`
principals, in paths like /internal/subjects/<id> or PATCH /admin/users/<id>, plain or
percent-encoded, and 32-hex ids as a path segment such as /v1/jobs/<id>) becomes `[ID]`, as does
the value of an `extra` field in ID_KEYS (job and prediction ids); the query string of a logged URL
(entity ids such as ?ids=C0042) becomes `?[REDACTED]`, so erasure never has to search the logs.
"""
from __future__ import annotations

import datetime
import logging
import re
import sys
import uuid
from typing import Any

from opentelemetry import trace
from pythonjsonlogger import jsonlogger


class _TraceContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else None
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else None
        return True


# -- redaction -----------------------------------------------------------------------------------
REDACTED = "[REDACTED]"
# Field names whose values are secret whatever they look like (compared lower-case, "-" as "_").
SECRET_KEYS = frozenset({
    "password", "passwd", "pwd", "new_password", "old_password", "current_password", "secret",
    "client_secret", "token", "access_token", "refresh_token", "id_token", "api_key", "apikey",
    "x_api_key", "authorization", "proxy_authorization", "cookie", "set_cookie", "private_key",
    "introspection_token", "x_internal_token",
})
# Fields that name one object of a subject (a batch job, a prediction): their values become [ID]
# whatever their shape (a job id is 32 hex, a form trace ids share, which stay readable elsewhere).
ID_KEYS = frozenset({"job", "job_id", "prediction_id"})
_SECRET_NAMES = (r"(?:new_|old_|current_)?passw(?:or)?d|pwd|(?:client_)?secret|(?:access_|refresh_|id_)?token"
                 r"|api[_-]?key|x-api-key|x-internal-token|(?:proxy-)?authorization|private_key")
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Credentials inside URLs: scheme://user:password@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@"), rf"\g<1>{REDACTED}@"),
    # JWTs (header and payload are base64url JSON, so both start with "eyJ").
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"), "[REDACTED_JWT]"),
    # aistack API keys (services/auth: "ak_<8 hex>_<secret>") and common provider key shapes.
    (re.compile(r"\b(?:ak_[A-Za-z0-9_-]{12,}|sk-[A-Za-z0-9_-]{16,})"), "[REDACTED_API_KEY]"),
    # Authorization schemes, wherever they appear (headers, reprs, messages).
    (re.compile(r"(?i)\b(Bearer|Basic|Token|Digest)\s+[A-Za-z0-9._~+/=-]{6,}"), rf"\g<1> {REDACTED}"),
    # name=value / "name": "value" / name: value pairs whose name says secret.
    (re.compile(rf"""(?ix)
        (["']?\b(?:{_SECRET_NAMES})\b["']?\s*[:=]\s*    # the name and its separator,
         (?:(?:Bearer|Basic|Token|Digest)\s+)?+)         # and an auth scheme, kept
        (?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|(?!\[REDACTED)[^\s,;&}}\])]+)  # the value
        """), rf"\g<1>{REDACTED}"),
    # E-mail addresses.
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "[REDACTED_EMAIL]"),
    # Subject identifiers: UUIDs (users, API keys, anything keyed by one; also right after a
    # percent-encoded ':' as in apikey%3A<id>), and query strings of URLs (entity ids).
    (re.compile(r"(?i)(?:(?<=%3A)|(?<![0-9a-f]))[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                r"(?![0-9a-f])"), "[ID]"),
    # ... and dash-less ones as a URL path segment (job ids: /v1/jobs/<32 hex>).
    (re.compile(r"(?i)(?<=/)[0-9a-f]{32}(?=[/?#\s\"']|$)"), "[ID]"),
    (re.compile(r"(\b(?:https?://[^\s?\"']+|/[A-Za-z0-9_./%:-]*))\?[^\s\"']+"), r"\g<1>?[REDACTED]"),
]
# LogRecord's own attributes: everything else in record.__dict__ came from `extra`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "trace_id", "span_id", "taskName"}


def redact(text: str) -> str:
    """Scrub secrets and personal data out of one string."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SECRET_KEYS


def redact_value(value: Any, depth: int = 0) -> Any:
    """Scrub strings, and containers recursively (values under secret-named keys entirely)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if depth > 6:
        return value
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret_key(k) and v is not None else redact_value(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact_value(v, depth + 1) for v in value]
    if value is None or isinstance(value, (int, float, bool, datetime.date, datetime.time, uuid.UUID)):
        return value
    return redact(str(value))  # anything else is logged through its str(): scrub that


class RedactingFilter(logging.Filter):
    """Scrub a record in place before any handler formats it; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if isinstance(record.msg, dict):
                record.msg = redact_value(record.msg)
                record.args = ()
            else:
                record.msg, record.args = redact(record.getMessage()), ()
            for key in [k for k in vars(record) if k not in _RECORD_ATTRS]:
                value = getattr(record, key)
                setattr(record, key, REDACTED if _is_secret_key(key) and value is not None
                        else "[ID]" if key in ID_KEYS and value is not None else redact_value(value))
            if record.exc_info and record.exc_info[0] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None  # formatters re-render exc_info; exc_text is the scrubbed copy
            elif record.exc_text:
                record.exc_text = redact(record.exc_text)
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
        except Exception:  # noqa: BLE001  # a log line must never be lost; drop what we could not scrub
            record.msg, record.args = "[log message dropped: redaction failed]", ()
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    """Replace root handlers so uvicorn, celery and our loggers all speak one format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RedactingFilter())
    handler.addFilter(_TraceContextFilter())
    handler.setFormatter(jsonlogger.JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={"service": service},
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Access logs duplicate our metrics and traces; keep them at WARNING.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
