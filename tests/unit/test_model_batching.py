"""The dynamic batcher around a real model: batches form, overload is refused, cancels are harmless.

A gate in front of the real fraud model holds the forward pass, so the queue state is known
without relying on timing.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.demo.synthetic import FRAUD_FEATURES, transactions
from services.model.batching import Batcher, QueueFull
from services.model.repository import read_manifest
from services.model.runtimes import load_runtime


class Gate:
    """Holds the forward pass until opened; counts the rows of each pass it lets through."""

    def __init__(self, predict):
        self.predict, self.open, self.entered, self.passes = predict, threading.Event(), threading.Event(), []

    def __call__(self, inputs):
        self.entered.set()
        assert self.open.wait(30)
        self.passes.append(len(next(iter(inputs.values()))))
        return self.predict(inputs)


@pytest.fixture(scope="module")
def fraud(models_dir):
    path = models_dir / "fraud" / "1"
    return load_runtime(path, read_manifest(path))


def rows(n: int, offset: int = 0) -> dict[str, np.ndarray]:
    x, _ = transactions(n=64, seed=3)
    return {f: x[offset:offset + n, i].copy() for i, f in enumerate(FRAUD_FEATURES)}


async def _hold_first(batcher: Batcher, gate: Gate) -> asyncio.Task:
    first = asyncio.create_task(batcher.submit(rows(1)))
    await asyncio.to_thread(gate.entered.wait, 30)
    return first


async def test_queued_requests_share_one_forward_pass(fraud):
    gate = Gate(fraud.predict)
    batcher = Batcher(gate, max_batch_size=64, max_queue_delay_s=0.0, max_queue_size=64)
    first = await _hold_first(batcher, gate)
    waiting = [asyncio.create_task(batcher.submit(rows(2, offset=2 * i))) for i in range(10)]
    await asyncio.sleep(0)
    assert batcher.queue_depth == 10
    gate.open.set()
    results = await asyncio.gather(first, *waiting)
    assert gate.passes == [1, 20]
    assert batcher.stats.max_batch_rows == 20 and batcher.stats.batches == 2
    # Each caller gets its own rows back, equal to an unbatched call on the same rows.
    for i, (out, timing) in enumerate(results[1:]):
        assert np.allclose(out["probability"], fraud.predict(rows(2, offset=2 * i))["probability"])
        assert timing.batch_rows == 20
    await batcher.close()


async def test_batches_respect_max_batch_size_and_big_requests_still_run(fraud):
    gate = Gate(fraud.predict)
    batcher = Batcher(gate, max_batch_size=4, max_queue_delay_s=0.0)
    first = await _hold_first(batcher, gate)
    small = [asyncio.create_task(batcher.submit(rows(2, offset=2 * i))) for i in range(3)]
    big = asyncio.create_task(batcher.submit(rows(10)))
    await asyncio.sleep(0)
    gate.open.set()
    await asyncio.gather(first, *small)
    out, _ = await big
    assert out["label"].shape == (10,)
    assert max(gate.passes) <= 4 and sum(gate.passes) == 1 + 6 + 10
    await batcher.close()


async def test_full_queue_refuses_at_once(fraud):
    gate = Gate(fraud.predict)
    batcher = Batcher(gate, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=2)
    first = await _hold_first(batcher, gate)
    queued = [asyncio.create_task(batcher.submit(rows(1))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await batcher.submit(rows(1))
    assert batcher.stats.rejected == 1
    gate.open.set()
    await asyncio.gather(first, *queued)
    await batcher.close()


async def test_cancelled_callers_do_not_break_their_batch(fraud):
    gate = Gate(fraud.predict)
    batcher = Batcher(gate, max_batch_size=64, max_queue_delay_s=0.0)
    # The first finds the batcher idle and runs at once (bypass); the next two queue behind it.
    # Cancelling one of them leaves the others alone (a cancel inside a running shared batch:
    # tests/unit/test_batching_adaptive.py).
    running = [asyncio.create_task(batcher.submit(rows(1, offset=i))) for i in range(3)]
    await asyncio.to_thread(gate.entered.wait, 30)
    running[1].cancel()
    # Cancelled while still queued: skipped, never computed.
    queued = [asyncio.create_task(batcher.submit(rows(1, offset=i))) for i in range(3)]
    await asyncio.sleep(0)
    queued[0].cancel()
    gate.open.set()
    for task in (running[0], running[2], queued[1], queued[2]):
        out, _ = await task
        assert out["label"].shape == (1,)
    for task in (running[1], queued[0]):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert batcher.stats.cancelled == 2 and batcher.stats.failed == 0
    out, _ = await batcher.submit(rows(1))  # the worker is still alive
    assert out["probability"].shape == (1, 2)
    await batcher.close()


async def test_without_dynamic_batching_each_request_is_its_own_pass(fraud):
    gate = Gate(fraud.predict)
    batcher = Batcher(gate, max_batch_size=64, max_queue_delay_s=0.0, batching=False)
    first = await _hold_first(batcher, gate)
    waiting = [asyncio.create_task(batcher.submit(rows(2))) for _ in range(5)]
    await asyncio.sleep(0)
    gate.open.set()
    await asyncio.gather(first, *waiting)
    assert gate.passes == [1, 2, 2, 2, 2, 2]
    await batcher.close()
