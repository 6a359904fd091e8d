"""Tests write nothing into tracked files: the browser tests' screenshots go to a temporary
directory unless AISTACK_UPDATE_SCREENSHOTS=1 asks to refresh docs/screenshots/."""
from __future__ import annotations

from pathlib import Path

import pytest

ui = pytest.importorskip("tests.e2e.test_admin_ui", reason="the browser tests need playwright")
ROOT = Path(__file__).resolve().parents[2]


def test_screenshots_go_to_a_temporary_directory_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("AISTACK_UPDATE_SCREENSHOTS", raising=False)
    assert ui.screenshot_dir(tmp_path) == tmp_path


def test_the_explicit_command_refreshes_the_docs_screenshots(tmp_path, monkeypatch):
    monkeypatch.setenv("AISTACK_UPDATE_SCREENSHOTS", "1")
    assert ui.screenshot_dir(tmp_path) == ROOT / "docs" / "screenshots"
