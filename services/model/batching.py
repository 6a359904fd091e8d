"""Dynamic batching: wraps a model's predict function, framework-free.

Requests queue per model version; one worker forms a batch of up to `max_batch_size` rows,
waiting at most `max_queue_delay_s` after the oldest request arrived, runs one forward pass in
the version's own thread (so the event loop and other models keep going) and hands each caller
its slice. The queue is bounded so overload turns into a fast refusal, not growing latency.

Batching must never make a cheap model slower, so the batcher measures each version's forward
pass and adapts (what issue 18 measured: a 1-row sklearn pass is cheaper than the queue around it):
- idle bypass: a request that finds the queue empty and no pass running goes straight to the
  model, with no queue, no delay and no worker wake-up; requests only queue behind a running pass;
- adaptive delay: the worker waits up to `max_queue_delay_s` for more rows only when a pass costs
  more than that delay (amortising it pays); for a cheaper model it takes whatever has queued up
  behind the running pass and goes (greedy batching, what the running pass already bought);
- inline passes: once a version's measured pass (CPU time of the pass thread, robust to load) is
  under `inline_max_s`, passes run on the event loop thread itself, as MLServer's in-process
  runtimes do: the thread-pool hop and its GIL hand-offs cost more than such a pass. An idle
  batcher of such a model yields to the loop once first, so that concurrent requests already read
  share the pass (one loop iteration, ~10 us, costs a lone caller nothing measurable). The bound
  comes from the runtime (`inline_max_s` on it; scikit-learn: 2 ms, its passes hold the GIL
  anyway); runtimes that release the GIL (torch, onnxruntime) keep their own thread (0).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger("aistack.model.batching")

Arrays = dict[str, np.ndarray]


class QueueFull(Exception):
    """The version's queue is at its bound: the caller should retry later (503)."""


class BatcherClosed(Exception):
    """The batcher is shutting down."""


class BatchObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def batch(self, rows: int, requests: int, seconds: float) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def rejected(self) -> None: ...


@dataclass
class BatcherStats:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    forward_passes: int = 0
    rejected: int = 0
    cancelled: int = 0
    bypassed: int = 0  # requests that found the batcher idle and skipped the queue
    inline_passes: int = 0  # forward passes run on the event loop thread (a cheap model)
    failed: int = 0
    max_batch_rows: int = 0
    compute_s: float = 0.0
    batch_rows: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "rows": self.rows, "batches": self.batches,
            "forward_passes": self.forward_passes, "rejected": self.rejected,
            "bypassed": self.bypassed, "inline_passes": self.inline_passes,
            "cancelled": self.cancelled, "failed": self.failed, "max_batch_rows": self.max_batch_rows,
            "compute_s": round(self.compute_s, 6),
            "batch_rows": {str(k): v for k, v in sorted(self.batch_rows.items())},
        }


@dataclass
class Timing:
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_rows: int = 0


@dataclass
class _Item:
    inputs: Arrays
    rows: int
    future: asyncio.Future
    enqueued: float
    timing: Timing


class Batcher:
    def __init__(self, predict: Callable[[Arrays], Arrays], *, name: str = "model",
                 max_batch_size: int = 64, max_queue_delay_s: float = 0.002, max_queue_size: int = 256,
                 batching: bool = True, observer: BatchObserver | None = None,
                 inline_max_s: float | None = None):
        self._predict = predict
        self.name = name
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue_delay_s = max(0.0, float(max_queue_delay_s))
        self.max_queue_size = max(1, int(max_queue_size))
        # Off: one request per forward pass, same queue and thread (the baseline the bench compares).
        self.batching = batching
        self.observer = observer
        self.stats = BatcherStats()
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        # Measured cost of one forward pass (EWMA, CPU seconds of the pass thread) and how many
        # passes it rests on; `_busy` while a pass (bypass or batch) is running.
        if inline_max_s is None:
            inline_max_s = getattr(getattr(predict, "__self__", None), "inline_max_s", 0.0)
        self.inline_max_s = max(0.0, float(inline_max_s))
        self._pass_s: float | None = None
        self._measured = 0
        self._busy = False
        self._idle = asyncio.Event()

    @property
    def pass_cost_s(self) -> float | None:
        """The measured cost of one forward pass (None before the first)."""
        return self._pass_s

    @property
    def runs_inline(self) -> bool:
        """Cheap enough to run on the loop: measured on a few passes first, never guessed."""
        return self._measured >= 8 and self._pass_s is not None and self._pass_s < self.inline_max_s

    def _wait_s(self) -> float:
        """The adaptive delay: wait for company only when a pass costs more than the wait."""
        if self._pass_s is None or self._pass_s > self.max_queue_delay_s:
            return self.max_queue_delay_s
        return 0.0

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def submit(self, inputs: Arrays) -> tuple[Arrays, Timing]:
        """Queue one request (all arrays share axis 0) and wait for its slice of a batch."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is shutting down")
        if len(self._pending) >= self.max_queue_size:
            self.stats.rejected += 1
            if self.observer:
                self.observer.rejected()
            raise QueueFull(f"{self.name}: queue is full ({self.max_queue_size} requests waiting)")
        rows = int(next(iter(inputs.values())).shape[0]) if inputs else 0
        if not self._pending and not self._busy:
            if self.runs_inline and self.batching:
                return await self._gather_inline(inputs, rows)
            return await self._bypass(inputs, rows)
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        item = _Item(inputs, rows, loop.create_future(), time.perf_counter(), Timing())
        self._pending.append(item)
        self._depth_changed()
        self._wakeup.set()
        # Awaiting the future directly: a cancelled caller cancels only its own future, and the
        # worker skips or ignores it; the batch it shares with others is untouched.
        result = await item.future
        return result, item.timing

    async def _gather_inline(self, inputs: Arrays, rows: int) -> tuple[Arrays, Timing]:
        """An idle batcher of an inline model: yield to the event loop once, so that the requests
        the server has already read (a burst of concurrent callers) join this pass, then run them
        as one batch on the loop. Without it an inline pass never had company: it blocked the loop
        until it was done, so every request found the batcher idle again, and 32 callers cost 32
        passes (0.80 ms of CPU per request at 32 callers against MLServer's batched 0.48)."""
        self._busy = True
        loop = asyncio.get_running_loop()
        item = _Item(inputs, rows, loop.create_future(), time.perf_counter(), Timing())
        self._pending.append(item)
        try:
            await asyncio.sleep(0)
            batch, total = [], 0
            self._drop_cancelled()
            while self._pending and (not batch or total + self._pending[0].rows <= self.max_batch_size):
                nxt = self._pending.popleft()
                if not nxt.future.done():
                    batch.append(nxt)
                    total += nxt.rows
            self._depth_changed()
            if len(batch) == 1:
                self.stats.bypassed += 1
            if batch:
                await self._execute(batch)
        except asyncio.CancelledError:
            item.future.cancel()
            raise
        finally:
            self._release()
        return await item.future, item.timing

    async def _bypass(self, inputs: Arrays, rows: int) -> tuple[Arrays, Timing]:
        """The batcher is idle: run this request now, as a batch of one (no queue, no delay)."""
        self._busy = True
        self.stats.bypassed += 1
        timing = Timing()
        start = time.perf_counter()
        try:
            if self.observer:
                self.observer.waited(0.0)
            try:
                outputs = await self._run_pass(inputs)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.failed += 1
                raise
            elapsed = time.perf_counter() - start
            self._count_batch(rows, 1, elapsed)
            timing.compute_s, timing.batch_rows = elapsed, rows
            return outputs, timing
        finally:
            self._release()

    def _release(self) -> None:
        """A pass outside the worker ended: hand what queued behind it to the worker."""
        self._busy = False
        self._idle.set()
        if self._pending:
            self._ensure_worker()
            self._wakeup.set()

    async def _run_pass(self, inputs: Arrays) -> Arrays:
        if self.runs_inline:
            self.stats.inline_passes += 1
            return self._forward(inputs)
        return await asyncio.get_running_loop().run_in_executor(self._ensure_executor(), self._forward, inputs)

    def _ensure_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{self.name}")
        return self._executor

    def _count_batch(self, rows: int, requests: int, elapsed: float) -> None:
        self.stats.batches += 1
        self.stats.requests += requests
        self.stats.rows += rows
        self.stats.compute_s += elapsed
        self.stats.batch_rows[rows] += 1
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, rows)
        if self.observer:
            self.observer.batch(rows, requests, elapsed)

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._ensure_executor()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop the worker and fail whatever is still queued."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosed(f"{self.name} is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- worker -----------------------------------------------------------------------------
    def _depth_changed(self) -> None:
        if self.observer:
            self.observer.queue_depth(len(self._pending))

    def _drop_cancelled(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
            self.stats.cancelled += 1
            self._depth_changed()

    async def _run(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            while self._busy:  # a bypass pass is running: let rows gather behind it
                self._idle.clear()
                await self._idle.wait()
            self._busy = True
            try:
                batch = await self._form_batch()
            except BaseException:
                self._busy = False
                raise
            try:
                if batch:
                    await self._execute(batch)
            except Exception as exc:  # the worker must outlive any one batch
                log.exception("batcher error", extra={"model": self.name})
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                self._busy = False

    async def _form_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        # The delay counts from the oldest request: one that already waited behind the previous
        # batch goes out at once with whatever has queued up meanwhile.
        deadline = self._pending[0].enqueued + self._wait_s()
        while True:
            self._drop_cancelled()
            if self._pending:
                nxt = self._pending[0]
                if batch and (not self.batching or rows + nxt.rows > self.max_batch_size):
                    break
                batch.append(self._pending.popleft())
                self._depth_changed()
                rows += nxt.rows
                if not self.batching or rows >= self.max_batch_size:
                    break
                continue
            remaining = deadline - time.perf_counter()
            if not batch or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        for item in batch:
            item.timing.queue_s = start - item.enqueued
            if self.observer:
                self.observer.waited(item.timing.queue_s)
        rows = sum(i.rows for i in batch)
        try:
            inputs = batch[0].inputs if len(batch) == 1 else {
                k: np.concatenate([i.inputs[k] for i in batch]) for k in batch[0].inputs}
            outputs = await self._run_pass(inputs)
        except Exception as exc:
            if len(batch) > 1:
                # One bad request must not fail its neighbours: retry each on its own.
                log.warning("batch failed, retrying requests one by one",
                            extra={"model": self.name, "error": repr(exc)})
                for item in batch:
                    await self._execute([item])
                return
            self.stats.failed += 1
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        self._count_batch(rows, len(batch), elapsed)
        offset = 0
        for item in batch:
            item.timing.compute_s, item.timing.batch_rows = elapsed, rows
            if not item.future.done():
                item.future.set_result({k: v[offset:offset + item.rows] for k, v in outputs.items()})
            offset += item.rows

    def _forward(self, inputs: Arrays) -> Arrays:
        """Runs in the version's thread; a request larger than max_batch_size goes in chunks."""
        n = int(next(iter(inputs.values())).shape[0]) if inputs else 0
        if n <= self.max_batch_size:
            self.stats.forward_passes += 1
            if self._measured >= 8 and self.stats.forward_passes % 16:
                return self._predict(inputs)  # measured enough: re-check one pass in 16
            start = time.thread_time()
            out = self._predict(inputs)
            self._measure(time.thread_time() - start)
            return out
        parts = []
        for lo in range(0, n, self.max_batch_size):
            self.stats.forward_passes += 1
            parts.append(self._predict({k: v[lo:lo + self.max_batch_size] for k, v in inputs.items()}))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _measure(self, seconds: float) -> None:
        """EWMA of one pass's cost; a slow outlier (a GC, a cold cache) moves it only a little."""
        self._measured += 1
        self._pass_s = seconds if self._pass_s is None else 0.8 * self._pass_s + 0.2 * seconds
