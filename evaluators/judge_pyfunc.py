"""The small judge as an MLflow pyfunc, so registry users (UI, `mlflow models serve`) can call it too.

ShadowJudge itself loads the judge directory straight from the artifacts (evaluators.judge_registry) and never
goes through pyfunc; this wrapper exists for everyone else.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow.pyfunc
import pandas as pd


class SmallJudgePyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame (what `mlflow models serve` hands over) or a list of records, with columns `prompt` and
    `answer` (pointwise score) or `prompt`, `incumbent`, `candidate` (P(candidate better)), all in one shape per
    call; a missing value (None, NaN) is an empty text. Output: one float in [0, 1] per row.

    `predict` is annotated with pd.DataFrame, for which MLflow infers no signature and converts nothing: a
    `list[dict[...]]` annotation made MLflow log a Map signature and hand a several-column DataFrame over as a list
    of its first column, so DataFrame input (that of `mlflow models serve`) failed."""

    def load_context(self, context: Any) -> None:
        from evaluators.small_judge import SmallJudge

        self.judge = SmallJudge.load(context.artifacts["judge"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> list[float]:
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        if not rows:
            return []
        keys = set(rows[0])

        def column(key: str) -> list[str]:
            return [_text(r[key]) for r in rows]

        if {"prompt", "incumbent", "candidate"} <= keys:
            return self.judge.compare(column("prompt"), column("incumbent"), column("candidate"))
        if {"prompt", "answer"} <= keys:
            return self.judge.score(column("prompt"), column("answer"))
        raise ValueError(f"records need keys prompt+answer or prompt+incumbent+candidate, got {sorted(map(str, keys))}")


def _text(value: Any) -> str:
    """A cell as text; a missing value (None, NaN, pd.NA) is empty, not the word "None" / "nan" / "<NA>"."""
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


# Logged "from code" (this file's path), so MLflow never pickles a class instance.
mlflow.models.set_model(SmallJudgePyfunc())
