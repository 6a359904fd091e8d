"""Issue 20: after erasure nothing in the worker's logs names the subject's batch job: Celery's task
lines hide the task's arguments and result, and the pipeline's own lines hide the job id."""
from __future__ import annotations

import io
import json
import logging
import uuid

from celery.app import trace

from services.chassis.logs import RedactingFilter
from services.pipeline.celery_app import TaskDataFilter, _hide_task_data


def _json_line(logger: logging.Logger, *args, **kwargs) -> str:
    """What one record looks like after the chassis redaction and Celery's task-data filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(message)s %(data)s %(job)s"))
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.INFO
    try:
        logger.info(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_celery_task_lines_hide_arguments_and_results():
    job = uuid.uuid4().hex
    _hide_task_data()
    success = {"id": "t-1", "name": "pipeline.score_chunk", "runtime": 0.1, "args": repr([job, 0]),
               "kwargs": "{}", "return_value": repr({"job": job, "chunk": 0, "rows": 3})}
    received = {"id": "t-2", "name": "pipeline.prepare_job", "args": repr([job]), "kwargs": "{}", "eta": None}
    for name, fmt, ctx in (("celery.app.trace", trace.LOG_SUCCESS, success),
                           ("celery.worker.strategy", trace.LOG_RECEIVED, received)):
        line = _json_line(logging.getLogger(name), fmt, ctx, extra={"data": ctx, "job": None})
        assert job not in line and ctx["name"] in line and ctx["id"] in line, line
    assert sum(isinstance(f, TaskDataFilter) for f in logging.getLogger("celery.app.trace").filters) == 1


def test_the_pipelines_job_lines_carry_no_job_id():
    job = uuid.uuid4().hex
    line = _json_line(logging.getLogger("aistack.pipeline.tasks"), "job started",
                      extra={"job": job, "data": json.dumps({"chunks": 1})})
    assert job not in line and "[ID]" in line and "job started" in line
