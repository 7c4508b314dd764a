"""`shadowjudge routes ...`: see and steer route rollouts (history, show, step, approve, freeze, rollback).

Every command takes `--config` to find the store and the route's gateway. Errors print one line and exit with the
error's status (2 for bad input), never a traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shadowjudge.config import Config, RouteConfig, load_config
from shadowjudge.errors import InputError, ShadowJudgeError
from shadowjudge.routing.weights import format_weights
from shadowjudge.subcommands import MAX_DATABASE_ID, ConfigOption, fail, literal, print_error

routes_cli = typer.Typer(help="Route weights: history, state, manual gate, freeze and rollback.",
                         no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(width=160)

JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table")

F = TypeVar("F", bound=Callable[..., Any])


def _clean_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ShadowJudgeError as exc:
            fail(exc)
    return wrapper  # type: ignore[return-value]


def _open(config_path: Path, route_name: str) -> tuple[Config, RouteConfig, Any]:
    from shadowjudge.store import initialised_engine

    cfg = load_config(config_path)
    route = cfg.route(route_name)
    return cfg, route, initialised_engine(cfg.store.url)


def _print_outcome(outcome: Any, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps(outcome.to_dict(), default=str))
        return
    console.print(f"route [bold]{escape(outcome.route)}[/]: [bold]{escape(str(outcome.decision))}[/] "
                  f"({escape(str(outcome.status))}); {escape(str(outcome.diff))}", highlight=False)
    console.print(f"  {outcome.reason}", markup=False, highlight=False)  # reasons quote stored and gateway text
    if outcome.error and outcome.status != "dry_run":  # a dry run's reason already ends "the push would fail: ..."
        console.print(f"  [red]{escape(str(outcome.error))}[/]", highlight=False)
    if outcome.config_diff:
        console.print(outcome.config_diff, markup=False, highlight=False)


def _exit_status(outcome: Any) -> None:
    """Exit 1 for a push that failed, for a dry run whose push would fail (a script checking a push first must not
    read 0 as "safe to run"), and for a step that found the route locked and decided nothing, as `routes freeze`
    does: a script must not read 0 as "stepped". The busy reason names the lock held: the route's own, or that of
    its gateway's config, which every route pushing to that config shares."""
    if outcome.status == "busy":
        held = str(outcome.reason).removeprefix("busy: ")
        print_error(f"route '{outcome.route}' was not stepped: {held}; nothing was decided or applied; try again")
        raise typer.Exit(1)
    if outcome.status == "failed" or (outcome.status == "dry_run" and outcome.error):
        raise typer.Exit(1)


@routes_cli.command()
@_clean_errors
def show(route: Optional[str] = typer.Argument(None, help="Route name (default: every route)"),
         config: Path = ConfigOption, as_json: bool = JsonOption) -> None:
    """Current weights, phase, serving target and whether the config's incumbent is stale."""
    from shadowjudge.routing.step import route_status

    cfg = load_config(config)
    routes = [cfg.route(route)] if route else cfg.routes
    _, _, engine = _open(config, routes[0].name)
    states = [route_status(engine, r) for r in routes]
    if as_json:
        console.print_json(json.dumps(states, default=str))
        return
    table = Table(title="Routes")
    for col in ("route", "policy", "weights", "serving", "candidate", "phase", "step", "samples", "frozen", "gate",
                "revision"):
        table.add_column(col)
    for st in states:
        serving = Text(st["serving"])
        if st["config_stale"]:
            serving.append(" (config stale)", style="yellow")
        gate = ("approved " + str(st["approved_step"]) if st["approved_step"] is not None else "waiting") \
            if st["manual_gate"] else "-"
        table.add_row(*literal(st["route"], st["policy"], format_weights(st["weights"])), serving,
                      *literal(st["candidate"] or "-", st["phase"], st["step_index"], st["samples_in_step"],
                               "yes" if st["frozen"] else "no", gate, st["revision"]))
    console.print(table)
    for st in states:
        if st["failed"]:
            console.print(f"{st['route']}: failed candidates: " +
                          "; ".join(f"{n} ({m.get('reason', '')})" for n, m in st["failed"].items()),
                          markup=False, highlight=False)
        if st["last_reason"]:
            console.print(f"{st['route']}: last: {st['last_reason']}", markup=False, highlight=False)


@routes_cli.command()
@_clean_errors
def history(route: str = typer.Argument(..., help="Route name"), config: Path = ConfigOption,
            limit: int = typer.Option(50, min=1, max=10000), as_json: bool = JsonOption) -> None:
    """Every weight change pushed or attempted, newest first: before, after, why, status and analysis link.

    A reason's preference= (written score= before it was renamed) is the judge's mean preference for the
    candidate over the incumbent, in [0, 1] (0.5: as good), not the cycle's 0-100 analysis score."""
    from shadowjudge.routing.step import route_history

    _, rc, engine = _open(config, route)
    rows = route_history(engine, rc.name, limit=limit)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=f"Route '{rc.name}' weight history")
    for col in ("rev", "at", "decision", "status", "before", "after", "reason", "analysis"):
        table.add_column(col, overflow="fold")
    for r in rows:
        reason = Text(r["reason"])
        if r["error"]:
            reason.append(f" {r['error']}", style="red")
        table.add_row(*literal(r["revision"], r["at"][:19], r["decision"], r["status"], format_weights(r["before"]),
                               format_weights(r["after"])), reason, *literal(r["analysis_link"] or "-"))
    console.print(table)


@routes_cli.command()
@_clean_errors
def step(route: str = typer.Argument(..., help="Route name"),
         verdicts: Path = typer.Option(..., "--verdicts", help="JSON list of candidate verdicts "
                                       "({target, verdict, score, quality, cost_per_outcome, n, critical_alert, ...})"),
         config: Path = ConfigOption,
         dry_run: bool = typer.Option(False, "--dry-run", help="Decide and render, print the diff, write nothing"),
         run_id: Optional[int] = typer.Option(None, min=1, max=MAX_DATABASE_ID,
                                              help="Shadow run the verdicts come from (idempotency key)"),
         analysis_link: Optional[str] = typer.Option(None, help="Link recorded with the change"),
         as_json: bool = JsonOption) -> None:
    """Step the controller once with verdicts from a file (the cycle flow does this with its own analysis)."""
    from shadowjudge.gateways import get_gateway
    from shadowjudge.routing.step import step_route
    from shadowjudge.routing.verdicts import CandidateVerdict
    from shadowjudge.store import ShadowRun, session_scope

    _, rc, engine = _open(config, route)
    try:
        raw = json.loads(verdicts.read_text(encoding="utf-8-sig"))  # a BOM (some editors write one) is no error
    except OSError as exc:
        raise InputError(f"{verdicts}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{verdicts}: not UTF-8 text (byte {exc.start}): expected a JSON list of verdicts") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{verdicts}: not valid JSON: {exc}") from None
    if not isinstance(raw, list) or not all(isinstance(v, dict) for v in raw):
        raise InputError(f"{verdicts}: expected a JSON list of verdict objects")
    try:
        parsed = [CandidateVerdict(**v) for v in raw]
    except TypeError as exc:
        raise InputError(f"{verdicts}: {exc}") from None
    if run_id is not None:
        with session_scope(engine) as s:
            run = s.get(ShadowRun, run_id)
            if run is None or run.route != route:
                raise InputError(f"--run-id {run_id}: no shadow run of route '{route}' has that id")
    outcome = step_route(engine, rc, parsed, gateway=get_gateway(rc.gateway, rc), now=datetime.now(timezone.utc),
                         run_id=run_id, analysis_link=analysis_link, dry_run=dry_run)
    if outcome.replayed:  # on stderr: --json keeps stdout one object, which says "replayed": true
        Console(stderr=True).print(f"note: run {run_id} was already stepped: the outcome below is the one recorded "
                                   f"then, and --verdicts {verdicts} was ignored", markup=False, highlight=False)
    _print_outcome(outcome, as_json)
    _exit_status(outcome)


@routes_cli.command()
@_clean_errors
def approve(route: str = typer.Argument(..., help="Route name"), config: Path = ConfigOption) -> None:
    """Approve the next step of a route under a manual gate."""
    from shadowjudge.routing.step import approve_step

    _, rc, engine = _open(config, route)
    if not rc.policy.manual_gate:  # an approval would be recorded and never read: say so, write nothing
        raise InputError(f"route '{rc.name}' has no manual gate (policy.manual_gate is false): its steps need no "
                         "approval; nothing was recorded")
    state = approve_step(engine, rc)
    console.print(f"route [bold]{rc.name}[/]: step {state.approved_step} approved; it runs at the next cycle that "
                  "passes the other checks", highlight=False)


@routes_cli.command()
@_clean_errors
def freeze(route: str = typer.Argument(..., help="Route name"), config: Path = ConfigOption) -> None:
    """Stop every advance on a route (failing candidates are still rolled back)."""
    from shadowjudge.routing.step import set_frozen

    _, rc, engine = _open(config, route)
    state = set_frozen(engine, rc, True)
    console.print(f"route [bold]{rc.name}[/] frozen at {state.weights}", highlight=False)


@routes_cli.command()
@_clean_errors
def unfreeze(route: str = typer.Argument(..., help="Route name"), config: Path = ConfigOption) -> None:
    """Let the controller advance a frozen route again."""
    from shadowjudge.routing.step import set_frozen

    _, rc, engine = _open(config, route)
    set_frozen(engine, rc, False)
    suffix = " (the config's policy.frozen is still true)" if rc.policy.frozen else ""
    console.print(f"route [bold]{rc.name}[/] unfrozen{suffix}", highlight=False)


@routes_cli.command()
@_clean_errors
def rollback(route: str = typer.Argument(..., help="Route name"), config: Path = ConfigOption,
             to: Optional[str] = typer.Option(None, "--to", help="Target to send all traffic to (default: serving)"),
             reason: str = typer.Option("manual rollback", help="Recorded in the history"),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the diff, write nothing"),
             as_json: bool = JsonOption) -> None:
    """Send all traffic to one target now and mark the candidates it takes traffic from as failed."""
    from shadowjudge.gateways import get_gateway
    from shadowjudge.routing.step import manual_rollback

    _, rc, engine = _open(config, route)
    outcome = manual_rollback(engine, rc, gateway=get_gateway(rc.gateway, rc), now=datetime.now(timezone.utc), to=to,
                              reason=reason, dry_run=dry_run)
    _print_outcome(outcome, as_json)
    _exit_status(outcome)
