"""The whole loop, for real: JSONL log -> sample -> replay server -> evaluator -> MLflow -> analysis -> gateway file.

Runs the Prefect flow on SQLite and PostgreSQL against the real replay server and a real local MLflow store, and
checks that rerunning a cycle adds no row anywhere.
"""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sqlalchemy import select

from shadowjudge.cycle import count_rows
from shadowjudge.demo import DEMO_DATA
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Judgment, RouteWeightChange, ShadowRun, TrafficSample, get_engine, session_scope
from cycle_configs import write_cycle_config

FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}


@pytest.fixture(scope="module")
def replay_server():
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        yield server


def test_cycle_end_to_end_and_rerun_adds_nothing(tmp_path, store_url, replay_server, prefect_harness):
    from flows.cycle import evaluation_cycle

    config_path = write_cycle_config(tmp_path, store_url, replay_server.base_url)
    result = evaluation_cycle(config_path=config_path, cycle_id="c1")
    outcome = result["routes"]["chat-default"]
    engine = get_engine(store_url)
    rows = count_rows(engine)
    assert rows["traffic_samples"] == 300 and rows["quarantined_records"] == 0
    assert rows["shadow_runs"] == 1
    assert rows["shadow_results"] == 40 * 3  # incumbent and both candidates replayed
    assert rows["judgments"] == 40 * 2
    assert rows["route_weight_history"] >= 1
    assert sum(outcome["weights_after"].values()) == 100
    # Each verdict line says how the candidate's quality compares, and how it would at equal answer length.
    assert len(outcome["verdicts"]) == 2
    assert all("; quality " in v and "the incumbent's length; at equal length" in v for v in outcome["verdicts"])

    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun))
        assert run.status == "finished" and run.decision == outcome["decision"] and run.mlflow_run_id
        stored = " ".join(json.dumps(m) for m in s.scalars(select(TrafficSample.messages)))
        metas = " ".join(json.dumps(m) for m in s.scalars(select(TrafficSample.meta)))
        assert "@example.com" not in stored and "@example.org" not in metas  # seeded PII never stored
        assert "[EMAIL]" in stored
        assert s.scalar(select(Judgment.evaluator).limit(1)) == "lexical:1"
        change = s.scalars(select(RouteWeightChange).order_by(RouteWeightChange.id)).all()[-1]
        assert change.run_id == run.id

    gateway = yaml.safe_load((tmp_path / "gateway" / "truefoundry-virtual-models.yaml").read_text())
    weights = {t["target"]: t["weight"] for t in gateway["rules"][0]["load_balance_targets"]}
    assert weights == {"claude-instant-1.2": outcome["weights_after"]["claude-instant"],
                       "Yi-34B-Chat": outcome["weights_after"]["yi-34b"],
                       "llama-2-7b-chat-hf": outcome["weights_after"]["llama-2-7b"]}

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_run = client.get_run(run.mlflow_run_id)
    assert mlflow_run.data.tags["shadowjudge.decision"] == outcome["decision"]
    assert mlflow_run.data.params["sample_size"] == "40"
    assert {a.path for a in client.list_artifacts(run.mlflow_run_id)} >= {"samples.json", "analysis.json", "plots"}

    again = evaluation_cycle(config_path=config_path, cycle_id="c1")
    assert count_rows(engine) == rows
    assert again["routes"]["chat-default"]["weights_after"] == outcome["weights_after"]
    exp = client.get_experiment_by_name("shadowjudge/chat-default")
    assert len(client.search_runs([exp.experiment_id])) == 3  # one cycle run + one nested run per candidate
    # the rerun's own ingest found nothing new: the cycle's run still says what the cycle's ingest stored
    assert [m.value for m in client.get_metric_history(run.mlflow_run_id, "ingest.stored")] == [300]

    evaluation_cycle(config_path=config_path, cycle_id="c2")
    with session_scope(engine) as s:
        runs = s.scalars(select(ShadowRun).order_by(ShadowRun.id)).all()
        assert [r.run_key for r in runs] == ["chat-default:c1", "chat-default:c2"]
        assert not set(runs[0].sample_ids) & set(runs[1].sample_ids)  # the next cycle takes the next samples
        first = (runs[0].decision, runs[0].summary["weights_before"], runs[0].summary["weights_after"])

    # A rerun of c1 after c2 stepped the route: the controller replays no step for it (its verdicts are older than
    # those applied last), and what c1 decided when it closed stays its record, in the store and in MLflow.
    older = evaluation_cycle(config_path=config_path, cycle_id="c1")["routes"]["chat-default"]
    assert (older["decision"], older["weights_before"], older["weights_after"]) == first
    with session_scope(engine) as s:
        rerun = s.scalar(select(ShadowRun).where(ShadowRun.run_key == "chat-default:c1"))
        assert (rerun.decision, rerun.summary["weights_before"], rerun.summary["weights_after"]) == first
    assert client.get_run(run.mlflow_run_id).data.tags["shadowjudge.decision"] == first[0]


def test_a_routes_checks_fail_the_candidate_that_breaks_them_through_the_real_cycle(tmp_path, store_url,
                                                                                    replay_server, prefect_harness):
    """The route's house style: answers start with the substance, not a greeting. llama-2-7b opens with one on
    about 40% of the demo's prompts (the incumbent and Yi on about 1%): its canary fails on `checks`, the verdict
    line and the alert name the check, and MLflow has the metric; Yi's answers are no worse and pass it."""
    from cycle_configs import cycle_config, save_config
    from flows.cycle import evaluation_cycle
    from shadowjudge.store import Alert

    data = cycle_config(tmp_path, store_url, replay_server.base_url)
    data["routes"][0]["checks"] = [{"kind": "regex", "pattern": r"^\W*(?:Hello|Hi|Sure|Thank)", "must_match": False,
                                    "name": "no_greeting"}]
    result = evaluation_cycle(config_path=str(save_config(tmp_path, data)), cycle_id="c1")
    outcome = result["routes"]["chat-default"]
    lines = {line.split(":", 1)[0]: line for line in outcome["verdicts"]}
    assert lines["llama-2-7b"].startswith("llama-2-7b: fail") and "; checks fail: no_greeting " in lines["llama-2-7b"]
    assert "checks" not in lines["yi-34b"]

    engine = get_engine(store_url)
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun))
        alerts = s.scalars(select(Alert).where(Alert.metric == "checks")).all()
        assert [(a.target, a.slice) for a in alerts] == [("llama-2-7b", None)]
        assert "no_greeting 0% -> " in alerts[0].message
        mlflow_run_id = run.mlflow_run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shadowjudge/chat-default")
    nested = {r.data.params.get("model"): r.data for r in client.search_runs([exp.experiment_id])
              if r.info.run_id != mlflow_run_id}
    llama = nested["llama-2-7b-chat-hf"]
    assert llama.tags["verdict"] == "fail" and "no_greeting 0% -> " in llama.tags["reasons"]
    assert llama.metrics["checks.candidate_value"] > 0.25 and llama.metrics["checks.ci_low"] > 0
    assert nested["Yi-34B-Chat"].metrics["checks.effect"] < 0.1
