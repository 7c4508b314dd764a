"""The commands the demo prints for looking at what it did must run as printed (one said `routes history --route`,
an option that command does not have)."""

from __future__ import annotations

import shlex

import pytest
import yaml

from shadowjudge import cli
from shadowjudge.config import load_config
from shadowjudge.demo import demo_config, inspect_commands
from shadowjudge.store import upgrade_database


def test_the_demos_inspect_commands_run_as_printed(tmp_path, monkeypatch, capsys):
    config_path = tmp_path / "shadowjudge.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(tmp_path, "http://127.0.0.1:9/v1")))
    upgrade_database(load_config(config_path).store.url)
    for label, command in inspect_commands(config_path).items():
        monkeypatch.setattr("sys.argv", ["shadowjudge", *shlex.split(command)])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        assert exited.value.code in (0, None), (label, command, capsys.readouterr())
