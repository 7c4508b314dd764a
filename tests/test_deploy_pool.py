"""`shadowjudge deploy --pool` on a real Prefect server: every deployment lands on the pool asked for (Prefect's
`deploy --all` ignores its own --pool), the copy of prefect.yaml that carries it is removed, and an option Prefect
says it ignores fails the deploy instead of passing unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flows.deployments
from flows.deployments import PrefectApiError
from shadowjudge.demo import demo_config

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"evaluation-cycle", "ingest-and-sample", "shadow-test", "score", "score-batch", "analyse", "update-routes",
         "load-test", "train-judge"}


def test_deploy_with_a_pool_on_a_shared_server_puts_every_one_on_it_and_lists_ours_only(tmp_path, prefect_server,
                                                                                        prefect_client):
    """On a shared server: more than a page (200) of other deployments listed before ours, and another flow's
    deployment named like one of ours."""
    other = prefect_client.create_flow_from_name("other-team")
    crowd = [prefect_client.create_deployment(flow_id=other, name=f"another-team-{i:03d}") for i in range(200)]
    crowd.append(prefect_client.create_deployment(flow_id=other, name="score"))
    config_path = tmp_path / "shadowjudge.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(tmp_path, "http://127.0.0.1:9/v1")))
    try:
        done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "deploy", "-c", str(config_path), "--pool",
                               "altpool"], cwd=ROOT, env={**prefect_server, "COLUMNS": "500"}, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        pools = {n: prefect_client.read_deployment_by_name(f"{n}/{n}").work_pool_name for n in NAMES}
        assert pools == dict.fromkeys(NAMES, "altpool")
    finally:
        for deployment_id in crowd:
            prefect_client.delete_deployment(deployment_id)
    assert prefect_client.read_work_pool("altpool").type == "process"
    listed = [line.split(": ")[0] for line in done.stdout.splitlines() if not line.startswith("start a worker")]
    assert sorted(listed) == sorted(f"{n}/{n} pool altpool" for n in NAMES)  # ours only, and every one
    assert [line for line in done.stdout.splitlines() if line.startswith("start a worker")] == [
        "start a worker: prefect worker start --pool altpool"]
    assert not list(ROOT.glob(".prefect-deploy-*"))  # the deployments file with the pool in it is gone


def test_an_option_prefect_deploy_ignores_fails_the_deploy(tmp_path, monkeypatch):
    warning = ("You have passed options to the deploy command, but you are creating or updating multiple\n"
               "deployments. These options will be\nignored.\n")
    monkeypatch.setattr(flows.deployments.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a[0], 0, stdout=warning, stderr=""))
    with pytest.raises(PrefectApiError, match="ignored options"):
        flows.deployments.prefect_deploy_all(tmp_path / "prefect.yaml", {})


def test_the_worker_hint_names_the_pools_the_deployments_are_on():
    deployed = [{"name": "a/a", "work_pool": "gpu pool"}, {"name": "b/b", "work_pool": "shadowjudge"},
                {"name": "c/c", "work_pool": "shadowjudge"}, {"name": "d/d", "work_pool": None}]
    assert flows.deployments.worker_commands(deployed) == ["prefect worker start --pool 'gpu pool'",
                                         "prefect worker start --pool shadowjudge"]
