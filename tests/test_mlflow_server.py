"""A cycle logged to a real `mlflow server` on loopback: what its REST API returns is what the UI shows, and the run
page renders in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import yaml
from conftest import stop_process_group

from shadowjudge.config import load_config
from shadowjudge.demo import DEMO_DATA, demo_config
from shadowjudge.shadow.replay_server import ReplayServer

pytestmark = pytest.mark.slow
FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CANDIDATES = ("yi-34b", "llama-2-7b")


class MlflowServer(NamedTuple):
    url: str
    log: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        # Not waited for here: it starts while the Prefect harness does (`logged_cycle` waits).
        yield MlflowServer(f"http://127.0.0.1:{port}", root / "server.log")
    finally:
        stop_process_group(server)
        log.close()


@pytest.fixture(scope="module")
def logged_cycle(mlflow_server, tmp_path_factory, prefect_harness) -> dict:
    """One cycle on the replay server, logged to the MLflow server."""
    from flows.cycle import evaluation_cycle

    _wait_until_healthy(mlflow_server)
    workdir = tmp_path_factory.mktemp("cycle")
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as replay:
        data = demo_config(workdir, replay.base_url)
        data["judge"] = {"evaluator": "lexical"}
        data["shadow"]["max_samples"] = 40
        data["mlflow"] = {"tracking_uri": mlflow_server.url, "experiment_prefix": "shadowjudge"}
        config_path = workdir / "shadowjudge.yaml"
        config_path.write_text(yaml.safe_dump(data))
        result = evaluation_cycle(config_path=str(config_path), cycle_id="c1")
    return {"outcome": result["routes"]["chat-default"], "config": load_config(config_path)}


def _wait_until_healthy(server: MlflowServer) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start: {server.log.read_text()[-2000:]}")
        time.sleep(0.5)


def _api(url: str, endpoint: str, **params) -> dict:
    response = httpx.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def _as_dicts(run: dict) -> tuple[dict, dict, dict]:
    data = run["data"]
    return ({p["key"]: p["value"] for p in data.get("params", [])},
            {m["key"]: m["value"] for m in data.get("metrics", [])},
            {t["key"]: t["value"] for t in data.get("tags", [])})


def test_the_cycle_run_holds_what_the_ui_shows(mlflow_server, logged_cycle):
    url = mlflow_server.url
    outcome, config = logged_cycle["outcome"], logged_cycle["config"]
    experiment = _api(url, "experiments/get-by-name", experiment_name="shadowjudge/chat-default")["experiment"]
    run_id = outcome["mlflow_run_id"]
    assert outcome["mlflow_link"] == f"{url}/#/experiments/{experiment['experiment_id']}/runs/{run_id}"

    params, metrics, tags = _as_dicts(_api(url, "runs/get", run_id=run_id)["run"])
    assert params["config_hash"] == config.fingerprint()
    assert (params["judge_version"], params["sample_size"]) == ("lexical:1", "40")
    assert tags["shadowjudge.decision"] == outcome["decision"] and tags["shadowjudge.run_key"] == "chat-default:c1"
    for family in ("latency_ms", "ttft_ms"):
        p50, p95, p99 = (metrics[f"incumbent.{family}.{p}"] for p in ("p50", "p95", "p99"))
        assert p50 <= p95 <= p99
    assert metrics["incumbent.error_rate"] == 0.0
    for target in CANDIDATES:  # the cycle's run compares the candidates on one page
        low, rate, high = (metrics[f"{target}.win_rate{s}"] for s in (".ci_low", "", ".ci_high"))
        assert low <= rate <= high
        assert {f"{target}.canary_score", f"{target}.quality.effect", f"{target}.quality.effect_at_equal_length",
                f"{target}.cost_per_outcome.candidate_value", f"{target}.latency_ms.p95"} <= set(metrics)

    search = httpx.post(f"{url}/api/2.0/mlflow/runs/search", timeout=30, json={
        "experiment_ids": [experiment["experiment_id"]], "filter": f"tags.mlflow.parentRunId = '{run_id}'"})
    children = search.json()["runs"]
    assert sorted(_as_dicts(c)[2]["shadowjudge.target"] for c in children) == sorted(CANDIDATES)
    for child in children:
        params, metrics, tags = _as_dicts(child)
        assert tags["verdict"] in ("pass", "marginal", "fail") and params["model"]
        # latency_p95 has no interval here: a P95 is judged from 60 latencies per side, and this cycle replays 40
        for metric in ("quality", "cost_per_outcome", "error_rate", "ttft"):
            assert metrics[f"{metric}.ci_low"] <= metrics[f"{metric}.effect"] <= metrics[f"{metric}.ci_high"], metric
        assert metrics["win_rate.ci_low"] <= metrics["win_rate"] <= metrics["win_rate.ci_high"]
        assert {"latency_ms.p50", "latency_ms.p99", "ttft_ms.p95", "error_rate", "spend_usd"} <= set(metrics)

    listed = {f["path"] for f in _api(url, "artifacts/list", run_id=run_id)["files"]}
    plots = {f["path"] for f in _api(url, "artifacts/list", run_id=run_id, path="plots")["files"]}
    assert {"samples.json", "analysis.json", "shadow_report.json", "plots"} <= listed
    assert plots == {"plots/score_distributions.png", "plots/latency_cdf.png", "plots/weight_history.png"}
    get = lambda path: httpx.get(f"{url}/get-artifact", params={"path": path, "run_uuid": run_id}, timeout=30)  # noqa: E731
    table = get("samples.json").json()
    assert {"prompt", "incumbent_answer", "candidate_answer", "candidate_score", "preference", "incumbent_chars",
            "candidate_chars"} <= set(table["columns"])
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    answered = [r for r in rows if r["candidate_chars"] is not None]
    assert answered and all(r["candidate_chars"] >= len(r["candidate_answer"]) for r in answered)  # before truncation
    assert len(table["data"]) == 40 * 3  # one row per replayed answer: the incumbent's and both candidates'
    assert all(get(path).content.startswith(b"\x89PNG") for path in plots)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs it)")
def test_the_run_page_renders_in_a_browser(mlflow_server, logged_cycle, tmp_path):
    from PIL import Image

    link = logged_cycle["outcome"]["mlflow_link"]
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1400,1000"]
    dom = subprocess.run([*browser, "--dump-dom", link], capture_output=True, text=True, timeout=180,
                         check=False).stdout
    assert "chat-default:c1" in dom and "shadowjudge.decision" in dom  # the SPA fetched and rendered the run
    shot = tmp_path / "run.png"
    subprocess.run([*browser, f"--screenshot={shot}", link], capture_output=True, timeout=180, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1000)
    assert len(image.getcolors(maxcolors=1 << 20)) > 200  # text, icons and links, not a blank or error page
