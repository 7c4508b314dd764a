"""A model-free evaluator for smoke tests and machines without the judge: coverage, completeness, no evasions.

It knows nothing about correctness; use it to exercise the pipeline, never to make rollout decisions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from evaluators.checks import looks_like_refusal

_WORD = re.compile(r"[a-z0-9]{3,}")
_STOP = frozenset("the and for that this with you your are was were have has from what how why when which who "
                  "can could would should will please about into them they their there then than".split())


class LexicalEvaluator:
    version = "lexical:1"

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [self._score(p, a) for p, a in zip(prompts, answers, strict=True)]

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        inc = self.score(prompts, incumbent)
        cand = self.score(prompts, candidate)
        return [1.0 / (1.0 + math.exp(-6.0 * (c - i))) for i, c in zip(inc, cand)]

    @staticmethod
    def _score(prompt: str, answer: str) -> float:
        text = (answer or "").strip()
        if not text:
            return 0.0
        asked = {w for w in _WORD.findall(prompt.lower()) if w not in _STOP}
        said = set(_WORD.findall(text.lower()))
        coverage = len(asked & said) / len(asked) if asked else 1.0
        words = len(text.split())
        substance = min(1.0, math.log1p(words) / math.log1p(150))
        finished = 1.0 if text.endswith((".", "!", "?", "```", ")", '"', "*")) else 0.7
        penalty = 0.4 if looks_like_refusal(text) else 1.0
        return round((0.4 * coverage + 0.6 * substance) * finished * penalty, 6)
