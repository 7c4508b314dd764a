"""The one protocol every evaluator implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Evaluator(Protocol):
    """Scores answers to prompts.

    `version` identifies the evaluator and its weights (e.g. "small-judge:models:/shadowjudge-judge/3");
    judgments are stored under it, so two versions never overwrite each other.
    """

    version: str

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Pointwise quality of each answer to its prompt, in [0, 1]."""
        ...

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        """P(candidate's answer is better than the incumbent's), in [0, 1], for each prompt."""
        ...
