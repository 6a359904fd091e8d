"""Prometheus metrics per model version, labelled with the device it runs on."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LABELS = ["model", "version", "device"]

QUEUE_DEPTH = Gauge("aistack_model_queue_depth", "Requests waiting in the version's batch queue", _LABELS)
BATCH_SIZE = Histogram("aistack_model_batch_size", "Rows per forward pass", _LABELS,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
BATCH_REQUESTS = Histogram("aistack_model_batch_requests", "Requests merged into one forward pass", _LABELS,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INFERENCE = Histogram("aistack_model_inference_duration_seconds", "Forward pass time per batch", _LABELS,
                      buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
QUEUE_WAIT = Histogram("aistack_model_queue_duration_seconds", "Time a request waited for its batch", _LABELS,
                       buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
REJECTED = Counter("aistack_model_rejected_requests_total", "Requests refused because the queue was full",
                   _LABELS)
OOD_ROWS = Counter("aistack_model_ood_rows_total", "Request rows with a feature outside the training range "
                   "of the version (baseline.json; see repository.Baseline)", ["model", "version"])
INFO = Gauge("aistack_model_info", "A served model version (1 = ready)",
             ["model", "version", "runtime", "device", "precision"])


class PrometheusObserver:
    """What the batcher reports, turned into labelled series."""

    def __init__(self, model: str, version: str, device: str):
        labels = (model, version, device)
        self._depth = QUEUE_DEPTH.labels(*labels)
        self._size = BATCH_SIZE.labels(*labels)
        self._requests = BATCH_REQUESTS.labels(*labels)
        self._latency = INFERENCE.labels(*labels)
        self._wait = QUEUE_WAIT.labels(*labels)
        self._rejected = REJECTED.labels(*labels)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def batch(self, rows: int, requests: int, seconds: float) -> None:
        self._size.observe(rows)
        self._requests.observe(requests)
        self._latency.observe(seconds)

    def waited(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def rejected(self) -> None:
        self._rejected.inc()
