"""`aistack logs`: the services' JSON log files merged in time order, filtered by service/trace."""
from __future__ import annotations

import json
from pathlib import Path

from services.cli.logs import follow, merged


def write(path: Path, *records) -> None:
    with path.open("a") as fh:
        for r in records:
            fh.write((json.dumps(r) if isinstance(r, dict) else r) + "\n")


def rec(time: str, service: str, message: str, trace_id: str | None = None) -> dict:
    return {"time": time, "level": "INFO", "service": service, "message": message, "trace_id": trace_id}


def test_lines_of_every_service_merge_in_time_order_and_filter_by_trace(tmp_path):
    write(tmp_path / "gateway.log", rec("2026-12-01 10:00:00,100", "gateway", "in", "t1"),
          rec("2026-12-01 10:00:00,900", "gateway", "out", "t1"))
    write(tmp_path / "model.log", rec("2026-12-01 10:00:00,500", "model", "infer", "t1"),
          "a library printing plain text",  # keeps the time of the line before it
          rec("2026-12-01 10:00:00,500", "model", "same time, other trace", "t2"))
    write(tmp_path / "orchestrator.log", rec("2026-12-01 10:00:00,300", "orchestrator", "route", "t1"))

    lines = list(merged(tmp_path))
    assert [line.time for line in lines] == sorted(line.time for line in lines)
    assert [line.record["message"] for line in merged(tmp_path, trace_id="t1")] == ["in", "route", "infer", "out"]
    assert [line.record["message"] for line in merged(tmp_path, services=["model"])] == [
        "infer", "a library printing plain text", "same time, other trace"]


def test_follow_prints_new_lines_as_they_come(tmp_path):
    write(tmp_path / "gateway.log", rec("2026-12-01 10:00:00,100", "gateway", "old"))
    seen = []
    for line in follow(tmp_path, every=0.01, stop=lambda: len(seen) >= 2):
        seen.append(line.record["message"])
        if len(seen) == 1:
            write(tmp_path / "auth.log", rec("2026-12-01 10:00:01,000", "auth", "new"))
    assert seen == ["old", "new"]
