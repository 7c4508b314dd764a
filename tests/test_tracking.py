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
