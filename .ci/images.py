"""Start compose's aistack services from the per-service virtualenvs that .ci/images built.

compose.yaml is read as tests/e2e/test_compose_wiring.py reads it (its ComposeAsProcesses: the
environment compose gives each container, the image's ENV, the command, depends_on waves,
healthchecks, compose hostnames mapped to local ports); the one difference is the interpreter:
each process runs from the virtualenv of its image's extra, in a working directory outside the
checkout, so that only what the image installs can be imported. One-shots (migrate, models-init)
must exit 0; every service with a healthcheck must answer it (the HTTP services' /ready, the
worker's metrics); the beat must still be running. Exit status 1 on the first failure.

Usage: .venv/bin/python .ci/images.py var/ci-images
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.chassis.embedded import EmbeddedPostgres, EmbeddedRedis
from services.cli.stack import Stack
from tests.conftest import _admin, _with_db, claimed_redis_db
from tests.e2e.test_compose_wiring import ComposeAsProcesses, built_service, is_one_shot
from tests.e2e.test_tracing import OtlpReceiver

BEAT_ALIVE_S = 5.0
KEEP_RUNS = 5


@contextlib.contextmanager
def datastores(work: Path):
    """(postgres server URL, redis server URL): TEST_DATABASE_URL / TEST_REDIS_URL, else embedded."""
    started = []
    pg, redis = os.environ.get("TEST_DATABASE_URL"), os.environ.get("TEST_REDIS_URL")
    try:
        if not pg:
            server = EmbeddedPostgres(work / "embedded" / "postgres")
            pg = server.start()
            started.append(server)
        if not redis:
            server = EmbeddedRedis(work / "embedded" / "redis")
            redis = server.start()
            started.append(server)
        yield pg, redis
    finally:
        for server in reversed(started):
            server.stop()


class FromImages(ComposeAsProcesses):
    """compose's plan, each process from its image's virtualenv."""

    def __init__(self, venvs: Path, *args, **kw):
        super().__init__(*args, **kw)
        self.venvs = venvs

    def proc(self, name: str):
        p = super().proc(name)
        venv = self.venvs / built_service(name)
        dev_bin = Path(sys.executable).parent
        head = p.argv[0]
        if head == sys.executable:
            p.argv[0] = str(venv / "bin" / "python")
        elif Path(head).parent == dev_bin:  # a console script: aistack, celery
            p.argv[0] = str(venv / "bin" / Path(head).name)
        else:
            raise AssertionError(f"{name}: unexpected command {p.argv}")
        # Nothing of the dev environment: its venv, its PYTHONPATH.
        p.env = {k: v for k, v in p.env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        p.env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
        return p


def main(work: Path) -> int:
    work = work.resolve()
    venvs = work / "venvs"
    runs = work / "runs"
    run = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run.mkdir(parents=True)
    for old in sorted(p for p in runs.iterdir() if p != run)[:-KEEP_RUNS]:  # logs of the last few runs
        shutil.rmtree(old, ignore_errors=True)
    models = work / "models"  # models-init builds what is missing only: kept between runs
    models.mkdir(exist_ok=True)
    # The container's WORKDIR: not the checkout, whose services/ would shadow the installed package.
    os.chdir(run)
    receiver = OtlpReceiver()
    db = f"aistack_images_{os.getpid()}_{secrets.token_hex(3)}"
    failures: list[str] = []
    with datastores(work) as (pg_url, redis_server), claimed_redis_db(redis_server) as redis_url:
        asyncio.run(_admin(pg_url, f'CREATE DATABASE "{db}"'))
        database_url = _with_db(pg_url, db)
        plan = FromImages(venvs, run, database_url, redis_url, receiver.endpoint, models)
        stack = Stack(run, database_url=database_url, redis_url=redis_url)
        try:
            for wave in plan.waves():
                for name in (n for n in wave if is_one_shot(n)):
                    p = plan.proc(name)
                    t0 = time.monotonic()
                    done = subprocess.run(p.argv, env=p.env, capture_output=True, text=True, timeout=900,
                                          check=False)
                    if done.returncode != 0:
                        raise RuntimeError(f"{name} ({built_service(name)} image) exited {done.returncode}:\n"
                                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                    print(f"ok -- {name}: one-shot from the {built_service(name)} image, "
                          f"{time.monotonic() - t0:.0f}s", flush=True)
                procs = [plan.proc(n) for n in wave if not is_one_shot(n)]
                t0 = time.monotonic()
                stack.launch(procs, ready_timeout=300)
                for p in procs:
                    what = p.ready_url.split("/", 3)[-1] if p.ready_url else f"alive after {BEAT_ALIVE_S:.0f}s"
                    if not p.ready_url:
                        time.sleep(BEAT_ALIVE_S)
                        if p.popen.poll() is not None:
                            raise RuntimeError(f"{p.name} exited {p.popen.returncode}:\n{p.tail()}")
                    print(f"ok -- {p.name}: {built_service(p.name)} image, /{what} "
                          f"({time.monotonic() - t0:.0f}s)", flush=True)
            dead = [p.name for p in stack.procs if p.popen.poll() is not None]
            if dead:
                raise RuntimeError(f"exited after start: {dead}\n" + "\n".join(
                    f"--- {p.name}\n{p.tail()}" for p in stack.procs if p.name in dead))
        except Exception as exc:  # noqa: BLE001 -- report, stop everything, fail the step
            failures.append(str(exc))
        finally:
            stack.stop()
            receiver.close()
            asyncio.run(_admin(pg_url, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    if failures:
        print(f"ERROR {failures[0]}\n(logs: {run / 'logs'})", file=sys.stderr)
        return 1
    print(f"ok -- every image boots on its own (logs: {run / 'logs'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "var/ci-images")))
