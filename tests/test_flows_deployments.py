"""prefect.yaml as the deploy and serve commands read it: every entry loads, every schedule parses, every scheduled
deployment carries the parameters its flow requires, and bad files or a missing server give clear errors."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from flows.deployments import (
    DeploymentFileError,
    read_deployments,
    served_deployments,
    template_environment,
    to_schedule,
)
from shadowjudge.config import load_config
from shadowjudge.demo import demo_config

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"evaluation-cycle", "ingest-and-sample", "shadow-test", "score", "score-batch", "analyse", "update-routes",
          "load-test", "train-judge"}


@pytest.fixture
def config_path(tmp_path) -> Path:
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(demo_config(tmp_path, "http://127.0.0.1:9/v1")))
    return path


def test_every_deployment_loads_and_scheduled_ones_carry_every_required_parameter(config_path, monkeypatch):
    config = load_config(config_path)
    specs = read_deployments(ROOT / "prefect.yaml", template_environment(config_path, config))
    assert {s.name for s in specs} == STAGES
    for spec in specs:
        file, function = spec.entrypoint.split(":")
        flow = load_flow_from_entrypoint(f"{ROOT / file}:{function}")
        assert flow.name == spec.name  # `prefect deployment run NAME/NAME` works for every one
        params = inspect.signature(flow.fn).parameters
        assert set(spec.parameters) <= set(params), spec.name
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        if spec.schedules:  # nobody fills in a scheduled run's parameters
            assert required <= set(spec.parameters), spec.name
        assert all(to_schedule(s).timezone == "UTC" for s in spec.schedules)
        assert spec.work_pool == "shadowjudge"
    by_name = {s.name: s for s in specs}
    assert by_name["evaluation-cycle"].parameters == {"config_path": str(config_path.resolve())}
    assert [s["cron"] for s in by_name["evaluation-cycle"].schedules] == ["*/30 * * * *"]
    assert by_name["load-test"].schedules[0]["active"] is False  # it loads providers: off until enabled
    assert by_name["train-judge"].parameters["tracking_uri"] == config.mlflow.tracking_uri
    assert Path(by_name["train-judge"].parameters["data_dir"]).is_dir()

    monkeypatch.chdir(ROOT)
    served = {d.name: d for d in served_deployments(specs, ROOT)}
    cycle = served["evaluation-cycle"]
    assert cycle.entrypoint == "flows/cycle.py:evaluation_cycle" and cycle.concurrency_limit == 1
    assert cycle.schedules[0].schedule.cron == "*/30 * * * *"
    assert cycle.parameters == by_name["evaluation-cycle"].parameters


@pytest.mark.parametrize("entry, problem", [
    ({"name": "x"}, "deployments\\[0\\]: needs `name` and `entrypoint`"),
    ({"name": "x", "entrypoint": "flows/cycle.py"}, "deployment 'x': entrypoint must be FILE.py:FUNCTION"),
    ({"name": "x", "entrypoint": "f.py:g", "schedules": [{"cron": "* * * * *", "interval": 60}]},
     "deployment 'x': each schedule needs exactly one of cron, interval, rrule"),
    ({"name": "x", "entrypoint": "f.py:g", "schedules": [{"cron": "* * * * *", "every": 3}]},
     "deployment 'x': unknown schedule key\\(s\\) \\['every'\\]"),
    ({"name": "x", "entrypoint": "f.py:g", "parameters": {"config_path": "{{ $SHADOWJUDGE_TEST_UNSET }}"}},
     "deployment 'x': parameter\\(s\\) \\['config_path'\\] are empty"),
])
def test_a_bad_deployments_file_names_the_file_the_entry_and_the_problem(tmp_path, entry, problem):
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"deployments": [entry]}))
    with pytest.raises(DeploymentFileError, match=f"{path}: {problem}"):
        read_deployments(path, {})


def test_an_unreadable_deployments_file_is_a_clear_error(tmp_path):
    with pytest.raises(DeploymentFileError, match="cannot read"):
        read_deployments(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("deployments: [")
    with pytest.raises(DeploymentFileError, match="not valid YAML"):
        read_deployments(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("name: x\n")
    with pytest.raises(DeploymentFileError, match="no `deployments` list"):
        read_deployments(tmp_path / "empty.yaml")


def test_deploy_without_a_prefect_server_says_how_to_start_one(config_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "deploy", "-c", str(config_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "PREFECT_API_URL is not set" in done.stderr and "prefect server start" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_load_test_is_deployed_on_the_configs_first_route(tmp_path):
    data = demo_config(tmp_path, "http://127.0.0.1:9/v1")
    data["routes"] = [{**data["routes"][0], "name": name} for name in ("support", "search")]
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(data))
    specs = {s.name: s for s in read_deployments(ROOT / "prefect.yaml", template_environment(path, load_config(path)))}
    assert specs["load-test"].parameters["route"] == "support"


@pytest.mark.parametrize("command", ["deploy", "serve"])
def test_a_route_parameter_naming_no_route_of_the_config_fails_before_the_server_is_asked(config_path, tmp_path,
                                                                                          command):
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({"deployments": [{
        "name": "load-test", "entrypoint": "flows/loadtest.py:load_test",
        "parameters": {"config_path": "{{ $SHADOWJUDGE_CONFIG }}", "route": "nowhere"}}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), COLUMNS="500")  # no server; no wrapping of the message
    done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", command, "-c", str(config_path), "--prefect-file",
                           str(prefect_file)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {prefect_file}: deployment 'load-test': parameter route 'nowhere' names no route of the config "
        "(known: ['chat-default'])"]
