"""What a rerun's undefined values (None, NaN, infinite) leave in a real MLflow SQLite store: the rerun's state as the
latest value, never the first run's, and no new point when nothing changed."""

import math
import sys

from mlflow.tracking import MlflowClient

from shadowjudge.tracking import CandidateLog, CycleLog, log_cycle
from shadowjudge.tracking.mlflow_tracking import INFINITE_METRICS_TAG

COST = "cost_per_outcome.candidate_value"


def _cycle(candidate: dict, cycle: dict | None = None) -> CycleLog:
    return CycleLog("chat", "chat:20260101T0000Z", {"config_hash": "abc"}, {"samples": 40, **(cycle or {})}, {},
                    [CandidateLog("cand-a", {"model": "m-a"}, candidate, {"verdict": "pass"})])


def _child(client: MlflowClient, parent_id: str):
    exp_id = client.get_run(parent_id).info.experiment_id
    return next(r for r in client.search_runs([exp_id]) if r.info.run_id != parent_id)


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in client.get_metric_history(run_id, key)]


def test_a_value_a_rerun_no_longer_has_is_not_the_latest_any_more(tmp_path):
    """A score the rerun could not compute (None), one it left out and one that became NaN kept the first run's
    value as the latest, so the run page and searches read a score the cycle no longer has."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = log_cycle(uri, "sj", _cycle({"canary_score": 100.0, "win_rate": 0.6, "quality.effect": 1.1},
                                         {"cand-a.canary_score": 100.0}))
    log_cycle(uri, "sj", _cycle({"canary_score": None, "quality.effect": math.nan}))
    client = MlflowClient(uri)
    child = _child(client, parent)
    for key in ("canary_score", "win_rate", "quality.effect"):
        assert math.isnan(child.data.metrics[key]), key
    assert math.isnan(client.get_run(parent).data.metrics["cand-a.canary_score"])
    assert client.get_run(parent).data.metrics["samples"] == 40
    exp_id = child.info.experiment_id
    assert client.search_runs([exp_id], "metrics.canary_score > 50") == []

    log_cycle(uri, "sj", _cycle({"canary_score": None}))  # the same undefined values again: no new point
    assert len(_history(client, child.info.run_id, "canary_score")) == 2
    log_cycle(uri, "sj", _cycle({"canary_score": 80.0}))
    first, undefined, again = _history(client, child.info.run_id, "canary_score")
    assert (first, math.isnan(undefined), again) == (100.0, True, 80.0)
    assert client.get_run(child.info.run_id).data.metrics["canary_score"] == 80.0


def test_an_undefined_value_never_logged_before_adds_no_metric(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = log_cycle(uri, "sj", _cycle({"canary_score": None, "win_rate": math.nan, "n_judged": 40}))
    child = _child(MlflowClient(uri), parent)
    assert child.data.metrics == {"n_judged": 40.0}


def test_an_infinite_cost_is_logged_as_the_worst_value_and_named_in_a_tag(tmp_path):
    """A candidate with no accepted answer has an infinite cost per outcome: it got no point at all (and on a rerun
    the first run's finite cost stayed the latest), so the worst case was missing from charts and searches."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = log_cycle(uri, "sj", _cycle({COST: 0.002, "canary_score": 90.0}))
    log_cycle(uri, "sj", _cycle({COST: math.inf, "canary_score": 90.0}, {f"cand-a.{COST}": math.inf}))
    client = MlflowClient(uri)
    child = _child(client, parent)
    assert child.data.metrics[COST] == sys.float_info.max  # how a SQL store keeps +inf
    assert child.data.tags[INFINITE_METRICS_TAG] == COST
    assert client.get_run(parent).data.tags[INFINITE_METRICS_TAG] == f"cand-a.{COST}"
    exp_id = child.info.experiment_id
    found = client.search_runs([exp_id], f"metrics.`{COST}` > 0.01")
    assert [r.info.run_id for r in found] == [child.info.run_id]

    log_cycle(uri, "sj", _cycle({COST: math.inf, "canary_score": 90.0}))  # a plain rerun adds no point
    assert _history(client, child.info.run_id, COST) == [0.002, sys.float_info.max]
    assert _history(client, child.info.run_id, "canary_score") == [90.0]

    log_cycle(uri, "sj", _cycle({COST: 0.003, "canary_score": 90.0}))  # finite again: the tag goes
    child = client.get_run(child.info.run_id)
    assert child.data.metrics[COST] == 0.003 and INFINITE_METRICS_TAG not in child.data.tags


def test_an_infinite_cost_on_the_first_logging_gets_its_point(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = log_cycle(uri, "sj", _cycle({COST: math.inf}))
    child = _child(MlflowClient(uri), parent)
    assert child.data.metrics[COST] == sys.float_info.max and child.data.tags[INFINITE_METRICS_TAG] == COST


def test_metrics_a_stage_rerun_did_not_compute_keep_their_values(tmp_path):
    """The analyse and update-routes stage flows log the cycle again without its ingest and calibration reports:
    every calibration.* and ingest.* metric got a NaN point, though the teacher's verdicts were still stored."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = {"calibration.agreement": 0.65, "calibration.pairs": 43.0, "ingest.stored": 300.0, "spend_usd": 1.0}
    parent = log_cycle(uri, "sj", _cycle({"canary_score": 90.0}, first))
    rerun = CycleLog("chat", "chat:20260101T0000Z", {"config_hash": "abc"}, {"samples": 40}, {},
                     [CandidateLog("cand-a", {"model": "m-a"}, {"canary_score": 90.0}, {"verdict": "pass"})],
                     not_computed=("calibration.", "ingest."))
    log_cycle(uri, "sj", rerun)
    client = MlflowClient(uri)
    metrics = client.get_run(parent).data.metrics
    assert (metrics["calibration.agreement"], metrics["calibration.pairs"], metrics["ingest.stored"]) == (0.65, 43, 300)
    assert _history(client, parent, "calibration.agreement") == [0.65]
    assert math.isnan(metrics["spend_usd"])  # computed by the rerun and now unknown: not the first run's value
