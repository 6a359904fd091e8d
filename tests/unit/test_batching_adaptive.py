"""Batching never makes a cheap model slower (issue 18): idle bypass, inline passes, adaptive delay.

Decisions are checked by what the batcher did (its counters, which thread ran the pass), never by
how long anything took.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from services.model.batching import Batcher


def cheap(inputs):
    """A model whose pass costs microseconds (like a 1-row sklearn tree ensemble, only cheaper)."""
    x = inputs["x"]
    return {"y": x * 2, "thread": np.full(x.shape[0], threading.get_ident(), dtype=np.int64)}


def slow(inputs):
    """Burns 5 ms of CPU: costlier than the inline bound below and than the delay."""
    start = time.thread_time()
    while time.thread_time() - start < 0.005:
        pass
    return cheap(inputs)


def one(v: float) -> dict[str, np.ndarray]:
    return {"x": np.asarray([v], dtype=np.float32)}


async def test_an_idle_batcher_runs_a_request_at_once_without_queue_or_worker():
    batcher = Batcher(cheap, max_batch_size=8, max_queue_delay_s=5.0)
    out, timing = await asyncio.wait_for(batcher.submit(one(3.0)), 30)
    assert out["y"].tolist() == [6.0]
    assert batcher.stats.bypassed == 1 and batcher.stats.batches == 1 and batcher.stats.requests == 1
    assert timing.queue_s == 0.0 and timing.batch_rows == 1
    assert batcher._worker is None  # nothing was queued: no worker task was ever needed
    await batcher.close()


async def test_a_measured_cheap_model_runs_on_the_loop_and_an_expensive_one_in_its_thread():
    loop_thread = threading.get_ident()
    fast = Batcher(cheap, max_batch_size=8, max_queue_delay_s=0.002, inline_max_s=0.002)
    for i in range(12):
        out, _ = await fast.submit(one(i))
    # The first passes (before any measurement) go to the thread; once measured cheap, inline.
    # Without a bound from its runtime (torch, onnxruntime release the GIL) never inline.
    plain = Batcher(cheap, max_batch_size=8)
    for i in range(12):
        await plain.submit(one(i))
    assert plain.inline_max_s == 0.0 and not plain.runs_inline
    await plain.close()
    assert fast.runs_inline and fast.stats.inline_passes > 0
    assert int(out["thread"][0]) == loop_thread
    heavy = Batcher(slow, max_batch_size=8, max_queue_delay_s=0.002, inline_max_s=0.002)
    for i in range(12):
        out, _ = await heavy.submit(one(i))
    assert not heavy.runs_inline and heavy.stats.inline_passes == 0
    assert int(out["thread"][0]) != loop_thread
    await fast.close()
    await heavy.close()


async def test_a_cheap_model_does_not_wait_out_the_delay_and_an_expensive_one_still_batches():
    # A delay far longer than the test may run: a cheap model must not wait for it.
    fast = Batcher(cheap, max_batch_size=64, max_queue_delay_s=60.0, inline_max_s=0.002)
    for i in range(10):
        await fast.submit(one(i))
    results = await asyncio.wait_for(asyncio.gather(*(fast.submit(one(i)) for i in range(20))), 30)
    assert [float(out["y"][0]) for out, _ in results] == [2.0 * i for i in range(20)]
    # The expensive model keeps the configured delay: a request queued behind a running pass
    # waits for company (measured: its pass costs more than the delay).
    heavy = Batcher(slow, max_batch_size=64, max_queue_delay_s=0.001, inline_max_s=0.002)
    for i in range(3):
        await heavy.submit(one(i))
    assert heavy.pass_cost_s > heavy.max_queue_delay_s
    results = await asyncio.gather(*(heavy.submit(one(i)) for i in range(20)))
    assert len(results) == 20
    assert heavy.stats.max_batch_rows > 1  # the queued requests shared passes
    await fast.close()
    await heavy.close()


class PassGate:
    """Holds every pass until released one by one (the batcher's pass thread blocks on it)."""

    def __init__(self, predict):
        self.predict, self.release, self.entered, self.passes = predict, threading.Semaphore(0), [], []
        self.entered_event = threading.Event()

    def __call__(self, inputs):
        self.entered.append(len(inputs["x"]))
        self.entered_event.set()
        assert self.release.acquire(timeout=30)
        self.passes.append(len(inputs["x"]))
        return self.predict(inputs)


async def _wait_entered(gate: PassGate, n: int) -> None:
    while len(gate.entered) < n:
        await asyncio.sleep(0.005)


async def test_a_caller_cancelled_inside_a_running_shared_batch_leaves_its_neighbours_alone():
    gate = PassGate(cheap)
    batcher = Batcher(gate, max_batch_size=64, max_queue_delay_s=0.0)
    first = asyncio.create_task(batcher.submit(one(0)))  # bypass, held
    await asyncio.wait_for(_wait_entered(gate, 1), 30)
    trio = [asyncio.create_task(batcher.submit(one(i))) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    gate.release.release()  # the first pass ends; the trio goes as one batch, held in the gate
    await asyncio.wait_for(first, 30)
    await asyncio.wait_for(_wait_entered(gate, 2), 30)
    trio[1].cancel()
    gate.release.release()
    for task, v in ((trio[0], 1), (trio[2], 3)):
        out, timing = await asyncio.wait_for(task, 30)
        assert float(out["y"][0]) == 2.0 * v and timing.batch_rows == 3
    with pytest.raises(asyncio.CancelledError):
        await trio[1]
    assert gate.passes == [1, 3] and batcher.stats.failed == 0
    await batcher.close()


async def test_concurrent_requests_to_an_idle_inline_model_share_one_pass():
    """A burst that reaches an idle batcher of an inline model together is one pass, not one each
    (an inline pass blocks the loop, so without the gather no request ever queued behind it)."""
    batcher = Batcher(cheap, max_batch_size=64, max_queue_delay_s=0.002, inline_max_s=0.002)
    for i in range(12):  # measured cheap: inline from here on
        await batcher.submit(one(i))
    assert batcher.runs_inline
    before = batcher.stats.forward_passes
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(one(100 + i)) for i in range(16))), 30)
    assert [out["y"].tolist() for out, _ in results] == [[2.0 * (100 + i)] for i in range(16)]
    assert batcher.stats.forward_passes - before == 1 and batcher.stats.max_batch_rows == 16
    # A lone caller still gets its pass at once, on the loop, counted as a bypass.
    bypassed = batcher.stats.bypassed
    out, timing = await batcher.submit(one(7.0))
    assert out["y"].tolist() == [14.0] and batcher.stats.bypassed == bypassed + 1 and timing.batch_rows == 1
    await batcher.close()
