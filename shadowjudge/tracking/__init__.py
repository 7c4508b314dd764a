"""Experiment tracking (MLflow)."""

from shadowjudge.tracking.mlflow_tracking import CandidateLog, CycleLog, TrackingError, log_cycle, run_link

__all__ = ["CandidateLog", "CycleLog", "TrackingError", "log_cycle", "run_link"]
