"""Mounts each stage's command group on the main CLI, and what every group shares: the config option, the database
id bound and the one way an error is printed."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

DEFAULT_CONFIG = Path("configs/shadowjudge.yaml")
ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Config YAML", envvar="SHADOWJUDGE_CONFIG")
MAX_DATABASE_ID = 2 ** 63 - 1  # a BIGINT: a larger id cannot be in the store, and the driver overflows on it


def print_error(message: str) -> None:
    """'error: ...' on stderr, the message verbatim: it may quote input or stored text ('[/INST]') that Rich would
    otherwise read as markup, and fail on."""
    Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)


def fail(exc: BaseException) -> NoReturn:
    """Print the error and exit with its status: 2 for bad input (InputError), 1 for the rest."""
    print_error(str(exc))
    raise typer.Exit(getattr(exc, "exit_code", 1))


def literal(*values: object) -> list[Text]:
    """Table cells shown exactly as stored (names, slice labels, messages), never read as Rich markup."""
    return [Text(str(value)) for value in values]


def register(app: typer.Typer) -> None:
    from evaluators.judge_cli import judge_cli
    from shadowjudge.alerts.cli import alerts_cli
    from shadowjudge.routing.cli import routes_cli
    from shadowjudge.shadow.loadtest import loadtest_cli
    from shadowjudge.shadow.replay_server import replay_server_cli
    from shadowjudge.traffic.cli import traffic_cli

    app.add_typer(traffic_cli, name="traffic")
    app.add_typer(judge_cli, name="judge")
    app.add_typer(alerts_cli, name="alerts")
    app.add_typer(routes_cli, name="routes")
    app.add_typer(replay_server_cli, name="replay-server")
    app.add_typer(loadtest_cli, name="loadtest")
