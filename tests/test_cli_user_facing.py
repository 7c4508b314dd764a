"""What a new user meets at the command line: hints that work when copied, exit statuses that match what happened,
each message once, read-only commands that create nothing, and a README that says what --help says."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evaluators.preference_data import MINI_DATA
from shadowjudge.routing.cli import routes_cli
from shadowjudge.store import ShadowRun, get_engine, session_scope, upgrade_database

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner(env={"COLUMNS": "400"})


def _config(tmp_path: Path, store: str | None = None, **extra: object) -> Path:
    """A one-route config whose store and gateway file live in tmp_path; the store is not created."""
    route = {"name": "chat",
             "incumbent": {"name": "inc", "model": "acct/m-inc", "base_url": "http://127.0.0.1:9/v1"},
             "candidates": [{"name": "cand", "model": "acct/m-cand", "base_url": "http://127.0.0.1:9/v1"}],
             "policy": extra.pop("policy", {"steps": [5, 25, 50, 100]}),
             "gateway": {"kind": "truefoundry", "path": str(tmp_path / "gateway" / "routing.yaml")}}
    doc = {"store": {"url": store or f"sqlite:///{tmp_path / 'state' / 'shadowjudge.db'}"},
           "judge": {"evaluator": "lexical"},
           "sources": [{"name": "logs", "kind": "jsonl", "path": str(tmp_path / "requests.jsonl")}],
           "routes": [route], **extra}
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    """A config whose SQLite store `shadowjudge init` has created."""
    path = _config(tmp_path)
    upgrade_database(yaml.safe_load(path.read_text())["store"]["url"])
    return path


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`shadowjudge ARGS` in this process, through main(): its exit status and stdout + stderr."""
    from shadowjudge import cli

    monkeypatch.setattr(sys, "argv", ["shadowjudge", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out = capsys.readouterr()
    return exited.value.code, " ".join((out.out + out.err).split())


def _verdicts(tmp_path: Path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


# -- 1. the missing-judge hint ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory) -> str:
    """An MLflow registry that holds no judge (created once: MLflow's migrations take seconds)."""
    from evaluators.judge_registry import find_alias

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    assert find_alias(uri, "nobody") is None
    return uri


def _hinted_command(message: str) -> list[str]:
    found = re.search(r"`(shadowjudge judge train [^`]*)`", message)
    assert found, message
    return shlex.split(found.group(1))


def test_the_missing_judge_hint_trains_that_judge_into_that_registry_from_any_directory(empty_registry):
    """The hint was a constant: a relative --data (fails outside the checkout), and the default registry and name,
    neither the ones the error was about."""
    from evaluators.judge_registry import JudgeNotFound, resolve

    with pytest.raises(JudgeNotFound) as missing:
        resolve(empty_registry, "models:/team-judge@champion")
    argv = _hinted_command(str(missing.value))
    options = dict(zip(argv, argv[1:]))  # each option with the word after it
    assert Path(options["--data"]).is_absolute() and Path(options["--data"]) == MINI_DATA and MINI_DATA.is_dir()
    assert options["--tracking-uri"] == empty_registry and options["--registered-name"] == "team-judge"
    assert "--quick" in argv and "(or set judge.model_uri)" in str(missing.value)


def test_judge_evaluate_offers_its_own_option_not_a_config_key(empty_registry):
    from evaluators.judge_cli import judge_cli

    result = runner.invoke(judge_cli, ["evaluate", "--data", str(MINI_DATA), "--tracking-uri", empty_registry,
                                       "--registered-name", "team-judge", "--no-progress"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "(or pass --model-uri)" in message and "judge.model_uri" not in message
    assert "--registered-name team-judge" in message


# -- 2, 3, 4, 8a. routes --------------------------------------------------------------------------------------------

def test_a_rollback_dry_run_whose_push_would_fail_exits_1_and_says_so_once(initialised, tmp_path):
    gateway = tmp_path / "gateway" / "routing.yaml"
    gateway.parent.mkdir()
    gateway.write_text("virtual_models: [unclosed\n")
    result = runner.invoke(routes_cli, ["rollback", "chat", "-c", str(initialised), "--dry-run"])
    assert result.exit_code == 1, result.output
    error = re.search(r"the push would fail: (.+)", result.output)
    assert error, result.output
    assert result.output.count(error.group(1).strip()[:40]) == 1, result.output
    assert gateway.read_text() == "virtual_models: [unclosed\n"


def test_stepping_a_run_again_says_its_verdicts_were_ignored(initialised, tmp_path):
    engine = get_engine(yaml.safe_load(initialised.read_text())["store"]["url"])
    with session_scope(engine) as s:
        run = ShadowRun(run_key="chat:1", route="chat", config_hash="test")
        s.add(run)
        s.flush()
        run_id = run.id
    passing = _verdicts(tmp_path, "pass.json", [{"target": "cand", "verdict": "pass", "score": 0.561, "n": 100}])
    failing = _verdicts(tmp_path, "fail.json", [{"target": "cand", "verdict": "fail", "score": 0.1, "n": 100}])
    first = runner.invoke(routes_cli, ["step", "chat", "-c", str(initialised), "--verdicts", passing,
                                       "--run-id", str(run_id)])
    assert first.exit_code == 0 and "already stepped" not in first.output, first.output
    again = runner.invoke(routes_cli, ["step", "chat", "-c", str(initialised), "--verdicts", failing,
                                       "--run-id", str(run_id)])
    said = " ".join(again.output.split())
    assert again.exit_code == 0, again.output
    assert f"run {run_id} was already stepped" in said and f"--verdicts {failing} was ignored" in said


def test_a_history_reason_names_the_preference_not_a_score(initialised, tmp_path):
    """The cycle prints a 0-100 analysis score; the reason's 0.561 is the judge's preference, a different number."""
    passing = _verdicts(tmp_path, "pass.json", [{"target": "cand", "verdict": "pass", "score": 0.561, "n": 100}])
    assert runner.invoke(routes_cli, ["step", "chat", "-c", str(initialised), "--verdicts", passing]).exit_code == 0
    history = runner.invoke(routes_cli, ["history", "chat", "-c", str(initialised), "--json"])
    reason = json.loads(history.output)[0]["reason"]
    assert "'cand' passed (preference=0.561, n=100)" in reason and "score=" not in reason


def test_approving_a_route_without_a_manual_gate_says_so_and_records_nothing(initialised):
    from shadowjudge.config import load_config
    from shadowjudge.routing.step import load_rollout_state

    result = runner.invoke(routes_cli, ["approve", "chat", "-c", str(initialised)])
    assert result.exit_code == 2, result.output
    assert "has no manual gate" in " ".join(result.output.split()) and "approved" not in result.output
    cfg = load_config(initialised)
    assert load_rollout_state(get_engine(cfg.store.url), cfg.route("chat")).approved_step is None


# -- 5, 6. config and store ---------------------------------------------------------------------------------------

def test_a_config_that_is_not_utf8_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"store: \xff\xfe\n")
    code, said = _main(monkeypatch, capsys, "status", "-c", str(path))
    assert code == 2 and f"{path}: cannot read config: not UTF-8" in said, said
    assert "UnicodeDecodeError" not in said


def test_a_store_url_of_an_unknown_scheme_exits_2_naming_it_and_the_supported_ones(tmp_path, monkeypatch, capsys):
    path = _config(tmp_path, store="foo://user:secret@bar/db")
    for command in ("status", "init"):
        code, said = _main(monkeypatch, capsys, command, "-c", str(path))
        assert code == 2, said
        assert "scheme 'foo' is not supported" in said and "postgresql+psycopg2" in said and "sqlite" in said
        assert "NoSuchModuleError" not in said and "secret" not in said


@pytest.mark.parametrize("command", [["status"], ["alerts", "list"], ["routes", "show"], ["routes", "history", "chat"],
                                     ["traffic", "quarantine"]])
def test_a_read_only_command_on_a_store_never_initialised_creates_nothing(tmp_path, monkeypatch, capsys, command):
    path = _config(tmp_path)
    code, said = _main(monkeypatch, capsys, *command, "-c", str(path))
    assert code == 1 and "no schema yet" in said and "shadowjudge init" in said, said
    assert not (tmp_path / "state").exists()


# -- 7. the README's CLI section and --help ------------------------------------------------------------------------

def _commands() -> dict[str, object]:
    """Every leaf command of the full CLI by its words ('routes step'), as click sees it."""
    import click
    import typer

    from shadowjudge.cli import app
    from shadowjudge.subcommands import register

    full = typer.Typer()
    full.registered_commands = list(app.registered_commands)
    register(full)
    out: dict[str, object] = {}

    def walk(command: click.Command, words: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, (*words, name))
        else:
            out[" ".join(words)] = command
    walk(typer.main.get_command(full), ())
    return out


def _readme_cli_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## CLI", 1)[1].split("\n## ", 1)[0]


def test_the_readme_lists_every_command_and_names_those_without_config_c():
    section = _readme_cli_section()
    block = section.split("```", 2)[1]
    listed: set[str] = set()
    for entry in (e.strip() for line in block.splitlines() for e in line.split("shadowjudge ")):
        if " | " in entry:  # init | run | status ...
            listed.update(name.strip() for name in entry.split("|"))
        elif entry:  # a group and its commands (routes history|show|...), or a lone command (loadtest)
            group, *names = entry.split()
            listed.update([f"{group} {name}" for name in names[0].split("|")] if names else [group])
    commands = _commands()
    assert listed == set(commands), f"README lists {sorted(listed)}, --help has {sorted(commands)}"
    without_c = sorted(name for name, cmd in commands.items()
                       if not any("-c" in p.opts for p in cmd.params))  # type: ignore[attr-defined]
    prose = " ".join(section.split())
    assert without_c and all(f"`{name}`" in prose for name in without_c), (without_c, prose)


# -- 8b. a missing traffic source -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_missing_traffic_source_is_reported_once(initialised, tmp_path):
    """As a user runs it (a subprocess): the log line ingest writes for flows used to repeat the `error:`."""
    env = {k: v for k, v in os.environ.items() if k != "SHADOWJUDGE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "400"
    done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "traffic", "ingest", "-c", str(initialised)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    missing = str(tmp_path / "requests.jsonl")
    assert done.stderr.count(f"{missing} does not exist") == 1, done.stderr
    assert "error: source 'logs'" in done.stderr
