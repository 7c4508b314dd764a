"""`shadowjudge alerts list|show|ack|resolve`: the on-call view of the alert store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shadowjudge.config import Config, load_config
from shadowjudge.errors import ShadowJudgeError
from shadowjudge.subcommands import MAX_DATABASE_ID, ConfigOption, fail, literal

alerts_cli = typer.Typer(help="List, inspect, acknowledge and resolve alerts.", no_args_is_help=True,
                         pretty_exceptions_enable=False, add_completion=False)


def _out() -> Console:
    """A console per command, so the terminal width (COLUMNS) is read when the command runs."""
    return Console()


def _err() -> Console:
    return Console(stderr=True)


AlertIdArgument = typer.Argument(..., min=1, max=MAX_DATABASE_ID, help="Alert id")


def _engine(config_path: Path):
    from shadowjudge.store import initialised_engine

    config: Config = load_config(config_path)
    return config, initialised_engine(config.store.url)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _check_names(names: list[str] | None) -> str:
    return escape(", ".join(names)) if names else "none"


_SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


@alerts_cli.command("list")
def list_command(config: Path = ConfigOption,
                 status: str = typer.Option("unresolved", help="open | acknowledged | resolved | unresolved | all"),
                 route: Optional[str] = typer.Option(None, help="Only this route"),
                 limit: int = typer.Option(50, min=1, max=1000)) -> None:
    """Alerts, newest first."""
    from shadowjudge.alerts.records import list_alerts

    try:
        _, engine = _engine(config)
        alerts = list_alerts(engine, status, route, limit)
    except ShadowJudgeError as exc:
        fail(exc)
    table = Table(title=f"Alerts ({status})")
    for col in ("id", "severity", "status", "kind", "route", "target", "metric", "slice", "effect", "seen", "updated"):
        table.add_column(col)
    for a in alerts:  # stored text shown as stored: a slice label like 'labels=[/internal]' is not Rich markup
        table.add_row(*literal(a.id), Text(a.severity, style=_SEVERITY_STYLE.get(a.severity, "")),
                      *literal(a.status, a.kind, a.route, a.target or "-", a.metric, a.slice or "-",
                               _fmt(a.effect_size), a.occurrences, a.updated_at.strftime("%Y-%m-%d %H:%M")))
    _out().print(table)


@alerts_cli.command("show")
def show_command(alert_id: int = AlertIdArgument, config: Path = ConfigOption,
                 as_json: bool = typer.Option(False, "--json", help="Print the alert as JSON")) -> None:
    """One alert with its triage bundle: link, worst examples, reproduce command, delivery status."""
    from shadowjudge.alerts.records import alert_to_dict, get_alert

    try:
        _, engine = _engine(config)
        alert = get_alert(engine, alert_id)
    except ShadowJudgeError as exc:
        fail(exc)
    data = alert_to_dict(alert)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    bundle = data["bundle"] or {}
    interval = f" [{_fmt(data['ci_low'])}, {_fmt(data['ci_high'])}]" if data["ci_low"] is not None else ""
    lines = [
        f"[bold]{escape(data['severity'].upper())}[/] {escape(data['kind'])} \u00b7 {escape(data['status'])} \u00b7 "
        f"seen {data['occurrences']}x",
        f"route {escape(data['route'])} \u00b7 target {escape(data['target'] or '-')} \u00b7 "
        f"metric {escape(data['metric'])} \u00b7 slice {escape(data['slice'] or 'all traffic')}",
        f"effect {_fmt(data['effect_size'])}{interval}",
        "", escape(data["message"]), "", f"action: {escape(data['action'] or '-')}",
        f"MLflow run: {escape(bundle.get('run_link') or '-')}", f"reproduce: {escape(bundle.get('reproduce') or '-')}",
    ]
    if bundle.get("reproduce_note"):  # what pasting the command still does (new traffic, live golden calls)
        lines.append(f"  [dim]{escape(bundle['reproduce_note'])}[/]")
    _out().print(Panel("\n".join(lines), title=f"alert {data['id']}", expand=False), highlight=False)
    for i, ex in enumerate(bundle.get("examples") or [], 1):
        if "prompt" in ex:
            checks = (f"[bold]checks failed[/]: candidate {_check_names(ex['candidate_failed_checks'])}, "
                      f"incumbent {_check_names(ex.get('incumbent_failed_checks'))}\n\n"
                      if "candidate_failed_checks" in ex else "")  # a `checks` regression's example
            body = (f"{checks}[bold]prompt[/]: {escape(ex.get('prompt') or '')}\n\n[bold]incumbent[/] (score "
                    f"{_fmt(ex.get('incumbent_score'))}): {escape(ex.get('incumbent_answer') or '-')}\n\n"
                    f"[bold]candidate[/] (score {_fmt(ex.get('candidate_score'))}): "
                    f"{escape(ex.get('candidate_answer') or ex.get('candidate_error') or '-')}")
        else:
            body = escape(ex["text"] if "text" in ex else json.dumps(ex, indent=1, default=str))
        _out().print(Panel(body, title=f"example {i}", expand=False), highlight=False, markup=True)
    if data["delivered"]:
        table = Table(title="Delivery")
        for col in ("sink", "event", "status", "attempts", "error", "at"):
            table.add_column(col)
        for sink, st in data["delivered"].items():
            table.add_row(*literal(sink, st.get("event", "-"), st.get("status", "-"), st.get("attempts", "-"),
                                   st.get("error") or "-", st.get("at") or "-"))
        _out().print(table)


@alerts_cli.command("ack")
def ack_command(alert_id: int = AlertIdArgument, config: Path = ConfigOption,
                note: Optional[str] = typer.Option(None, help="Who is on it, or why")) -> None:
    """Acknowledge: someone is on it; recurrences keep folding into it without notifying again."""
    from shadowjudge.alerts.records import acknowledge_alert

    try:
        _, engine = _engine(config)
        alert = acknowledge_alert(engine, alert_id, note)
    except ShadowJudgeError as exc:
        fail(exc)
    _out().print(f"alert {alert.id} acknowledged")


@alerts_cli.command("resolve")
def resolve_command(alert_id: int = AlertIdArgument, config: Path = ConfigOption,
                    note: Optional[str] = typer.Option(None, help="What fixed it")) -> None:
    """Resolve: close the alert and send resolve events (PagerDuty resolves its incident)."""
    from shadowjudge.alerts.records import resolve_alert
    from shadowjudge.alerts.sinks import build_sinks

    try:
        cfg, engine = _engine(config)
        alert = resolve_alert(engine, alert_id, build_sinks(cfg.alerts), note)
    except ShadowJudgeError as exc:
        fail(exc)
    failed = [name for name, st in (alert.delivered or {}).items()
              if st.get("event") == "resolve" and st.get("status") == "failed"]
    _out().print(f"alert {alert.id} resolved")
    if failed:
        _err().print(f"[yellow]resolve not delivered to {escape(', '.join(failed))}; it is retried on the next "
                     "cycle[/]")
