"""`shadowjudge run` with ordinary bad input: one line, exit 2, before Prefect, ingest or a paid call.

A missing judge used to fail inside the flow with Prefect's traceback; a target's key env var that is not set
failed the shadow test after ingest, which Prefect retried twice, 10 s apart, and exited 1 with two tracebacks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from cycle_configs import save_config
from shadowjudge.demo import demo_config
from shadowjudge.store import ShadowRun, TrafficSample, get_engine, session_scope, upgrade_database

REPO = Path(__file__).resolve().parents[1]
UNSET_KEY = "SHADOWJUDGE_TEST_KEY_THAT_IS_NOT_SET"


def _config(tmp_path: Path, *, evaluator: str = "lexical", key_env: str | None = None) -> tuple[Path, str]:
    data = demo_config(tmp_path, "http://127.0.0.1:9/v1")
    data["judge"] = {"evaluator": evaluator, "registered_name": "no-such-judge"}
    data["drift"] = {"enabled": False}
    if key_env:
        data["routes"][0]["candidates"][0]["api_key_env"] = key_env
    upgrade_database(data["store"]["url"])
    return save_config(tmp_path, data), data["store"]["url"]


def _run(config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SHADOWJUDGE_DEBUG", UNSET_KEY)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "400"
    return subprocess.run([sys.executable, "-m", "shadowjudge.cli", "run", "-c", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _stored_samples(store_url: str) -> int:
    with session_scope(get_engine(store_url)) as s:
        return s.scalar(select(func.count()).select_from(TrafficSample))


def _assert_one_line(done: subprocess.CompletedProcess, says: str) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out and "Beginning flow run" not in out, out
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], out


@pytest.mark.slow
def test_run_without_a_trained_judge(tmp_path):
    config, store_url = _config(tmp_path, evaluator="small-judge")
    _assert_one_line(_run(config), "no judge registered as 'no-such-judge'")
    assert _stored_samples(store_url) == 0


@pytest.mark.slow
def test_run_with_a_golden_set_it_cannot_read(tmp_path):
    """It was read only after Prefect had started, traffic was ingested and the cycle's run opened (~17 s), then
    the route failed with Prefect's tracebacks and the run was left open."""
    data = yaml.safe_load(_config(tmp_path)[0].read_text())
    data["routes"][0]["golden_set"] = str(tmp_path / "no-such-golden.yaml")
    config = save_config(tmp_path, data)
    _assert_one_line(_run(config), "no-such-golden.yaml: cannot read golden set")
    assert _stored_samples(data["store"]["url"]) == 0  # failed before ingest


@pytest.mark.slow
def test_run_with_a_key_env_var_not_set(tmp_path):
    config, store_url = _config(tmp_path, key_env=UNSET_KEY)
    _assert_one_line(_run(config), f"env var {UNSET_KEY} is not set")
    assert _stored_samples(store_url) == 0  # failed before ingest


@pytest.mark.slow
def test_the_flow_fails_a_route_with_a_missing_key_as_bad_input_before_its_run(tmp_path, monkeypatch,
                                                                              prefect_harness):
    """A scheduled cycle (no CLI in front of it) checks each route's keys before opening its run: the shadow test
    is neither run nor retried, and the cycle fails as bad input (exit 2), not as a fault (exit 1)."""
    from flows.cycle import RoutesFailed, evaluation_cycle

    monkeypatch.delenv(UNSET_KEY, raising=False)
    config, store_url = _config(tmp_path, key_env=UNSET_KEY)
    with pytest.raises(RoutesFailed, match=f"env var {UNSET_KEY} is not set") as exc:
        evaluation_cycle(config_path=str(config))
    assert exc.value.exit_code == 2
    with session_scope(get_engine(store_url)) as s:
        assert s.scalar(select(func.count()).select_from(ShadowRun)) == 0


@pytest.mark.slow
def test_a_route_another_cycle_holds_fails_the_run_with_its_message_and_no_traceback(tmp_path):
    """Prefect logged the expected refusal with fourteen lines of engine frames, twice, above the one-line error."""
    from datetime import datetime, timedelta, timezone

    from shadowjudge.store import Lock

    config, store_url = _config(tmp_path)
    with session_scope(get_engine(store_url)) as s:
        s.add(Lock(name="cycle:chat-default", holder="elsewhere:1:beef:cycle other",
                   expires_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    done = _run(config)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is being evaluated by elsewhere:1:beef:cycle other" in errors[0], out
