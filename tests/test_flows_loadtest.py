"""The load-test flow against the real replay server: stored prompts, a short concurrency ramp, one MLflow run per
target; unknown targets and bad ramps fail before any request."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.loadtest import load_test
from flows.stages import ingest_and_sample
from shadowjudge.demo import DEMO_DATA, demo_config
from shadowjudge.errors import InputError
from shadowjudge.shadow.replay_server import ReplayServer

FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}


def test_load_test_flow_ramps_a_candidate_and_logs_each_step(tmp_path, sqlite_url, prefect_harness):
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        data = demo_config(tmp_path, server.base_url)
        data["store"]["url"] = sqlite_url
        config_path = tmp_path / "shadowjudge.yaml"
        config_path.write_text(yaml.safe_dump(data))
        with pytest.raises(InputError, match="no stored traffic yet"):
            load_test(str(config_path), "chat-default", ramp="1:1:0.3:2")
        ingest_and_sample(str(config_path))
        with pytest.raises(InputError, match=r"no target\(s\) \['gpt-9'\]"):
            load_test(str(config_path), "chat-default", targets=["gpt-9"])
        with pytest.raises(InputError, match="--ramp must be start:step:hold_s:max"):
            load_test(str(config_path), "chat-default", ramp="fast")
        result = load_test(str(config_path), "chat-default", targets=["llama-2-7b"], ramp="1:1:0.3:2",
                           max_requests=2000, max_prompts=50)
    summary = result["targets"]["llama-2-7b"]
    assert summary["steps"] == 2 and summary["peak_rps"] > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "shadowjudge/chat-default/loadtest"
    assert run.data.params["model"] == "llama-2-7b-chat-hf"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "achieved_rps")] == [0, 1]
