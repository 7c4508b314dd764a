"""LLM-as-judge through any OpenAI-compatible endpoint: the teacher whose verdicts the small judge learns from.

Pairwise verdicts are asked in both orders and averaged, which cancels the position bias big judges have;
pointwise scores come from a 1-10 rubric. Requests run concurrently; an unusable verdict is re-asked once and then
counts as a tie (pairwise) or the middle score (pointwise), and is counted in `unparsed`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shadowjudge.errors import ShadowJudgeError

if TYPE_CHECKING:
    from openai import OpenAI

    from shadowjudge.config import TargetConfig

PAIRWISE_SYSTEM = (
    "You are an impartial expert judge of AI assistant answers. Compare two answers to the same instruction. "
    "Judge helpfulness, correctness, completeness, following the instruction, clarity and harmlessness. "
    "Do not prefer an answer for being longer or for its position. "
    'Reply with JSON only: {"reason": "<one sentence>", "winner": "A" | "B" | "tie"}.'
)
PAIRWISE_USER = "## Instruction\n{prompt}\n\n## Answer A\n{a}\n\n## Answer B\n{b}\n\nWhich answer is better?"
POINTWISE_SYSTEM = (
    "You are an impartial expert judge of AI assistant answers. Rate how well the answer serves the instruction: "
    "correctness, helpfulness, completeness, following the instruction, clarity. 1 = useless or wrong, "
    "10 = excellent. Do not reward length for its own sake. "
    'Reply with JSON only: {"reason": "<one sentence>", "score": <integer 1-10>}.'
)
POINTWISE_USER = "## Instruction\n{prompt}\n\n## Answer\n{answer}\n\nRate the answer."

_WINNER = re.compile(r'"winner"\s*:\s*"?(A|B|tie)"?', re.IGNORECASE)
_SCORE = re.compile(r'"score"\s*:\s*"?(\d+(?:\.\d+)?)"?')


class LlmJudgeError(ShadowJudgeError):
    """The judge endpoint failed after the client's retries; the message names model and error class only."""


@dataclass(frozen=True)
class PairVerdict:
    """Both orders' verdicts (1 = candidate better, 0 = incumbent better, 0.5 = tie) and their mean."""

    candidate_first: float | None
    incumbent_first: float | None

    @property
    def preference(self) -> float:
        known = [v for v in (self.candidate_first, self.incumbent_first) if v is not None]
        return sum(known) / len(known) if known else 0.5

    @property
    def position_consistent(self) -> bool:
        return self.candidate_first == self.incumbent_first


def parse_winner(text: str) -> str | None:
    """'A', 'B' or 'tie' from a JSON verdict, tolerating code fences and chatter around it."""
    try:
        value = json.loads(_strip_fence(text)).get("winner")
        if isinstance(value, str) and value.strip().lower() in ("a", "b", "tie"):
            return value.strip().upper() if value.strip().lower() != "tie" else "tie"
    except (ValueError, AttributeError):
        pass
    m = _WINNER.search(text or "")
    if not m:
        return None
    return m.group(1).upper() if m.group(1).lower() != "tie" else "tie"


def parse_score(text: str) -> float | None:
    """The 1-10 rating mapped to [0, 1], or None if there is no usable rating."""
    value: Any = None
    try:
        value = json.loads(_strip_fence(text)).get("score")
    except (ValueError, AttributeError):
        m = _SCORE.search(text or "")
        value = m.group(1) if m else None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    if not 1 <= score <= 10:
        return None
    return (score - 1) / 9


def _strip_fence(text: str) -> str:
    t = (text or "").strip()
    if t.startswith("```"):
        t = t.strip("`")
        t = t[4:] if t.lower().startswith("json") else t
    return t.strip()


class LlmJudge:
    """An `Evaluator` backed by a chat model; also the teacher for calibration and for labelling stored traffic."""

    def __init__(self, client: "OpenAI", model: str, *, concurrency: int = 8, max_tokens: int = 200,
                 temperature: float = 0.0, name: str | None = None) -> None:
        self.client = client
        self.model = model
        self.concurrency = max(1, concurrency)
        self.max_tokens = max_tokens
        self.temperature = temperature
        rubric = hashlib.sha1((PAIRWISE_SYSTEM + PAIRWISE_USER + POINTWISE_SYSTEM + POINTWISE_USER).encode())
        self.version = f"llm-judge:{name or model}:{rubric.hexdigest()[:8]}"
        self.unparsed = 0
        self._lock = threading.Lock()

    @classmethod
    def from_target(cls, target: "TargetConfig", *, timeout_s: float = 60.0, max_retries: int = 3) -> "LlmJudge":
        from openai import OpenAI

        client = OpenAI(base_url=target.base_url, api_key=target.api_key(), timeout=timeout_s,
                        max_retries=max_retries)
        return cls(client, target.model, concurrency=target.concurrency, name=target.name)

    # -- one call ------------------------------------------------------------------------------------------------
    def _ask(self, system: str, user: str) -> str:
        from openai import OpenAIError

        try:
            response = self.client.chat.completions.create(
                model=self.model, temperature=self.temperature, max_tokens=self.max_tokens,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            )
        except OpenAIError as exc:
            status = getattr(exc, "status_code", None)
            raise LlmJudgeError(f"judge model '{self.model}' failed: {type(exc).__name__}"
                                + (f" (HTTP {status})" if status else "")) from None
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def _verdict(self, prompt: str, a: str, b: str) -> str | None:
        user = PAIRWISE_USER.format(prompt=prompt, a=a, b=b)
        for _ in range(2):
            winner = parse_winner(self._ask(PAIRWISE_SYSTEM, user))
            if winner is not None:
                return winner
        with self._lock:
            self.unparsed += 1
        return None

    def judge_pair(self, prompt: str, incumbent: str, candidate: str) -> PairVerdict:
        """Ask both orders; each verdict becomes P(candidate better) in {0, 0.5, 1} or None if unusable."""
        first = self._verdict(prompt, candidate, incumbent)   # candidate is A
        second = self._verdict(prompt, incumbent, candidate)  # candidate is B
        to_p = {"A": 1.0, "B": 0.0, "tie": 0.5}
        return PairVerdict(
            candidate_first=None if first is None else to_p[first],
            incumbent_first=None if second is None else 1.0 - to_p[second],
        )

    def _rate(self, prompt: str, answer: str) -> float:
        user = POINTWISE_USER.format(prompt=prompt, answer=answer)
        for _ in range(2):
            score = parse_score(self._ask(POINTWISE_SYSTEM, user))
            if score is not None:
                return score
        with self._lock:
            self.unparsed += 1
        return 0.5

    # -- Evaluator ------------------------------------------------------------------------------------------------
    def judge_pairs(self, prompts: Sequence[str], incumbent: Sequence[str],
                    candidate: Sequence[str]) -> list[PairVerdict]:
        _same_length(prompts, incumbent, candidate)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.judge_pair, prompts, incumbent, candidate))

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        return [v.preference for v in self.judge_pairs(prompts, incumbent, candidate)]

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        _same_length(prompts, answers)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._rate, prompts, answers))


def _same_length(*seqs: Sequence[str]) -> None:
    if len({len(s) for s in seqs}) > 1:
        raise ValueError(f"prompts and answers must have the same length, got {[len(s) for s in seqs]}")
