"""The train-judge flow's embedding cache does not follow the worker's working directory: it is the checkout's (or
the labelling config's) .shadowjudge/cache wherever the flow runs from."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.train_judge import train_judge_flow

ROOT = Path(__file__).resolve().parent.parent


class _Trained:
    model_uri, alias, metrics = "models:/j/1", "challenger", {"agreement": 0.7}

    def as_dict(self) -> dict:
        return {"model_uri": self.model_uri}


@pytest.fixture
def cache_dirs(monkeypatch) -> list[Path]:
    """The cache_dir each (faked) training was given."""
    given: list[Path] = []

    def train(data_dirs, tracking_uri, **kwargs):
        given.append(kwargs.get("cache_dir"))
        return _Trained()

    class Labelled:
        def as_dict(self) -> dict:
            return {"pairs": 1, "route": "r", "teacher_calls": 1, "reused_verdicts": 0}

    monkeypatch.setattr("evaluators.judge_training.train_judge", train)
    monkeypatch.setattr("evaluators.traffic_labels.label_route_traffic", lambda *a, **k: Labelled())
    return given


def test_the_embedding_cache_is_absolute_wherever_the_worker_runs(tmp_path, monkeypatch, cache_dirs, prefect_harness):
    worker_cwd = tmp_path / "worker"
    worker_cwd.mkdir()
    monkeypatch.chdir(worker_cwd)
    config = tmp_path / "configs" / "shadowjudge.yaml"
    train_judge_flow("data", "sqlite:///mlflow.db", quick=True)
    train_judge_flow("data", "sqlite:///mlflow.db", quick=True, label_traffic_config=str(config))
    assert cache_dirs == [ROOT / ".shadowjudge" / "cache", config.parent / ".shadowjudge" / "cache"]
    train_judge_flow("data", "sqlite:///mlflow.db", quick=True, cache_dir="cache")  # a relative one given
    assert cache_dirs[-1] == ROOT / "cache"
