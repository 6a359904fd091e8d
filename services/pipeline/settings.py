from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class PipelineSettings(ServiceSettings):
    model_config = service_config("PIPELINE_")

    service_name: str = "pipeline"
    # The control app (job API, quality/drift admin, health, readiness, metrics) of the worker fleet.
    port: int = 9100
    model_url: str = "http://127.0.0.1:8003"
    features_url: str = "http://127.0.0.1:8004"
    worker_concurrency: int = 2
    # Broker: a message unacked this long is handed to another worker. Longer than any chunk takes;
    # leases and the reaper (below) recover lost chunks without waiting for it.
    visibility_timeout_s: int = 3600
    worker_metrics_port: int = 9101  # 0: no metrics server in the worker
    recovery_sweep: bool = True
    # A worker whose queue holds messages for this long while it receives none and runs nothing
    # restarts itself (watchdog.py: Celery's Redis consumer can stall after a reconnect). 0: off.
    stall_restart_s: float = 60.0
    # Batch inference: inputs, chunk parts and results live here; server-side paths must be inside.
    data_dir: str = "var/pipeline"
    chunk_rows: int = 50_000
    infer_batch_rows: int = 10_000
    max_upload_bytes: int = 2 * 1024 ** 3
    # Per-principal batch quotas (docs/pipeline.md): queued+running jobs at once (429), rows and bytes
    # after decompression per job (413, checked from the Parquet footer before 202 and while reading).
    max_active_jobs: int = 4
    job_max_rows: int = 50_000_000
    job_max_bytes: int = 8 * 1024 ** 3
    # Idempotency-Key: how long a key maps to its job (Stripe keeps keys 24 h).
    idempotency_ttl_s: int = 86_400
    # How long a submission waits for the broker before answering 202 anyway (the reaper queues it).
    submit_queue_timeout_s: float = 5.0
    # Leases (docs/pipeline.md): a running chunk's lease lasts lease_s and is renewed every
    # heartbeat_s; the reaper (beat, every reap_every_s) re-queues chunks whose lease expired, and
    # work without progress for stale_s that nobody holds. A killed worker's chunk is running again
    # after at most lease_s + reap_every_s.
    lease_s: float = 30.0
    heartbeat_s: float = 10.0
    reap_every_s: float = 10.0
    stale_s: float = 120.0
    # A chunk retries a failing model server this often (backoff 2, 4, 8 ... capped at 30 s), then
    # fails the job; database errors while recording progress are retried for db_retry_s.
    chunk_max_retries: int = 6
    db_retry_s: float = 120.0
    # Model repository (the model server's MODEL_REPOSITORY): drift baselines, new versions.
    model_repository: str = "var/models"
    # Prediction-log persistence.
    log_batch: int = 1000
    log_consumer_group: str = "pipeline"
    # Quality and drift windows, alert threshold.
    quality_window_s: int = 86_400
    drift_window_s: int = 3_600
    drift_min_rows: int = 100
    drift_psi_alert: float = 0.2
    # Beat schedule (seconds).
    persist_every_s: float = 5.0
    quality_every_s: float = 300.0
    drift_every_s: float = 300.0
    materialize_every_s: float = 300.0
    # Training-data validation (model-poisoning guard).
    train_min_rows: int = 200
    train_max_null_share: float = 0.01
    train_max_out_of_range_share: float = 0.01
    train_max_duplicate_share: float = 0.05
    train_max_label_shift: float = 0.15
