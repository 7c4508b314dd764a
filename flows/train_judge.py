"""Training the small judge as a Prefect flow (e.g. a weekly deployment); the work is evaluators.judge_training."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prefect import flow, get_run_logger  # noqa: E402


@flow(name="train-judge")
def train_judge_flow(data_dir: str, tracking_uri: str, quick: bool = False, seed: int = 0,
                     registered_name: str = "shadowjudge-judge") -> dict[str, Any]:
    """Train, measure on held-out models, register; champion only if it beats the current champion."""
    from evaluators.judge_training import train_judge

    result = train_judge(data_dir, tracking_uri, quick=quick, seed=seed, registered_name=registered_name)
    get_run_logger().info("registered %s as %s (held-out agreement %.3f)", result.model_uri, result.alias,
                          result.metrics.get("agreement", float("nan")))
    return result.as_dict()


if __name__ == "__main__":
    import sys

    train_judge_flow(sys.argv[1], sys.argv[2], quick="--quick" in sys.argv)
