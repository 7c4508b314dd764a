"""The one protocol every evaluator implements."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

MAX_VERSION_CHARS = 256  # the store's evaluator columns (judgments.evaluator, shadow_runs.judge_version)


def bounded_version(version: str) -> str:
    """`version` if it fits the store's columns, else its start and a hash of the whole: a version keys stored
    judgments, so cutting it short could make two versions one. (A registered model name may take 256 characters.)"""
    if len(version) <= MAX_VERSION_CHARS:
        return version
    digest = hashlib.sha256(version.encode()).hexdigest()[:16]
    return f"{version[:MAX_VERSION_CHARS - len(digest) - 1]}#{digest}"


@runtime_checkable
class Evaluator(Protocol):
    """Scores answers to prompts.

    `version` identifies the evaluator and its weights (e.g. "small-judge:models:/shadowjudge-judge/3@1a2b3c4d5e6f");
    judgments are stored under it, so two versions never overwrite each other.
    """

    version: str

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Pointwise quality of each answer to its prompt, in [0, 1]."""
        ...

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        """P(candidate's answer is better than the incumbent's), in [0, 1], for each prompt."""
        ...
