"""Feature store metrics (module level: one registry per process)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ONLINE_READ_SECONDS = Histogram(
    "aistack_features_online_read_seconds", "Latency of one online read (all ids and views, one Redis round trip)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
ONLINE_VALUES = Counter(
    "aistack_features_online_values_total",
    "Feature values served online by status (missing/expired rates = status / all)", ["view", "status"],
)
FRESHNESS_SECONDS = Gauge(
    "aistack_features_freshness_seconds", "Age of the newest value in the online store, per view", ["view"],
)
NEWEST_EVENT = Gauge(
    "aistack_features_newest_event_timestamp_seconds", "Event time of the newest online value, per view", ["view"],
)
ROWS_WRITTEN = Counter(
    "aistack_features_rows_written_total", "Rows written by store and path", ["view", "store", "path"],
)
HISTORICAL_SECONDS = Histogram(
    "aistack_features_historical_seconds", "Latency of point-in-time retrieval",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
MATERIALIZE_SECONDS = Histogram(
    "aistack_features_materialize_seconds", "Duration of one view's materialisation run", ["view"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)
