from __future__ import annotations

from pathlib import Path

from services.chassis.settings import ServiceSettings, service_config


class ModelSettings(ServiceSettings):
    model_config = service_config("MODEL_")

    service_name: str = "model"
    port: int = 8003
    # Versioned model repository: <repo>/<model>/<version>/manifest.json + artifacts.
    repository: Path = Path("var/models")
    # Overrides every manifest's device preference ("cpu", "cuda", "auto"); unset = manifest decides.
    device: str | None = None
    # Half precision for torch models on CUDA (CPU stays fp32).
    fp16: bool = False
    # Off: one request per forward pass (the baseline for bench/bench_model.py).
    dynamic_batching: bool = True
    # Requests waiting per model version before new ones get 503 + Retry-After.
    max_queue_size: int = 256
    # Intra-op threads per model version; unset = the framework's default.
    threads: int | None = None
    # Largest load request (a new version's files, base64): the fraud model is ~1 MB, MiniLM ~120 MB.
    upload_max_bytes: int = 512 * 1024 * 1024
    # Seconds between checks of the repository for versions another replica added (0: off).
    repository_poll_s: float = 15.0
