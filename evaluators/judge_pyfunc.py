"""The small judge as an MLflow pyfunc, so registry users (UI, `mlflow models serve`) can call it too.

ShadowJudge itself loads the judge directory straight from the artifacts (evaluators.judge_registry) and never
goes through pyfunc; this wrapper exists for everyone else.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class SmallJudgePyfunc(mlflow.pyfunc.PythonModel):
    """Input: records with `prompt` and `answer` (pointwise score) or `prompt`, `incumbent`, `candidate`
    (P(candidate better)), all in one shape per call. Output: one float in [0, 1] per record."""

    def load_context(self, context: Any) -> None:
        from evaluators.small_judge import SmallJudge

        self.judge = SmallJudge.load(context.artifacts["judge"])

    def predict(self, context: Any, model_input: list[dict[str, str]], params: dict[str, Any] | None = None
                ) -> list[float]:
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        if not rows:
            return []
        keys = set(rows[0])
        prompts = [str(r["prompt"]) for r in rows]
        if {"incumbent", "candidate"} <= keys:
            return self.judge.compare(prompts, [str(r["incumbent"]) for r in rows],
                                      [str(r["candidate"]) for r in rows])
        if "answer" in keys:
            return self.judge.score(prompts, [str(r["answer"]) for r in rows])
        raise ValueError("records need keys prompt+answer or prompt+incumbent+candidate")


# Logged "from code" (this file's path), so MLflow never pickles a class instance.
mlflow.models.set_model(SmallJudgePyfunc())
