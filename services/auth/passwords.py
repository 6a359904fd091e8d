"""Password rules per NIST SP 800-63B revision 4 (3.1.1.2), framework-free.

At least 15 characters (passwords are the only factor here), at least 64 accepted (we take up to
1024), any characters, no composition rules, no expiry. Refused: values on the blocklist shipped in
data/password-blocklist.txt, one character repeated, and context-specific values (the service's
name, the account's e-mail or its local part). Compared after Unicode NFKC normalisation,
case-insensitively and with spaces removed, so "Password Password" is as bad as "passwordpassword".
"""
from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

from services.chassis.errors import AppError

MIN_LENGTH = 15
MAX_LENGTH = 1024
BLOCKLIST = Path(__file__).with_name("data") / "password-blocklist.txt"
CONTEXT_WORDS = ("aistack",)


def _fold(value: str) -> str:
    return "".join(unicodedata.normalize("NFKC", value).lower().split())


@functools.cache
def blocklist() -> frozenset[str]:
    lines = BLOCKLIST.read_text(encoding="utf-8").splitlines()
    return frozenset(_fold(line) for line in lines if line.strip() and not line.startswith("#"))


def password_problem(password: str, email: str | None = None) -> str | None:
    """Why a password is refused, or None when it is acceptable."""
    normalized = unicodedata.normalize("NFKC", password)
    if len(normalized) < MIN_LENGTH:
        return f"at least {MIN_LENGTH} characters are needed"
    if len(normalized) > MAX_LENGTH:
        return f"at most {MAX_LENGTH} characters are accepted"
    folded = _fold(password)
    if folded in blocklist():
        return "this password is on the list of common or breached passwords"
    if len(set(folded)) <= 2:
        return "this password repeats one or two characters"
    context = set(CONTEXT_WORDS)
    if email:
        context |= {_fold(email), _fold(email.split("@", 1)[0])}
    # The account's or the service's name, alone or with only digits and punctuation around it.
    if any(len(c) >= 3 and not re.sub(r"[\W\d_]", "", folded.replace(c, "")) for c in context):
        return "this password is the account's name or the service's name"
    return None


def check_password(password: str, email: str | None = None, setting: str | None = None) -> None:
    """422 with the reason (and the rule) for a refused password; `setting` names a configured one."""
    problem = password_problem(password, email)
    if problem is None:
        return
    where = f" ({setting})" if setting else ""
    raise AppError(422, "weak_password", f"password refused{where}: {problem}",
                   {"min_length": MIN_LENGTH, "max_length": MAX_LENGTH,
                    "rules": "NIST SP 800-63B rev. 4: length, blocklist, no composition rules"})
