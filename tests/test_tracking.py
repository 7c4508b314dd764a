"""MLflow logging against a real local tracking store."""

from mlflow.tracking import MlflowClient

from shadowjudge.tracking import CandidateLog, CycleLog, log_cycle, run_link
from shadowjudge.tracking.mlflow_tracking import RUN_KEY_TAG, latency_cdf, score_histogram


def _cycle(metric: float) -> CycleLog:
    return CycleLog(
        route="chat", run_key="chat:20260101T0000Z",
        params={"config_hash": "abc", "judge_version": "small-judge:1", "sample_size": 3},
        metrics={"samples": 3, "nan_is_dropped": float("nan")}, tags={"shadowjudge.decision": "hold"},
        candidates=[CandidateLog("cand-a", params={"model": "m-a"}, metrics={"quality": metric, "win_rate": 0.6},
                                 tags={"verdict": "pass"})],
        samples_table={"prompt": ["p1", "p2"], "candidate_score": [0.1, 0.9]},
        figures={"scores.png": score_histogram({"cand-a": [0.1, 0.9]}, "scores"),
                 "latency.png": latency_cdf({"cand-a": [10.0, 20.0]}, "latency")},
        json_artifacts={"analysis.json": {"verdict": "pass"}},
    )


def test_log_cycle_is_idempotent_and_holds_what_the_ui_shows(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = log_cycle(uri, "sj", _cycle(0.5))
    second = log_cycle(uri, "sj", _cycle(0.7))
    assert first == second
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sj/chat")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # the cycle and one nested candidate run
    parent = client.get_run(first)
    assert parent.data.params["config_hash"] == "abc"
    assert parent.data.tags["shadowjudge.decision"] == "hold"
    assert "nan_is_dropped" not in parent.data.metrics
    child = next(r for r in runs if r.info.run_id != first)
    assert child.data.tags["mlflow.parentRunId"] == first
    assert child.data.tags[RUN_KEY_TAG] == "chat:20260101T0000Z"
    assert child.data.metrics["quality"] == 0.7  # the rerun's value is the latest
    artifacts = {a.path for a in client.list_artifacts(first)} | {a.path for a in client.list_artifacts(first, "plots")}
    assert {"samples.json", "analysis.json", "plots/scores.png", "plots/latency.png"} <= artifacts
    link = run_link(uri, "http://127.0.0.1:5000", "sj", "chat", first)
    assert link == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{first}"


def test_a_rerun_replaces_the_table_and_its_values_are_the_latest_even_when_lower(tmp_path):
    """log_table appended (a rerun doubled samples.json), metrics carried timestamp 0 (MLflow then showed the larger
    of two values as the latest), and params a rerun would change were silently kept."""
    import json

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_cycle(uri, "sj", _cycle(0.9))
    rerun = _cycle(0.4)
    rerun.params["config_hash"] = "def"
    assert log_cycle(uri, "sj", rerun) == run_id
    client = MlflowClient(uri)
    table = json.loads(open(client.download_artifacts(run_id, "samples.json", str(tmp_path))).read())
    assert table["columns"] == ["prompt", "candidate_score"] and len(table["data"]) == 2
    assert json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "samples.json", "type": "table"}]
    child = next(r for r in client.search_runs([client.get_run(run_id).info.experiment_id]) if r.info.run_id != run_id)
    assert child.data.metrics["quality"] == 0.4
    parent = client.get_run(run_id)
    assert parent.data.params["config_hash"] == "abc"  # MLflow keeps the first; the tag says what the rerun had
    assert json.loads(parent.data.tags["shadowjudge.params_changed_by_rerun"]) == {"config_hash": "def"}


def test_a_plain_rerun_adds_no_metric_point_and_a_changed_value_adds_one(tmp_path):
    """Every rerun added a point to every metric's history, so a cycle resumed twice showed three identical
    points per metric in the UI's charts."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_cycle(uri, "sj", _cycle(0.5))
    log_cycle(uri, "sj", _cycle(0.5))
    client = MlflowClient(uri)
    child = next(r for r in client.search_runs([client.get_run(run_id).info.experiment_id]) if r.info.run_id != run_id)
    assert [m.value for m in client.get_metric_history(run_id, "samples")] == [3.0]
    assert [m.value for m in client.get_metric_history(child.info.run_id, "quality")] == [0.5]
    log_cycle(uri, "sj", _cycle(0.25))
    assert [m.value for m in client.get_metric_history(child.info.run_id, "quality")] == [0.5, 0.25]
    assert [m.value for m in client.get_metric_history(child.info.run_id, "win_rate")] == [0.6]


def test_cycle_artifacts_sit_next_to_a_sqlite_store_and_a_failed_logging_leaves_no_run_running(tmp_path, monkeypatch):
    import pytest

    from shadowjudge.tracking import TrackingError
    from shadowjudge.tracking import mlflow_tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    run_id = log_cycle(uri, "sj", _cycle(0.5))
    client = MlflowClient(uri)
    location = client.get_experiment_by_name("sj/chat").artifact_location
    assert location == (tmp_path / "store" / "mlartifacts" / "sj/chat").as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert client.get_run(run_id).info.status == "FINISHED"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mlflow_tracking, "_log_table", broken)
    broken_cycle = _cycle(0.5)
    broken_cycle.run_key = "chat:20260102T0000Z"
    with pytest.raises(TrackingError, match="disk full"):
        log_cycle(uri, "sj", broken_cycle)
    statuses = {r.data.tags[RUN_KEY_TAG] + "/" + r.data.tags["shadowjudge.target"]: r.info.status
                for r in client.search_runs([client.get_experiment_by_name("sj/chat").experiment_id])}
    assert statuses["chat:20260102T0000Z/__cycle__"] == "FAILED"
    assert statuses["chat:20260102T0000Z/cand-a"] == "FINISHED"  # its own values were logged whole
