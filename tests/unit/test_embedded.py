"""The embedded servers are real: real connections, real files on disk, no process left behind."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile

import asyncpg
import pytest
import redis

from services.chassis import embedded
from services.chassis.embedded import EmbeddedPostgres, EmbeddedRedis, free_port


def _process_tree(pid: int) -> set[int]:
    """pid and all its descendants, read from /proc, so we can check none survives stop()."""
    parents: dict[int, int] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        tree.update(children)
        frontier.extend(children)
    return tree


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def _assert_gone(pids: set[int], port: int) -> None:
    alive = {pid for pid in pids if embedded._pid_alive(pid)}
    assert not alive, f"processes left behind: {alive}"
    assert not _port_open(port)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert port not in (5432, 6379)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


async def test_postgres_serves_and_keeps_data_between_starts(tmp_path: pathlib.Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    assert url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert pg.port != 5432
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, name text)")
        await conn.execute("INSERT INTO kept VALUES (1, 'first run')")
    finally:
        await conn.close()
    assert pg.pid is not None
    tree, port = _process_tree(pg.pid), pg.port
    assert len(tree) > 1  # postmaster and its workers

    pg.stop()
    _assert_gone(tree, port)
    assert not (pg.pgdata / "postmaster.pid").exists()
    pg.stop()  # idempotent

    again = EmbeddedPostgres(tmp_path / "pg")
    url = again.start()
    try:
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT name FROM kept WHERE id = 1") == "first run"
        finally:
            await conn.close()
    finally:
        again.stop()


async def test_postgres_removes_stale_pidfile(tmp_path: pathlib.Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    pidfile = (pg.pgdata / "postmaster.pid").read_text().splitlines()
    pg.stop()
    # What a SIGKILLed server leaves: its lock file, naming a pid that no longer runs.
    (pg.pgdata / "postmaster.pid").write_text("\n".join([str(_dead_pid()), *pidfile[1:]]) + "\n")

    url = pg.start()
    try:
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    finally:
        pg.stop()


def test_postgres_adopts_and_stops_a_server_left_running(tmp_path: pathlib.Path) -> None:
    first = EmbeddedPostgres(tmp_path / "pg")
    first.start()
    tree, port = _process_tree(first.pid), first.port

    # A new process (say, `aistack up` after a crash) finds the server still running.
    second = EmbeddedPostgres(tmp_path / "pg")
    assert second.start() == first.url
    assert second.pid == first.pid
    second.stop()
    _assert_gone(tree, port)
    first.stop()  # reaps its child, no error


@pytest.mark.skipif(os.geteuid() != 0, reason="the setuid fallback is only used as root")
async def test_postgres_as_root_without_user_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded._Unprivileged, "_runs", staticmethod(lambda cmd: False))
    # Directly under /tmp: in this mode every parent must be searchable by the unprivileged user.
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="aistack-pg-"))
    pg = EmbeddedPostgres(data_dir)
    try:
        url = pg.start()
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        owner = pg.pgdata.stat().st_uid
        assert owner != 0
        assert embedded._cwd_of(pg.pid) == pg.pgdata.resolve()
        tree, port = _process_tree(pg.pid), pg.port
        pg.stop()
        _assert_gone(tree, port)
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_redis_serves_and_stops(tmp_path: pathlib.Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    assert url == f"redis://127.0.0.1:{server.port}/0"
    assert server.port != 6379
    client = redis.Redis.from_url(url)
    try:
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
    finally:
        client.close()
    tree, port = _process_tree(server.pid), server.port

    server.stop()
    _assert_gone(tree, port)
    server.stop()  # idempotent
    assert not list((tmp_path / "redis").glob("*.rdb"))  # nothing saved


def test_redis_ends_a_server_left_running(tmp_path: pathlib.Path) -> None:
    first = EmbeddedRedis(tmp_path / "redis")
    first.start()
    orphan, orphan_port = _process_tree(first.pid), first.port

    # A new process (say, `aistack up` after a crash) starts afresh and ends the orphan.
    second = EmbeddedRedis(tmp_path / "redis")
    second.start()
    try:
        _assert_gone(orphan, orphan_port)
        client = redis.Redis.from_url(second.url)
        assert client.ping()
        client.close()
    finally:
        tree, port = _process_tree(second.pid), second.port
        second.stop()
        first.stop()  # reaps its child, no error
    _assert_gone(tree, port)
    assert not second.pid_path.exists()


def test_stop_before_start_is_harmless(tmp_path: pathlib.Path) -> None:
    EmbeddedPostgres(tmp_path / "pg").stop()
    EmbeddedRedis(tmp_path / "redis").stop()
