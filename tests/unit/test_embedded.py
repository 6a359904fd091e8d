"""The embedded servers are real: real connections, real files on disk, no process left behind."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
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


def test_second_owner_of_a_data_dir_is_refused_and_touches_nothing(tmp_path: pathlib.Path) -> None:
    """Issue 17.2: a second process on a live data dir used to adopt its server, then stop it."""
    first = EmbeddedPostgres(tmp_path / "pg")
    first.start()
    first_redis = EmbeddedRedis(tmp_path / "redis")
    first_redis.start()
    try:
        second, second_redis = EmbeddedPostgres(tmp_path / "pg"), EmbeddedRedis(tmp_path / "redis")
        with pytest.raises(embedded.DataDirBusy) as busy:
            second.start()
        assert busy.value.info["pid"] == os.getpid() and busy.value.info["server_pid"] == first.pid
        with pytest.raises(embedded.DataDirBusy):
            second_redis.start()
        second.stop()  # stops nothing: it started nothing
        second_redis.stop()
        assert embedded._pid_alive(first.pid) and _port_open(first.port)
        assert _port_open(first_redis.port)
    finally:
        first_redis.stop()
        first.stop()


def _orphan(kind: str, data_dir: pathlib.Path) -> tuple[int, int]:
    """Start a server from a process that is then SIGKILLed, as a crashed `aistack up` leaves it."""
    code = (f"import sys, time; from services.chassis.embedded import {kind}; s = {kind}(sys.argv[1]); "
            "s.start(); print(s.pid, s.port, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(data_dir)], stdout=subprocess.PIPE, text=True)
    pid, port = map(int, owner.stdout.readline().split())
    owner.kill()
    owner.wait()
    return pid, port


def test_postgres_left_by_a_dead_owner_is_replaced(tmp_path: pathlib.Path) -> None:
    pid, port = _orphan("EmbeddedPostgres", tmp_path / "pg")
    tree = _process_tree(pid)
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        _assert_gone(tree, port)
        assert pg.pid != pid
    finally:
        pg.stop()


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


def test_redis_ends_a_server_left_by_a_dead_owner(tmp_path: pathlib.Path) -> None:
    pid, orphan_port = _orphan("EmbeddedRedis", tmp_path / "redis")
    orphan = _process_tree(pid)
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
    _assert_gone(tree, port)
    assert not second.pid_path.exists()


def test_stop_before_start_is_harmless(tmp_path: pathlib.Path) -> None:
    EmbeddedPostgres(tmp_path / "pg").stop()
    EmbeddedRedis(tmp_path / "redis").stop()
