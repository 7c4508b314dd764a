"""MLflow logging for evaluation cycles: one experiment per route, one run per cycle, a nested run per candidate.

Runs are found again by their `shadowjudge.run_key` tag, so logging a cycle twice updates the same run
instead of creating a second one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shadowjudge.errors import ShadowJudgeError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RUN_KEY_TAG = "shadowjudge.run_key"
TARGET_TAG = "shadowjudge.target"


class TrackingError(ShadowJudgeError):
    """MLflow could not be reached or refused what was logged (exit status 1: not bad input, and a stage that
    failed on it is retried)."""


@dataclass
class CandidateLog:
    """What one candidate's nested run holds."""

    target: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class CycleLog:
    """Everything a cycle logs; plain data so the cycle code can build it without MLflow imported."""

    route: str
    run_key: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]
    candidates: list[CandidateLog]
    samples_table: dict[str, list[Any]] | None = None
    figures: dict[str, Any] = field(default_factory=dict)  # artifact file name -> matplotlib Figure
    json_artifacts: dict[str, Any] = field(default_factory=dict)  # artifact file name -> JSON-serialisable


def experiment_name(prefix: str, route: str) -> str:
    return f"{prefix}/{route}"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _finite(metrics: Mapping[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _ensure_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name)


def _find_run(client, experiment_id: str, key: str, extra: str = "") -> str | None:
    query = f"tags.`{RUN_KEY_TAG}` = '{key}'" + extra
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def _log_values(client, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                tags: Mapping[str, str]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    existing = client.get_run(run_id).data.params
    # MLflow params are immutable: a rerun may only add params it did not log before.
    new_params = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in _finite(metrics).items()],
        params=new_params,
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )


def log_cycle(tracking_uri: str, prefix: str, cycle: CycleLog) -> str:
    """Log (or re-log) a cycle; returns the parent run id."""
    import json
    import tempfile
    from pathlib import Path

    try:
        client = _client(tracking_uri)
        exp_id = _ensure_experiment(client, experiment_name(prefix, cycle.route))
        run_id = _find_run(client, exp_id, cycle.run_key, f" and tags.`{TARGET_TAG}` = '__cycle__'")
        if run_id is None:
            run = client.create_run(exp_id, run_name=cycle.run_key,
                                    tags={RUN_KEY_TAG: cycle.run_key, TARGET_TAG: "__cycle__"})
            run_id = run.info.run_id
        _log_values(client, run_id, cycle.params, cycle.metrics, cycle.tags)
        for cand in cycle.candidates:
            child = _find_run(client, exp_id, cycle.run_key, f" and tags.`{TARGET_TAG}` = '{cand.target}'")
            if child is None:
                child = client.create_run(exp_id, run_name=f"{cycle.run_key}/{cand.target}", tags={
                    RUN_KEY_TAG: cycle.run_key, TARGET_TAG: cand.target, "mlflow.parentRunId": run_id,
                }).info.run_id
            _log_values(client, child, cand.params, cand.metrics, cand.tags)
            client.set_terminated(child, "FINISHED")
        with tempfile.TemporaryDirectory() as tmp:
            for name, fig in cycle.figures.items():
                path = Path(tmp) / name
                fig.savefig(path, dpi=110, bbox_inches="tight")
                client.log_artifact(run_id, str(path), artifact_path="plots")
            for name, payload in cycle.json_artifacts.items():
                path = Path(tmp) / name
                path.write_text(json.dumps(payload, indent=2, default=str))
                client.log_artifact(run_id, str(path))
        if cycle.samples_table:
            client.log_table(run_id, data=cycle.samples_table, artifact_file="samples.json")
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except TrackingError:
        raise
    except Exception as exc:  # MLflow raises many types; the caller needs one
        raise TrackingError(f"MLflow at {redact_uri(tracking_uri)} failed: {type(exc).__name__}: {exc}") from exc


def log_figures(tracking_uri: str, run_id: str, figures: Mapping[str, Any]) -> None:
    """Save matplotlib figures under the run's `plots/` (a figure logged again replaces the earlier one)."""
    import tempfile
    from pathlib import Path

    client = _client(tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, fig in figures.items():
                path = Path(tmp) / name
                fig.savefig(path, dpi=110, bbox_inches="tight")
                client.log_artifact(run_id, str(path), artifact_path="plots")
    except Exception as exc:  # MLflow raises many types; the caller needs one
        raise TrackingError(f"MLflow at {redact_uri(tracking_uri)} failed: {type(exc).__name__}: {exc}") from exc


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def run_link(tracking_uri: str, ui_url: str | None, prefix: str, route: str, run_id: str | None) -> str | None:
    """The UI page of a run; `ui_url` defaults to the tracking URI when that is an HTTP server."""
    if not run_id:
        return None
    base = ui_url or (tracking_uri if tracking_uri.startswith("http") else None)
    try:
        exp = _client(tracking_uri).get_experiment_by_name(experiment_name(prefix, route))
    except Exception:
        exp = None
    exp_id = exp.experiment_id if exp else "0"
    if base is None:
        return f"mlflow-run://{exp_id}/{run_id}"
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def redact_uri(uri: str) -> str:
    """Drop credentials from a URI before it goes into a message."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def new_figure(width: float = 6.0, height: float = 3.5, ncols: int = 1):
    """A figure and its axes outside pyplot's global registry, so nothing keeps it once the caller drops it (a
    serving process draws a few per cycle for weeks)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols)


def score_histogram(scores: Mapping[str, Iterable[float]], title: str):

    fig, ax = new_figure()
    for name, values in scores.items():
        values = [v for v in values if v is not None]
        if values:
            ax.hist(values, bins=20, range=(0, 1), alpha=0.5, label=f"{name} (n={len(values)})")
    ax.set_xlabel("judge score")
    ax.set_ylabel("answers")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def latency_cdf(latencies: Mapping[str, Iterable[float]], title: str):
    import numpy as np

    fig, ax = new_figure()
    for name, values in latencies.items():
        arr = np.sort(np.array([v for v in values if v is not None], dtype=float))
        if arr.size:
            ax.plot(arr, np.arange(1, arr.size + 1) / arr.size, label=f"{name} (n={arr.size})")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def weight_history_plot(history: list[tuple[Any, Mapping[str, int]]], title: str):
    """history: (timestamp, {target: weight}) in time order."""

    fig, ax = new_figure()
    targets = sorted({t for _, w in history for t in w})
    xs = list(range(len(history)))
    for t in targets:
        ax.step(xs, [w.get(t, 0) for _, w in history], where="post", label=t)
    ax.set_xlabel("change #")
    ax.set_ylabel("weight %")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
