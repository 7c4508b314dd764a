"""Cheap surface features of an answer, computed on the FULL text (the encoder only sees head and tail).

Length is what big judges reward most, so the length group can be switched off to train a judge that has to
learn from content alone; the other groups describe structure (lists, headers, code) and evasions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", re.MULTILINE)
_HEADER = re.compile(r"^\s*#{1,6}\s|^\s*\*\*[^*\n]{1,80}\*\*:?\s*$", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*")
_CODE = re.compile(r"```")
_REFUSAL = re.compile(
    r"\b(?:I'?m sorry|I am sorry|I apologi[sz]e|I can(?:no|')t (?:help|assist|provide)|as an AI|"
    r"I'?m (?:just )?an AI|I am (?:just )?an AI|language model)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")

LENGTH_FEATURES = ("log_chars", "log_words", "log_lines", "log_length_ratio")
STRUCTURE_FEATURES = ("bullets", "headers", "bold", "code_blocks", "refusal", "ends_cleanly", "paragraphs",
                      "prompt_word_overlap", "empty")


def feature_names(use_length: bool) -> tuple[str, ...]:
    return (LENGTH_FEATURES if use_length else ()) + STRUCTURE_FEATURES


def answer_features(prompts: Sequence[str], answers: Sequence[str], use_length: bool) -> np.ndarray:
    """(n, k) float32 matrix of surface features, in `feature_names(use_length)` order."""
    rows = []
    for prompt, answer in zip(prompts, answers):
        text = answer or ""
        words = _WORD.findall(text.lower())
        prompt_words = set(_WORD.findall(prompt.lower()))
        lines = [ln for ln in text.splitlines() if ln.strip()]
        row = []
        if use_length:
            row += [
                math.log1p(len(text)),
                math.log1p(len(words)),
                math.log1p(len(lines)),
                math.log1p(len(text)) - math.log1p(len(prompt)),
            ]
        stripped = text.rstrip()
        row += [
            math.log1p(len(_BULLET.findall(text))),
            math.log1p(len(_HEADER.findall(text))),
            math.log1p(len(_BOLD.findall(text))),
            math.log1p(len(_CODE.findall(text)) // 2),
            1.0 if _REFUSAL.search(text[:400]) else 0.0,
            1.0 if stripped.endswith((".", "!", "?", "```", ")", '"', "*", ":")) else 0.0,
            math.log1p(text.count("\n\n")),
            len(prompt_words & set(words)) / max(1, len(prompt_words)),
            1.0 if not stripped else 0.0,
        ]
        rows.append(row)
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(feature_names(use_length)))
