"""Evaluators: judges and checks that score (incumbent, candidate) answer pairs.

Heavy dependencies (torch, transformers, mlflow) load only when a judge is built, so importing this package is cheap.
"""

from evaluators.base import Evaluator
from evaluators.factory import EvaluatorConfigError, ensure_champion, load_evaluator, load_evaluator_version

__all__ = ["Evaluator", "EvaluatorConfigError", "ensure_champion", "load_evaluator", "load_evaluator_version",
           "train_judge", "TrainResult"]


def __getattr__(name: str):
    if name in ("train_judge", "TrainResult"):
        from evaluators import judge_training

        return getattr(judge_training, name)
    raise AttributeError(f"module 'evaluators' has no attribute {name!r}")
