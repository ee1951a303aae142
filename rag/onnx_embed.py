"""The same sentence-transformers model run by ONNX Runtime: exported once, optionally int8.

(rag/openvino_embed.py compiles the same float32 export with OpenVINO; it reuses this module's
export, cache and batching, and runs each batch itself.)

The model's transformer is exported with ``torch.onnx.export`` (the TorchScript exporter:
it needs nothing beyond torch and onnx) into a cache folder, then, for ``onnx-int8``,
quantized with ONNX Runtime's dynamic quantization (int8 weights per output channel,
activations quantized on the fly). Pooling and normalization are done here from the
model's own sentence-transformers config, so only mean or CLS pooling is accepted.

Each exported file is written beside its final name and renamed into place, so a killed
export leaves nothing half-written behind; the cache key is the model folder's weights
and config, so a changed model is exported anew.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

# app/config.py checks the setting against these; rag/embed.py resolves "auto" and runs the torch ones.
BACKENDS = ("auto", "torch", "torch-bf16", "openvino", "onnx", "onnx-int8")


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crofter" / "onnx"


def fingerprint(folder: Path) -> str:
    h = hashlib.sha256(str(folder).encode())
    for f in sorted(folder.rglob("*")):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".txt")):
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _pooling(st_model) -> str:
    pool = next((m for m in st_model if type(m).__name__ == "Pooling"), None)
    mode = getattr(pool, "pooling_mode", None) or ""
    if not mode and pool is not None:  # older sentence-transformers: one flag per mode
        cfg = pool.get_config_dict() if hasattr(pool, "get_config_dict") else {}
        mode = "mean" if cfg.get("pooling_mode_mean_tokens") else "cls" if cfg.get("pooling_mode_cls_token") else ""
    return mode


class OnnxEncoder:
    """Encode like `SentenceTransformer.encode(normalize_embeddings=True)`, with ONNX Runtime."""

    def __init__(self, st_model, folder: Path, backend: str, cache: Path | None = None):
        from .embed import EmbedError

        self.pooling = _pooling(st_model)
        if self.pooling not in ("mean", "cls"):
            raise EmbedError(f"embedding model {folder}: the ONNX backend handles mean or CLS pooling, "
                             f"not {self.pooling or 'this model'}'s; use the torch backend")
        dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
        self.dimension = int(dim() or 0)
        self.normalize = any(type(m).__name__ == "Normalize" for m in st_model)
        self.tokenizer = st_model.tokenizer
        self.max_tokens = int(st_model.max_seq_length or 256)
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in self.tokenizer.model_input_names]
        out = (cache or default_cache()) / f"{folder.name}-{fingerprint(folder)}"
        fp32 = out / "model.onnx"
        path = out / ("model-int8.onnx" if backend == "onnx-int8" else "model.onnx")
        try:
            runtime = self.runtime()
        except ImportError as exc:
            raise EmbedError(f"the {backend} backend needs {exc.name or 'its runtime'}, which is not installed "
                             f"(pip install {exc.name or backend})") from None
        try:
            self.session = made_again_once(lambda: self.prepare(runtime, st_model, fp32, path), fp32, path)
        except Exception as exc:
            raise EmbedError(f"cannot prepare the {backend} backend for {folder} in {out}: {exc}") from None
        self.path = path

    def runtime(self):
        """The runtime module, imported before any file is touched (an ImportError names it)."""
        import onnxruntime

        return onnxruntime

    def prepare(self, ort, st_model, fp32: Path, path: Path):
        """Export (and quantize) what the cache lacks; return what `run` runs on."""
        if not fp32.is_file():
            export(st_model, fp32, self.input_names)
        if path != fp32 and not path.is_file():
            _quantize(fp32, path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, feed: dict):
        """One padded batch -> the transformer's last hidden states, (batch, tokens, dimension)."""
        return self.session.run(None, feed)[0]

    def encode(self, texts: list[str], batch_size: int):
        import numpy as np

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens,
                                                       add_special_tokens=True)["input_ids"]]
        out: list = [None] * len(texts)
        for idx in by_length(lengths, batch_size):
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="np")
            hidden = self.run({n: enc[n].astype(np.int64) for n in self.input_names})
            if self.pooling == "cls":
                vec = hidden[:, 0]
            else:
                mask = enc["attention_mask"][..., None].astype(np.float32)
                vec = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            if self.normalize:
                vec = vec / np.clip(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12, None)
            for j, v in zip(idx, vec):
                out[j] = v
        return np.stack(out).astype(np.float32)


def made_again_once(prepare, *files: Path):
    """`prepare()`; should it fail where any of `files` was already cached, those files are taken
    to be damaged (truncated, or overwritten by hand), deleted, and `prepare()` runs once more.
    A failure with nothing cached is raised as it is: there is nothing to make again."""
    cached = any(f.is_file() for f in files)
    try:
        return prepare()
    except Exception:
        if not cached:
            raise
        for f in files:
            f.unlink(missing_ok=True)
        return prepare()


def by_length(lengths: list[int], size: int):
    """Index batches of at most `size`, longest texts first, so each batch pads to texts of about
    its own length (padding costs as much as text)."""
    import numpy as np

    order = np.argsort([-n for n in lengths], kind="stable")
    for i in range(0, len(order), size):
        yield order[i:i + size]


def export(st_model, dst: Path, input_names: list[str]) -> None:
    """The sentence-transformers model's transformer as a float32 ONNX file at `dst`; inputs
    `input_names`, output the last hidden states."""
    sample = st_model.tokenizer(["a short text", "a somewhat longer text to pad against"], padding=True,
                                return_tensors="pt")
    write_onnx(st_model[0].auto_model, lambda out: out.last_hidden_state, sample, dst, input_names,
               ("hidden", {0: "batch", 1: "tokens"}))


def write_onnx(hf, pick, sample, dst: Path, input_names: list[str], output: tuple[str, dict]) -> None:
    """A transformers model `hf` as a float32 ONNX file at `dst` (written beside it, then renamed
    into place), traced on the tokenizer's `sample`: inputs `input_names` with dynamic batch and
    token axes, one output `pick(hf(...))` named and with the dynamic axes `output` gives."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, *inputs):
            return pick(self.hf(**dict(zip(input_names, inputs))))

    body = Body().eval()
    axes = {n: {0: "batch", 1: "tokens"} for n in input_names}
    axes[output[0]] = output[1]
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(body, tuple(sample[n] for n in input_names), tmp, input_names=input_names,
                              output_names=[output[0]], dynamic_axes=axes, opset_version=17, dynamo=False)
        os.replace(tmp, dst)
    finally:
        hf.eval()  # the exporter restores the wrapper's mode, which would put the model in training mode
        if os.path.exists(tmp):
            os.unlink(tmp)


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".quant-", suffix=".onnx")
    os.close(fd)
    try:
        quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8, per_channel=True)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
