"""Evaluators: judges and checks that score (incumbent, candidate) answer pairs."""

from evaluators.base import Evaluator

__all__ = ["Evaluator"]
