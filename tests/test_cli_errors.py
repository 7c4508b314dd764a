"""Bad input at the real command line: `python -m shadowjudge.cli ...` as a subprocess, as a user runs it.

Every case must end with a clear message on stderr and a non-zero status (2 for bad input), never a Python
traceback. The commands are started side by side once per module (each costs seconds of interpreter start-up on
this machine), and each case then checks its own result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text

from shadowjudge.demo import demo_config
from shadowjudge.store import upgrade_database

REPO = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("SHADOWJUDGE_TEST_PG_URL")
STORE_PASSWORD = "hunter2-store-password"


@dataclass(frozen=True)
class Case:
    args: list[str]
    exit_code: int
    says: str  # a phrase the message must contain (case-insensitive)


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _verdicts(path: Path, rows: list) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def _empty_pg_database() -> str:
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"sj_cli_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_URL.rsplit("/", 1)[0] + "/" + name


def _drop_pg_database(url: str) -> None:
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def _cases(tmp: Path) -> dict[str, Case]:
    base = demo_config(tmp, "http://127.0.0.1:9/v1")
    base["judge"] = {"evaluator": "lexical"}
    good = _write(tmp / "good.yaml", base)
    upgrade_database(f"sqlite:///{tmp / 'shadowjudge.db'}")
    empty = _write(tmp / "empty.yaml", {**base, "store": {"url": f"sqlite:///{tmp / 'empty' / 'store.db'}"}})
    invalid = {**base, "routes": [{**base["routes"][0], "candidates": [
        {**base["routes"][0]["candidates"][0], "rpm": "lots"}, base["routes"][0]["candidates"][1]]}]}
    (tmp / "broken.yaml").write_text("store: {url: sqlite:///x.db\nroutes: [\n")
    down = {**base, "store": {"url": f"postgresql+psycopg2://postgres:{STORE_PASSWORD}@127.0.0.1:1/nowhere"}}
    no_source = {**base, "sources": [{"name": "gateway-logs", "kind": "jsonl", "path": str(tmp / "no-such-log")}]}
    teacher = {**base, "judge": {"evaluator": "lexical", "teacher": base["routes"][0]["candidates"][0]}}
    a_file = tmp / "a-file"
    a_file.write_text("not a directory")
    cases = {
        "unknown option": Case(["--bogus"], 2, "no such option"),
        "unknown command": Case(["evaluate-everything"], 2, "no such command"),
        "option out of range": Case(["status", "-c", good, "--limit", "0"], 2, "--limit"),
        "missing config": Case(["status", "-c", str(tmp / "nope.yaml")], 2, "cannot read config"),
        "config not YAML": Case(["run", "-c", str(tmp / "broken.yaml")], 2, "not valid yaml"),
        "config field of the wrong type": Case(["status", "-c", _write(tmp / "invalid.yaml", invalid)], 2,
                                               "routes[0].candidates[0].rpm"),
        "config not a mapping": Case(["init", "-c", _write(tmp / "list.yaml", [1, 2])], 2, "must be a mapping"),
        "unknown route for run": Case(["run", "-c", good, "--route", "nope"], 2, "no route named 'nope'"),
        "unknown route for history": Case(["routes", "history", "nope", "-c", good], 2, "no route named 'nope'"),
        "unusable cycle id": Case(["run", "-c", good, "--cycle-id", "../../etc passwd"], 2, "cycle id"),
        "cycle id too long": Case(["run", "-c", good, "--cycle-id", "c" * 65], 2, "cycle id"),
        "alert id not a number": Case(["alerts", "ack", "abc", "-c", good], 2, "alert_id"),
        "alert id unknown": Case(["alerts", "ack", "424242", "-c", good], 2, "alert 424242 does not exist"),
        "alert id beyond any database id": Case(["alerts", "show", "9" * 20, "-c", good], 2, "alert_id"),
        "alert status unknown": Case(["alerts", "list", "--status", "sleeping", "-c", good], 2, "sleeping"),
        "verdicts file missing": Case(["routes", "step", "chat-default", "--verdicts", str(tmp / "v.json"),
                                       "-c", good], 2, "cannot read"),
        "step with a run id that does not exist": Case(
            ["routes", "step", "chat-default", "--verdicts", _verdicts(tmp / "ok.json", [{"target": "yi-34b",
             "verdict": "pass"}]), "--run-id", "999", "-c", good], 2, "--run-id 999: no shadow run"),
        "step with a list as a target name": Case(
            ["routes", "step", "chat-default", "--verdicts", _verdicts(tmp / "list.json", [{"target": ["yi-34b"],
             "verdict": "pass"}]), "-c", good], 2, "target must be a target name"),
        "backfill from year 1": Case(["traffic", "ingest", "-c", good, "--since", "0001-01-01T00:00:00+01:00"], 2,
                                     "--since '0001-01-01T00:00:00+01:00' is out of range"),
        "status without schema": Case(["status", "-c", empty], 1, "no schema"),
        "alerts without schema": Case(["alerts", "list", "-c", empty], 1, "no schema"),
        "history without schema": Case(["routes", "history", "chat-default", "-c", empty], 1, "no schema"),
        "quarantine without schema": Case(["traffic", "quarantine", "-c", empty], 1, "no schema"),
        "store unreachable": Case(["init", "-c", _write(tmp / "down.yaml", down)], 1, "store cannot be reached"),
        "traffic source missing": Case(["traffic", "ingest", "-c", _write(tmp / "nosource.yaml", no_source)], 1,
                                       "no-such-log"),
        "labelling without a teacher": Case(["judge", "label-traffic", "-c", good, "--out", str(tmp / "labels")], 2,
                                            "judge.teacher is not set"),
        "labelling an empty store": Case(["judge", "label-traffic", "-c", _write(tmp / "teacher.yaml", teacher),
                                          "--out", str(tmp / "labels"), "--no-progress"], 2,
                                         "no stored shadow answers"),
        "training on a second directory that is not there": Case(
            ["judge", "train", "--quick", "--data", str(REPO / "shadowjudge/demo_data/alpacaeval-mini"), "--data",
             str(tmp / "no-labels"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--no-progress"], 2,
            "no-labels: not a directory"),
        # checked before the corpus is embedded, the judge trained or the teacher paid
        "training with a cache directory that is a file": Case(
            ["judge", "train", "--quick", "--cache-dir", str(a_file), "--tracking-uri", f"sqlite:///{tmp / 'm.db'}",
             "--no-progress"], 2, "--cache-dir"),
        "training under a name models:/ cannot address": Case(
            ["judge", "train", "--quick", "--registered-name", "judge@v2", "--tracking-uri",
             f"sqlite:///{tmp / 'm.db'}", "--no-progress"], 2, "registered name 'judge@v2'"),
        "training with a negative seed": Case(["judge", "train", "--quick", "--seed", "-1"], 2, "--seed"),
        "labelling into a file": Case(["judge", "label-traffic", "-c", _write(tmp / "teacher2.yaml", teacher),
                                       "--out", str(a_file / "labels"), "--no-progress"], 2, "--out"),
    }
    if PG_URL:
        pg_empty = {**base, "store": {"url": _empty_pg_database()}}
        cases["status without schema (PostgreSQL)"] = Case(["status", "-c", _write(tmp / "pg.yaml", pg_empty)], 1,
                                                           "no schema")
    return cases


def _run(args: list[str]) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k != "SHADOWJUDGE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "200"
    proc = subprocess.run([sys.executable, "-m", "shadowjudge.cli", *args], cwd=REPO, env=env, capture_output=True,
                          check=False,
                          text=True, timeout=300)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[Case, Outcome]]:
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(tmp)
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = dict(zip(cases, pool.map(_run, [c.args for c in cases.values()])))
    finally:
        pg = next((c for n, c in cases.items() if "PostgreSQL" in n), None)
        if pg is not None:
            _drop_pg_database(yaml.safe_load(Path(pg.args[-1]).read_text())["store"]["url"])
    return {name: (cases[name], results[name]) for name in cases}


CASE_NAMES = [
    "unknown option", "unknown command", "option out of range", "missing config", "config not YAML",
    "config field of the wrong type", "config not a mapping", "unknown route for run", "unknown route for history",
    "unusable cycle id", "cycle id too long", "alert id not a number", "alert id unknown",
    "alert id beyond any database id", "alert status unknown",
    "verdicts file missing", "backfill from year 1", "step with a run id that does not exist",
    "step with a list as a target name",
    "status without schema", "alerts without schema", "history without schema",
    "quarantine without schema", "store unreachable", "traffic source missing", "labelling without a teacher",
    "labelling an empty store", "training on a second directory that is not there",
    "training with a cache directory that is a file", "training under a name models:/ cannot address",
    "training with a negative seed", "labelling into a file",
    pytest.param("status without schema (PostgreSQL)", marks=pytest.mark.pg),
]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gets_a_message_and_an_exit_status_never_a_traceback(outcomes, name):
    if name not in outcomes:
        pytest.skip("SHADOWJUDGE_TEST_PG_URL is not set")
    case, out = outcomes[name]
    assert out.returncode == case.exit_code, f"{case.args}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    message = " ".join(out.stderr.split()).lower()  # the console may wrap long lines
    assert case.says.lower() in message, out.stderr
    assert STORE_PASSWORD not in out.stderr + out.stdout
