"""Runtimes behind one small interface: load artifacts from a version dir, predict on arrays.

Heavy frameworks (torch, onnxruntime) are imported only by the runtime that needs them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .repository import Manifest

log = logging.getLogger("aistack.model.runtimes")


class Runtime(Protocol):
    device: str
    precision: str

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs and outputs are keyed by tensor name; the first axis is the batch."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str | None = None  # overrides the manifest's preference: "cpu", "cuda" or "auto"
    fp16: bool = False  # torch on CUDA only; CPU stays fp32
    threads: int | None = None  # intra-op threads per model version


def pick_device(preference: str, available: bool) -> str:
    if preference == "cpu" or not available:
        if preference == "cuda" and not available:
            log.warning("CUDA requested but not present; using CPU")
        return "cpu"
    return "cuda"


SMALL_BATCH_ROWS = 256


class SklearnRuntime:
    """A fitted scikit-learn classifier; inputs are one 1-D tensor per feature, in manifest order."""

    device = "cpu"
    precision = "fp32"
    # A pass holds the GIL most of its time, so its own thread buys the event loop little: the
    # batcher runs passes measured under this many CPU seconds inline (services/model/batching.py).
    inline_max_s = 0.002

    def __init__(self, version_dir: Path, manifest: Manifest, options: RuntimeOptions = RuntimeOptions()):
        import joblib

        self.estimator = joblib.load(version_dir / "model.joblib")
        self.feature_order = [t.name for t in manifest.inputs]
        self.classes = np.asarray(self.estimator.classes_)
        # OpenMP threads per pass (tree ensembles): a small batch runs on one thread, since a server
        # gets its parallelism from concurrent requests and OpenMP's spinning workers cost a 1-row
        # pass up to 40x its CPU on a busy machine (issue 18); big batches keep the default (or
        # MODEL_THREADS). Only scikit-learn's own OpenMP runtime is limited, never torch's.
        from threadpoolctl import ThreadpoolController

        self._omp = ThreadpoolController().select(user_api="openmp")
        self._omp = [lib for lib in self._omp.lib_controllers if "scikit_learn" in lib.filepath]
        self._threads = options.threads

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.column_stack([inputs[n].reshape(-1).astype(np.float32) for n in self.feature_order])
        threads = self._threads or (1 if len(x) <= SMALL_BATCH_ROWS else None)
        if threads and self._omp:
            before = [lib.num_threads for lib in self._omp]
            for lib in self._omp:
                lib.set_num_threads(threads)
            try:
                proba = self.estimator.predict_proba(x).astype(np.float32)
            finally:
                for lib, n in zip(self._omp, before):
                    lib.set_num_threads(n)
        else:
            proba = self.estimator.predict_proba(x).astype(np.float32)
        return {"label": self.classes[proba.argmax(axis=1)].astype(np.int64), "probability": proba}


class TextTokenizer:
    """BERT word pieces with the `tokenizers` library: no transformers import on the ONNX path."""

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")

    def __call__(self, texts: np.ndarray) -> dict[str, np.ndarray]:
        strings = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)]
        enc = self.tok.encode_batch(strings)
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.zeros_like(ids)}


class TorchEmbeddingRuntime:
    """Sentence embeddings from a transformers encoder: mean-pooled over real tokens, L2-normalised."""

    def __init__(self, version_dir: Path, manifest: Manifest, options: RuntimeOptions = RuntimeOptions()):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if options.threads:
            torch.set_num_threads(options.threads)
        p = manifest.parameters
        self.torch = torch
        self.input_name, self.output_name = manifest.inputs[0].name, manifest.outputs[0].name
        self.tokenize = TextTokenizer(version_dir / "tokenizer.json", int(p.get("max_seq_length", 256)))
        self.device = pick_device(options.device or manifest.device, torch.cuda.is_available())
        model = AutoModel.from_pretrained(str(version_dir), local_files_only=True).eval()
        self.precision = "fp16" if (options.fp16 or p.get("fp16")) and self.device == "cuda" else "fp32"
        if self.precision == "fp16":
            model = model.half()
        self.model = model.to(self.device)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        feeds = {k: torch.from_numpy(v).to(self.device) for k, v in self.tokenize(inputs[self.input_name]).items()}
        with torch.inference_mode():
            hidden = self.model(**feeds).last_hidden_state.float()
            mask = feeds["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {self.output_name: emb.cpu().numpy().astype(np.float32)}


class OnnxRuntime:
    """ONNX Runtime session. With a tokenizer artifact, the BYTES input is tokenised first;
    otherwise v2 inputs feed the graph's inputs of the same names (Triton's onnxruntime backend)."""

    def __init__(self, version_dir: Path, manifest: Manifest, options: RuntimeOptions = RuntimeOptions()):
        import onnxruntime as ort

        p = manifest.parameters
        available = "CUDAExecutionProvider" in ort.get_available_providers()
        self.device = pick_device(options.device or manifest.device, available)
        providers = (["CUDAExecutionProvider"] if self.device == "cuda" else []) + ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = options.threads
        self.session = ort.InferenceSession(str(version_dir / p.get("onnx_file", "model.onnx")), so,
                                            providers=providers)
        self.precision = str(p.get("precision", "fp32"))
        self.graph_inputs = {i.name for i in self.session.get_inputs()}
        self.output_names = [t.name for t in manifest.outputs]
        self.specs = {t.name: t for t in manifest.inputs}
        tok = p.get("tokenizer")
        self.tokenize = TextTokenizer(version_dir / tok, int(p.get("max_seq_length", 256))) if tok else None

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.tokenize is not None:
            feeds = self.tokenize(next(iter(inputs.values())))
        else:
            feeds = inputs
        feeds = {k: v for k, v in feeds.items() if k in self.graph_inputs}
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results))


RUNTIMES = {"sklearn": SklearnRuntime, "torch": TorchEmbeddingRuntime, "onnx": OnnxRuntime}


def load_runtime(version_dir: Path, manifest: Manifest, options: RuntimeOptions | None = None) -> Runtime:
    try:
        cls = RUNTIMES[manifest.runtime]
    except KeyError:
        raise ValueError(f"unknown runtime {manifest.runtime!r}; known: {sorted(RUNTIMES)}") from None
    return cls(version_dir, manifest, options or RuntimeOptions())
