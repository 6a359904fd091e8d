"""Fuzz fixtures: the admin credentials of the shared stack (the same login the e2e tests use)."""
from tests.e2e.conftest import admin_headers, admin_tokens  # noqa: F401 (pytest fixtures)
