"""MLflow logging for evaluation cycles: one experiment per route, one run per cycle, a nested run per candidate.

Runs are found again by their `shadowjudge.run_key` tag, so logging a cycle twice updates the same run
instead of creating a second one: a metric whose value changed gets a new point stamped with the time (the rerun's
value is the latest; an unchanged value adds no point, so a plain rerun leaves every metric's history as it was),
a metric the rerun has no value for gets a NaN point (so the first value does not stay the latest), artifacts and
the per-sample table are replaced, and params, which MLflow never changes, are kept, with those a rerun would have
changed listed in the `shadowjudge.params_changed_by_rerun` tag.

An infinite metric (the cost per accepted answer of a candidate with none accepted) is logged as infinite; a SQL
tracking store keeps it as the largest float (1.797e308), which still sorts and filters as the worst value, and
the `shadowjudge.infinite_metrics` tag names the metrics whose value is infinite.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shadowjudge.errors import ShadowJudgeError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RUN_KEY_TAG = "shadowjudge.run_key"
TARGET_TAG = "shadowjudge.target"
CYCLE_TARGET = "__cycle__"  # the TARGET_TAG of a cycle's parent run (config refuses it as a target name)
PARAMS_CHANGED_TAG = "shadowjudge.params_changed_by_rerun"
INFINITE_METRICS_TAG = "shadowjudge.infinite_metrics"
MLFLOW_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the tag MLflow's UI reads to show a logged table


class TrackingError(ShadowJudgeError):
    """MLflow could not be reached or refused what was logged (exit status 1: not bad input, and a stage that
    failed on it is retried)."""


@dataclass
class CandidateLog:
    """What one candidate's nested run holds."""

    target: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)  # None or NaN: no value this time
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class CycleLog:
    """Everything a cycle logs; plain data so the cycle code can build it without MLflow imported."""

    route: str
    run_key: str
    params: dict[str, Any]
    metrics: dict[str, float | None]
    tags: dict[str, str]
    candidates: list[CandidateLog]
    samples_table: dict[str, list[Any]] | None = None
    figures: dict[str, Any] = field(default_factory=dict)  # artifact file name -> matplotlib Figure
    json_artifacts: dict[str, Any] = field(default_factory=dict)  # artifact file name -> JSON-serialisable
    # Metric name prefixes this log did not compute (a stage rerun has no ingest or calibration report): the values
    # logged for them before are kept, not replaced by NaN as a metric the cycle no longer has would be.
    not_computed: tuple[str, ...] = ()


def experiment_name(prefix: str, route: str) -> str:
    return f"{prefix}/{route}"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _metric_updates(metrics: Mapping[str, float | None], latest: Mapping[str, float],
                    not_computed: tuple[str, ...] = ()) -> dict[str, float]:
    """The values to log: those not logged before or changed since, and NaN for a metric logged before that has no
    value now (None, NaN, or left out, unless its name starts with one of `not_computed`), so its old value does not
    read as the latest. A metric never logged gets no point until it has a value."""
    values = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
    values |= {k: math.nan for k in latest
               if k not in values and (k in metrics or not k.startswith(not_computed))}
    return {k: v for k, v in values.items() if k not in latest or not _same_as_stored(latest[k], v)}


def _same_as_stored(stored: float, value: float) -> bool:
    """Whether the store already holds `value` as the latest: NaN equals NaN there, and a SQL store keeps an
    infinity as the largest float of its sign (a file store keeps it as is)."""
    if math.isnan(value):
        return math.isnan(stored)
    if math.isinf(value):
        return stored in (value, math.copysign(sys.float_info.max, value))
    return stored == value


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a local SQLite tracking DB, not in `./mlruns` of whatever folder the process runs in (which
    changes between runs and is shared by unrelated stores). None: the tracking server decides."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(client, tracking_uri: str, name: str) -> str:
    """The experiment's id, created (with `default_artifact_root`) or restored from deletion as needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = default_artifact_root(tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id


def _quoted(value: str) -> str:
    """A string literal for an MLflow search filter, which has no escapes: quoted with the quote it does not hold."""
    for quote in ("'", '"'):
        if quote not in value:
            return quote + value + quote
    raise TrackingError(f"{value!r} holds both kinds of quote and cannot be searched for in MLflow")


def _find_run(client, experiment_id: str, key: str, target: str) -> str | None:
    query = f"tags.`{RUN_KEY_TAG}` = {_quoted(key)} and tags.`{TARGET_TAG}` = {_quoted(target)}"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def _log_values(client, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                tags: Mapping[str, str], not_computed: tuple[str, ...] = ()) -> None:
    from mlflow.entities import Metric, Param, RunTag

    data = client.get_run(run_id).data
    existing, latest = data.params, data.metrics
    wanted = {k: str(v)[:6000] for k, v in params.items()}
    # MLflow params are immutable: a rerun adds the params it did not log before, and says which it would change.
    changed = {k: v for k, v in wanted.items() if k in existing and existing[k] != v}
    infinite = sorted(k for k, v in metrics.items() if v is not None and math.isinf(float(v)))
    all_tags = {**tags, **({PARAMS_CHANGED_TAG: json.dumps(changed)[:5000]} if changed else {}),
                **({INFINITE_METRICS_TAG: ",".join(infinite)[:5000]} if infinite else {})}
    now_ms = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now_ms, 0) for k, v in _metric_updates(metrics, latest, not_computed).items()],
        params=[Param(k, v) for k, v in wanted.items() if k not in existing],
        tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
    )
    if not infinite and INFINITE_METRICS_TAG in data.tags:  # a rerun whose values are all finite again
        client.delete_tag(run_id, INFINITE_METRICS_TAG)


def _log_table(client, run_id: str, table: Mapping[str, list[Any]], artifact_file: str, tmp: Path) -> None:
    """What `MlflowClient.log_table` writes (pandas 'split' JSON, the UI's table tag), replacing an earlier copy:
    log_table appends to one, so a rerun doubled the table."""
    import pandas as pd

    path = tmp / artifact_file
    pd.DataFrame(dict(table)).to_json(path, orient="split", index=False, date_format="iso")
    client.log_artifact(run_id, str(path))
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


def log_cycle(tracking_uri: str, prefix: str, cycle: CycleLog) -> str:
    """Log (or re-log) a cycle; returns the parent run id. A failure marks the runs it left unfinished FAILED (a
    scheduled cycle's next attempt has another run key, so one left RUNNING would stay so)."""
    import tempfile

    client, opened = None, []
    try:
        client = _client(tracking_uri)
        exp_id = ensure_experiment(client, tracking_uri, experiment_name(prefix, cycle.route))
        run_id = _find_run(client, exp_id, cycle.run_key, CYCLE_TARGET)
        if run_id is None:
            run = client.create_run(exp_id, run_name=cycle.run_key,
                                    tags={RUN_KEY_TAG: cycle.run_key, TARGET_TAG: CYCLE_TARGET})
            run_id = run.info.run_id
        opened.append(run_id)
        _log_values(client, run_id, cycle.params, cycle.metrics, cycle.tags, cycle.not_computed)
        for cand in cycle.candidates:
            child = _find_run(client, exp_id, cycle.run_key, cand.target)
            if child is None:
                child = client.create_run(exp_id, run_name=f"{cycle.run_key}/{cand.target}", tags={
                    RUN_KEY_TAG: cycle.run_key, TARGET_TAG: cand.target, "mlflow.parentRunId": run_id,
                }).info.run_id
            opened.append(child)
            _log_values(client, child, cand.params, cand.metrics, cand.tags)
            client.set_terminated(child, "FINISHED")
            opened.remove(child)
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
                _log_table(client, run_id, cycle.samples_table, "samples.json", Path(tmp))
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except Exception as exc:  # MLflow raises many types; the caller needs one
        _mark_failed(client, opened)
        if isinstance(exc, TrackingError):
            raise
        raise TrackingError(f"MLflow at {redact_uri(tracking_uri)} failed: {type(exc).__name__}: {exc}") from exc


def _mark_failed(client, run_ids: list[str]) -> None:
    for run_id in reversed(run_ids):
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the store that failed may refuse this too; the original error is raised
            pass


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
    """The UI page of a run; `ui_url` defaults to the tracking URI when that is an HTTP server.

    Credentials in the URL (http://user:token@host) are dropped, not masked: the link goes into alert bundles and
    to every sink, and must stay clickable (the browser asks the user to log in).
    """
    from urllib.parse import urlsplit, urlunsplit

    if not run_id:
        return None
    base = ui_url or (tracking_uri if tracking_uri.startswith("http") else None)
    if base is not None:
        parts = urlsplit(base)
        base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
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


def _legend(ax) -> None:
    """A legend when something was drawn (a route without answers draws nothing, and matplotlib warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def score_histogram(scores: Mapping[str, Iterable[float]], title: str):

    fig, ax = new_figure()
    for name, values in scores.items():
        values = [v for v in values if v is not None]
        if values:
            ax.hist(values, bins=20, range=(0, 1), alpha=0.5, label=f"{name} (n={len(values)})")
    ax.set_xlabel("judge score")
    ax.set_ylabel("answers")
    ax.set_title(title)
    _legend(ax)
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
    _legend(ax)
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
