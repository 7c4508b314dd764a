"""Regression analysis, golden regression sets and drift detection over stored shadow results."""

from shadowjudge.analysis.canary import Classification, MetricResult, Verdict, classify_effect, score_metrics
from shadowjudge.analysis.drift import (
    DriftReport,
    DriftResult,
    OutputWindow,
    input_drift,
    is_refusal,
    judge_drift,
    output_drift,
)
from shadowjudge.analysis.drift_data import TimeWindow, detect_drift, load_output_window, load_prompts
from shadowjudge.analysis.embeddings import MiniLMEmbedder, PromptEmbedder
from shadowjudge.analysis.golden import (
    GoldenCase,
    GoldenReport,
    GoldenSetError,
    load_golden_set,
    parse_golden_set,
    run_golden_set,
)
from shadowjudge.analysis.regression import CandidateAnalysis, RunAnalysis, SliceResult, analyze_run
from shadowjudge.analysis.run_data import AnalysisError

__all__ = [
    "AnalysisError", "CandidateAnalysis", "Classification", "DriftReport", "DriftResult", "GoldenCase",
    "GoldenReport", "GoldenSetError", "MetricResult", "MiniLMEmbedder", "OutputWindow", "PromptEmbedder",
    "RunAnalysis", "SliceResult", "TimeWindow", "Verdict", "analyze_run", "classify_effect", "detect_drift",
    "input_drift", "is_refusal", "judge_drift", "load_golden_set", "load_output_window", "load_prompts",
    "output_drift", "parse_golden_set", "run_golden_set", "score_metrics",
]
