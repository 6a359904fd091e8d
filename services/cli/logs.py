"""`aistack logs`: the services' JSON log files of a local stack, merged in time order.

Each service of `aistack up` writes JSON lines (time, level, service, logger, message, trace_id)
to <data dir>/logs/<name>.log. Following one request means reading them together: this merges
them by time, filters by service and trace id, and can follow new lines as they are written.
Lines that are not JSON (a library printing to stdout) keep the time of the line before them.
"""
from __future__ import annotations

import heapq
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(order=True)
class Line:
    time: str
    source: str
    record: dict = field(compare=False)

    def render(self) -> str:
        r = self.record
        trace = f" trace_id={r['trace_id']}" if r.get("trace_id") else ""
        extra = {k: v for k, v in r.items()
                 if k not in ("time", "level", "service", "logger", "message", "trace_id", "span_id")}
        tail = f" {json.dumps(extra, default=str)}" if extra else ""
        return (f"{self.time} {r.get('service', self.source):<15} {r.get('level', ''):<7} "
                f"{r.get('message', '')}{trace}{tail}")


def parse(text: str, source: str, last_time: str = "") -> Line:
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        record = {"message": text.rstrip("\n"), "service": source}
    record.setdefault("service", source)
    return Line(str(record.get("time") or last_time), source, record)


def _matches(line: Line, services: set[str] | None, trace_id: str | None) -> bool:
    if services and line.source not in services and line.record.get("service") not in services:
        return False
    return trace_id is None or line.record.get("trace_id") == trace_id


def _read(path: Path, offset: int = 0) -> tuple[list[Line], int]:
    """Complete lines of one file from offset; returns them and the offset after the last one."""
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    lines, last = [], ""
    for raw in data[:end].decode(errors="replace").splitlines():
        if raw.strip():
            line = parse(raw, path.stem, last)
            last = line.time
            lines.append(line)
    return lines, offset + end


def log_files(logs_dir: Path) -> list[Path]:
    return sorted(logs_dir.glob("*.log"))


def merged(logs_dir: Path, services: Iterable[str] | None = None, trace_id: str | None = None) -> Iterator[Line]:
    """Every line of every service's log, oldest first."""
    wanted = set(services) if services else None
    per_file = [_read(path)[0] for path in log_files(logs_dir)]
    for line in heapq.merge(*per_file):
        if _matches(line, wanted, trace_id):
            yield line


def follow(logs_dir: Path, services: Iterable[str] | None = None, trace_id: str | None = None,
           every: float = 0.5, stop=lambda: False) -> Iterator[Line]:
    """The existing lines, then new ones as they are written (each batch in time order)."""
    wanted = set(services) if services else None
    offsets: dict[Path, int] = {}
    while not stop():
        batch: list[Line] = []
        for path in log_files(logs_dir):
            try:
                lines, offsets[path] = _read(path, offsets.get(path, 0))
            except FileNotFoundError:
                continue
            batch += lines
        for line in sorted(batch):
            if _matches(line, wanted, trace_id):
                yield line
        time.sleep(every)
