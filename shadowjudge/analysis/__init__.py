"""Regression analysis, golden regression sets and drift detection over stored shadow results."""

from shadowjudge.analysis.canary import Classification, MetricResult, Verdict, classify_effect, score_metrics
from shadowjudge.analysis.regression import CandidateAnalysis, RunAnalysis, SliceResult, analyze_run
from shadowjudge.analysis.run_data import AnalysisError

__all__ = [
    "AnalysisError", "CandidateAnalysis", "Classification", "MetricResult", "RunAnalysis", "SliceResult", "Verdict",
    "analyze_run", "classify_effect", "score_metrics",
]
