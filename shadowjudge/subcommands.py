"""Mounts each stage's command group on the main CLI."""

from __future__ import annotations

import typer


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
