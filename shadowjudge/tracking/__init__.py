"""Experiment tracking (MLflow)."""

from shadowjudge.tracking.mlflow_tracking import CandidateLog, CycleLog, TrackingError, log_cycle, run_link
from shadowjudge.tracking.reachability import TrackingUnreachable, check_config_tracking, check_tracking_reachable

__all__ = ["CandidateLog", "CycleLog", "TrackingError", "TrackingUnreachable", "check_config_tracking",
           "check_tracking_reachable", "log_cycle", "run_link"]
