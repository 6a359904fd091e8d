"""`python -m services.pipeline` serves the control app; `... worker` runs a Celery worker
(`... worker --beat` with the beat scheduler embedded); `... beat` runs the scheduler alone."""
import sys

if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["worker"]:
        # Before anything imports prometheus_client: the forked children share the samples.
        from services.pipeline import worker_metrics

        worker_metrics.prepare()

    from services.chassis.app import run

    from .app import create_app
    from .settings import PipelineSettings

    settings = PipelineSettings()
    if command in (["worker"], ["beat"]):
        from pathlib import Path

        from services.chassis.logs import setup_logging

        from .worker import app as celery

        setup_logging("pipeline", settings.log_level)
        schedule = Path(settings.data_dir) / "celerybeat-schedule"
        schedule.parent.mkdir(parents=True, exist_ok=True)
        if command == ["beat"]:
            celery.start(["beat", "--loglevel", settings.log_level, "-s", str(schedule), *sys.argv[2:]])
        else:
            worker_metrics.connect_signals()
            from celery.signals import worker_ready

            from . import watchdog

            worker_ready.connect(lambda **_: watchdog.start(settings), weak=False)
            worker_metrics.start_server(settings.worker_metrics_port, settings.redis_url)
            extra = sys.argv[2:]
            if "--beat" in extra:
                extra = [a for a in extra if a != "--beat"] + ["-B", "-s", str(schedule)]
            from celery.signals import worker_shutting_down

            # Celery ends a worker whose consumer hit an "Unrecoverable error" (kombu 5.7 does on a
            # Redis drop with a message unacknowledged) with exit code 0, as if asked to stop, so
            # no restart policy would bring it back. A stop nobody asked for exits 1 instead.
            asked = []
            worker_shutting_down.connect(lambda **kw: asked.append(kw.get("sig")), weak=False)
            code = 0
            try:
                celery.worker_main(["worker", "--loglevel", settings.log_level,
                                    "--concurrency", str(settings.worker_concurrency), "-E", *extra])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not asked and code == 0:
                import logging

                logging.getLogger("aistack.pipeline").error(
                    "the worker stopped without being asked to (see the error above); exiting 1 so that "
                    "it is restarted")
                code = 1
            sys.exit(code)
    else:
        run(lambda: create_app(settings), settings)
