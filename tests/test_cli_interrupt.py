"""Ctrl-C during `shadowjudge run`: 'interrupted', exit 130, and what was stored stays stored.

The terminal sends SIGINT to its whole foreground process group. It used to kill Prefect's temporary API server
too; the interrupted flow then spent over a minute retrying to report its crash to the dead server and ended with
'error: ConnectError: [Errno 111] Connection refused', exit 1. The test sends SIGINT to the group, as a terminal
does, while the shadow test waits on an endpoint that never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cycle_configs import save_config
from shadowjudge.demo import demo_config
from shadowjudge.store import ShadowRun, TrafficSample, get_engine, session_scope, upgrade_database

REPO = Path(__file__).resolve().parents[1]


def _count(store_url: str, model) -> int:
    with session_scope(get_engine(store_url)) as s:
        return s.scalar(select(func.count()).select_from(model))


@pytest.mark.slow
def test_ctrl_c_during_run_is_interrupted_with_exit_130(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(512)
        data = demo_config(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}/v1")
        data["judge"] = {"evaluator": "lexical"}
        data["drift"] = {"enabled": False}
        data["shadow"].update(timeout_s=600, max_retries=0, max_samples=20)
        store_url = data["store"]["url"]
        upgrade_database(store_url)
        config = save_config(tmp_path, data)
        env = {k: v for k, v in os.environ.items() if k not in ("SHADOWJUDGE_DEBUG", "PREFECT_API_URL")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        log = tmp_path / "run.log"
        with open(log, "wb") as out:
            run = subprocess.Popen([sys.executable, "-m", "shadowjudge.cli", "run", "-c", str(config)], cwd=REPO,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while _count(store_url, ShadowRun) == 0:  # the run is open: ingest is done, the shadow test starts
                assert run.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            time.sleep(3)
            os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            returncode = run.wait(timeout=300)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    output = log.read_text()
    assert returncode == 130, output
    assert "interrupted" in output and "Connection refused" not in output and "Traceback" not in output, output
    assert _count(store_url, TrafficSample) > 0 and _count(store_url, ShadowRun) == 1  # nothing stored is lost
