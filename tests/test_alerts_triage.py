"""The triage bundle: a reproduce command that reruns the alerting cycle, and a run link without credentials."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shadowjudge.alerts.findings import Finding
from shadowjudge.alerts.triage import build_bundle
from shadowjudge.cycle import cycle_run_key
from shadowjudge.store import ShadowRun, session_scope
from shadowjudge.tracking import mlflow_tracking
from test_analysis_alpaca_runs import route_for


def _finding(run_id: int | None) -> Finding:
    return Finding("regression", "critical", "chat", "c", "quality", None, 0.8, 0.7, 0.9, "m", None, run_id,
                   f"run:{run_id}")


def test_the_reproduce_command_reruns_the_alerting_cycle_not_a_new_one(engine):
    with session_scope(engine) as s:
        run = ShadowRun(run_key=cycle_run_key("chat", "20261101T0930Z"), route="chat", config_hash="t")
        s.add(run)
        s.flush()
        run_id = run.id
    bundle = build_bundle(engine, _finding(run_id), route_for(["c"]), None, "configs/prod.yaml", 5)
    assert bundle["reproduce"] == ("shadowjudge run --config configs/prod.yaml --route chat "
                                   "--cycle-id 20261101T0930Z")
    assert bundle["cycle_id"] == "20261101T0930Z" and bundle["run_key"] == "chat:20261101T0930Z"
    assert "golden cases" in bundle["reproduce_note"] and "ingests new traffic" in bundle["reproduce_note"]
    # a finding outside any cycle has nothing to rerun: no command that would start a new cycle
    bundle = build_bundle(engine, _finding(None), route_for(["c"]), None, "configs/prod.yaml", 5)
    assert bundle["reproduce"] is None and bundle["cycle_id"] is None


@pytest.mark.parametrize(("tracking_uri", "ui_url", "link"), [
    ("http://alice:s3cr3t@mlflow.local:5000", None, "http://mlflow.local:5000/#/experiments/3/runs/abc"),
    ("https://bob@mlflow.local/", None, "https://mlflow.local/#/experiments/3/runs/abc"),
    ("http://alice:s3cr3t@mlflow.local", "https://u:p@ui.local/ml", "https://ui.local/ml/#/experiments/3/runs/abc"),
    ("http://mlflow.local", None, "http://mlflow.local/#/experiments/3/runs/abc"),
    ("sqlite:///m.db", None, "mlflow-run://3/abc"),
])
def test_the_run_link_drops_credentials_and_stays_clickable(monkeypatch, tracking_uri, ui_url, link):
    experiment = SimpleNamespace(experiment_id="3")
    monkeypatch.setattr(mlflow_tracking, "_client",
                        lambda uri: SimpleNamespace(get_experiment_by_name=lambda name: experiment))
    assert mlflow_tracking.run_link(tracking_uri, ui_url, "shadowjudge", "chat", "abc") == link
