"""`shadowjudge` command line: init, demo, run, status, serve, and one sub-command group per stage."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from shadowjudge.environment import apply_defaults

apply_defaults()

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from shadowjudge.store import ShadowRun

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from shadowjudge.config import Config, RouteConfig, load_config  # noqa: E402
from shadowjudge.errors import ShadowJudgeError  # noqa: E402
from shadowjudge.subcommands import ConfigOption, literal, print_error  # noqa: E402

app = typer.Typer(help="ShadowJudge: continuous evaluation of LLM traffic.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)


def _load(config_path: Path) -> Config:
    return load_config(config_path)


@app.command()
def init(config: Path = ConfigOption) -> None:
    """Create the store or upgrade it to the latest schema."""
    from shadowjudge.store import upgrade_database
    from shadowjudge.tracking.mlflow_tracking import redact_uri

    cfg = _load(config)
    revision = upgrade_database(cfg.store.url)
    console.print(f"store at {escape(redact_uri(cfg.store.url))} is at revision [bold]{escape(revision)}[/]")


@app.command()
def run(config: Path = ConfigOption,
        route: Optional[str] = typer.Option(None, help="Only this route"),
        cycle_id: Optional[str] = typer.Option(None, help="Rerun/resume this cycle (default: the current minute, "
                                               "or the route's newest run if it failed or was interrupted: "
                                               "orchestration.resume_failed_runs)"),
        ) -> None:
    """Run one evaluation cycle (ingest, shadow-test, score, analyse, log, alert, update routes)."""
    from shadowjudge.cycle import check_cycle_id

    cfg = _load(config)
    routes = [cfg.route(route)] if route else cfg.routes
    if cycle_id is not None:
        check_cycle_id(cycle_id)
    _check_cycle_inputs(cfg, routes)
    from flows.cycle import evaluation_cycle
    from shadowjudge.environment import quiet_expected_failures

    quiet_expected_failures()

    result = evaluation_cycle(config_path=str(config), route=route, cycle_id=cycle_id, progress=sys.stderr.isatty())
    _print_cycle(result)


def _check_cycle_inputs(cfg: Config, routes: list[RouteConfig]) -> None:
    """What the flow would meet only after starting Prefect and ingesting (MLflow down, a missing judge, a golden
    set that cannot be read), or inside a retried shadow test (a missing key), found in seconds with a one-line
    message, cheapest first. It also starts Prefect's server apart from Ctrl-C; keys held in Prefect Secret blocks
    need it, so they are checked last."""
    from evaluators.factory import check_evaluator
    from shadowjudge.analysis.golden import load_golden_set
    from shadowjudge.config import check_api_keys
    from shadowjudge.environment import start_prefect_server_apart
    from shadowjudge.tracking.reachability import check_config_tracking

    targets = cfg.endpoints(routes)
    check_api_keys(t for t in targets if not t.api_key_secret)
    for route in routes:
        if route.golden_set:
            load_golden_set(route.golden_set)  # GoldenSetError: bad input (exit 2), before a run is opened
    check_config_tracking(cfg)
    check_evaluator(cfg.judge, cfg.mlflow.tracking_uri)  # no such judge: JudgeNotFound, bad input (exit 2)
    start_prefect_server_apart()
    check_api_keys(t for t in targets if t.api_key_secret)


def _print_cycle(result: dict) -> None:
    console.print(f"cycle [bold]{escape(str(result['cycle_id']))}[/]: "
                  f"ingest {escape(str(result['ingest'].get('totals')))}")
    for name, outcome in result["routes"].items():
        console.print(f"route [bold]{escape(name)}[/]: decision [bold]{escape(str(outcome.get('decision')))}[/], "
                      f"weights {escape(str(outcome.get('weights_before')))} -> "
                      f"{escape(str(outcome.get('weights_after')))}")
        if outcome.get("note"):  # it resumed the route's failed or interrupted run instead of a new one, or gave it up
            console.print(f"  {outcome['note']}", markup=False)
        if outcome.get("step_status") == "failed":  # the weights above were decided, not pushed
            console.print(f"  route step failed: {outcome.get('reason')}", markup=False)
        if outcome.get("calibration_failed"):
            console.print(f"  calibration failed, the cycle went on without it: {outcome['calibration_failed']}",
                          markup=False)
        if outcome.get("mlflow_link"):
            console.print(f"  MLflow run: {outcome['mlflow_link']}", markup=False)
        for verdict in outcome.get("verdicts", []):
            console.print(f"  {verdict}", markup=False)


@app.command()
def status(config: Path = ConfigOption, limit: int = typer.Option(10, min=1, max=500)) -> None:
    """Latest runs, current route weights and open alerts."""
    from sqlalchemy import select

    from shadowjudge.cycle import unfinished_states
    from shadowjudge.store import Alert, RouteState, ShadowRun, initialised_engine, session_scope

    cfg = _load(config)
    engine = initialised_engine(cfg.store.url)
    with session_scope(engine) as s:
        runs = s.scalars(select(ShadowRun).order_by(ShadowRun.id.desc()).limit(limit)).all()
        states = s.scalars(select(RouteState).order_by(RouteState.route)).all()
        alerts = s.scalars(select(Alert).where(Alert.status != "resolved").order_by(Alert.id.desc()).limit(limit)).all()
        left_as = unfinished_states(engine, runs)
        t = Table(title="Latest runs")
        for col in ("id", "run", "status", "samples", "decision", "judge", "started"):
            t.add_column(col)
        for r in runs:  # stored text shown as stored: a '[/...]' in it is not Rich markup
            shown_status = "interrupted" if left_as[r.id] == "interrupted" else r.status  # still `running` in the store
            t.add_row(*literal(r.id, r.run_key, shown_status, len(r.sample_ids), r.decision or "-",
                               r.judge_version or "-", r.started_at.strftime("%Y-%m-%d %H:%M:%S")))
        console.print(t)
        newest_of_route: dict[str, int] = {}
        for r in runs:  # newest first; every run newer than one shown is shown
            if r.kind == "cycle":
                newest_of_route.setdefault(r.route, r.id)
        for r in runs:
            if left_as[r.id] is not None:
                resumable = newest_of_route.get(r.route) == r.id
                console.print(unfinished_run_hint(r, config, left_as[r.id],
                                                  cfg.orchestration.resume_failed_runs if resumable else 0),
                              markup=False, soft_wrap=True)
        t = Table(title="Route weights")
        for col in ("route", "weights", "candidate", "phase", "step", "frozen", "revision"):
            t.add_column(col)
        for st in states:
            t.add_row(*literal(st.route, ", ".join(f"{k}={v}" for k, v in st.weights.items()), st.candidate or "-",
                               st.phase, st.step_index, "yes" if st.frozen else "no", st.revision))
        console.print(t)
        t = Table(title="Open alerts")
        for col in ("id", "severity", "status", "route", "metric", "slice", "message"):
            t.add_column(col)
        for a in alerts:
            t.add_row(*literal(a.id, a.severity, a.status, a.route, a.metric, a.slice or "-", a.message[:80]))
        console.print(t)
    counts = status_row_counts(engine)
    console.print("rows: " + ", ".join(f"{k}={v}" for k, v in counts.items())
                  + (" (~: an estimate)" if any(str(v).startswith("~") for v in counts.values()) else ""))


def unfinished_run_hint(run: ShadowRun, config: Path, left_as: str, resume_limit: int = 0) -> str:
    """What a failed or interrupted run (`left_as`, see cycle.unfinished_state) left and how to finish it: no later
    run takes its samples (each run takes only samples newer than the route's newest run), so they stay unevaluated
    until its cycle id is rerun, by hand or, while it is the route's newest run and has automatic resumes left
    (`resume_limit`, 0 where none apply), by the next cycle started without a cycle id."""
    from shadowjudge.cycle import cycle_id_of

    summary = run.summary or {}
    rerun = f"shadowjudge run -c {shlex.quote(str(config))} --route {shlex.quote(run.route)}"
    if run.kind == "cycle":
        rerun += f" --cycle-id {shlex.quote(cycle_id_of(run.route, run.run_key))}"
    resumes = int(summary.get("auto_resumes", 0))
    given_up = summary.get("auto_resume_given_up")
    if given_up:
        automatic = (f" (automatic resumes given up after {given_up.get('after_resumes', resumes)}: cycle "
                     f"{given_up.get('by_cycle')} started a new run instead)")
    elif resume_limit and resumes < resume_limit:
        automatic = (f" (or the route's next cycle started without --cycle-id resumes it: automatic resume "
                     f"{resumes + 1} of {resume_limit})")
    elif resume_limit:
        automatic = (f" (its {resume_limit} automatic resume(s) are used up: the next cycle started without "
                     "--cycle-id gives it up)")
    else:
        automatic = ""
    if left_as == "interrupted":
        what = ("was interrupted: the cycle running it stopped without closing or failing it (killed, its host lost, "
                "stalled past its lease, or its route step found the weights busy), and no cycle works on it now")
    else:
        what = f"failed: {summary.get('error', 'no error recorded')}"
    return (f"run {run.id} ({run.run_key}) {what}; its {len(run.sample_ids)} samples are evaluated by no later run "
            f"until it is rerun: {rerun}{automatic}")


EXACT_COUNT_BELOW = 100_000


def status_row_counts(engine: Engine) -> dict[str, int | str]:
    """Rows per table for `status`. count(*) reads a whole table (PostgreSQL over 300 ms, SQLite ~150 ms at a
    million samples, bench/store_queries.py), so a table of EXACT_COUNT_BELOW rows or more shows an estimate, '~N':
    on PostgreSQL the planner's (pg_class.reltuples, kept by autovacuum/ANALYZE); on SQLite the span of its integer
    ids, read from the primary-key b-tree's two ends (exact while no rows are deleted, which the store never does).
    Smaller tables are counted exactly."""
    from sqlalchemy import func, select, text

    from shadowjudge.store import (
        Alert,
        Judgment,
        QuarantinedRecord,
        RouteWeightChange,
        ShadowResult,
        ShadowRun,
        TrafficSample,
    )

    models = (TrafficSample, QuarantinedRecord, ShadowRun, ShadowResult, Judgment, Alert, RouteWeightChange)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            estimates = dict(conn.execute(text(
                "SELECT c.relname, c.reltuples FROM pg_class c WHERE c.relkind = 'r' AND c.relname = ANY(:names) "
                "AND c.relnamespace = to_regnamespace(current_schema())::oid"),
                {"names": [m.__tablename__ for m in models]}).all())
        else:
            estimates = {}
            for model in models:  # min and max in one statement would scan: SQLite seeks only a lone min or max
                high = conn.scalar(select(func.max(model.id)))
                low = conn.scalar(select(func.min(model.id)))
                estimates[model.__tablename__] = 0 if high is None else high - low + 1
        out: dict[str, int | str] = {}
        for model in models:
            estimate = estimates.get(model.__tablename__, -1)
            out[model.__tablename__] = f"~{int(estimate)}" if estimate >= EXACT_COUNT_BELOW else \
                conn.scalar(select(func.count()).select_from(model)) or 0
    return out


@app.command()
def demo(workdir: Path = typer.Option(Path("shadowjudge-demo"), help="Where the demo writes its store, MLflow "
                                      "store, config and gateway file"),
         cycles: int = typer.Option(3, min=1, max=10, help="Cycles to run (each steps the rollout once)")) -> None:
    """Run the whole loop on shipped demo data: replay server, quick judge, cycles, MLflow, gateway config."""
    from shadowjudge.demo import run_demo
    from shadowjudge.environment import start_prefect_server_apart

    start_prefect_server_apart()  # its cycles are flows: Ctrl-C must not take their Prefect server down first
    run_demo(workdir, cycles=cycles, console=console)


PrefectFileOption = typer.Option(Path("prefect.yaml"), "--prefect-file", help="Deployments file (run from the repo root)")


@app.command()
def deploy(config: Path = ConfigOption, prefect_file: Path = PrefectFileOption,
           pool: Optional[str] = typer.Option(None, help="Work pool for every deployment (default: prefect.yaml's)"),
           judge_data: Optional[Path] = typer.Option(None, help="Preference data of the train-judge deployment")) -> None:
    """Deploy every schedule of prefect.yaml to the Prefect server at PREFECT_API_URL (pool and limits included)."""
    from flows.deployments import deploy_schedules, worker_commands

    deployed = deploy_schedules(config, prefect_file, pool=pool, judge_data=judge_data)
    for d in deployed:
        schedules = ", ".join(f"{s['schedule']}{'' if s['active'] else ' (inactive)'}" for s in d["schedules"])
        console.print(f"[bold]{escape(d['name'])}[/] pool {escape(str(d['work_pool']))}: "
                      f"{escape(schedules or 'on demand')}")
    for command in worker_commands(deployed):  # the pools the deployments are really on
        console.print("start a worker: " + command, markup=False)


@app.command()
def serve(config: Path = ConfigOption, prefect_file: Path = PrefectFileOption,
          only: Optional[list[str]] = typer.Option(None, "--only", help="Serve only this deployment (repeatable)"),
          limit: Optional[int] = typer.Option(None, min=1, help="Flow runs at once (default: no limit)"),
          replace: bool = typer.Option(False, help="Take over deployments `shadowjudge deploy` put on a work pool")) -> None:
    """Run the schedules of prefect.yaml from this process (no work pool or worker) until interrupted."""
    from flows.deployments import serve_schedules

    serve_schedules(config, prefect_file, only=only, limit=limit, replace=replace)


def _mount_subcommands(argv: list[str]) -> None:
    """Stage command groups; each lives beside its stage.

    Their imports cost seconds (scipy, the analysis), so a command of this module (`status`, `run`, ...) runs
    without them; `--help`, a group's command or an unknown command mounts them all.
    """
    from typer.main import get_command_name

    named = next((arg for arg in argv if not arg.startswith("-")), None)
    own = {c.name or get_command_name(c.callback.__name__) for c in app.registered_commands if c.callback}
    if named in own:
        return
    from shadowjudge.subcommands import register

    register(app)


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's exception base classes: typer >= 0.2x raises those of its own vendored click, not `click`'s."""
    import click

    bases: list[type[Exception]] = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # an older typer uses click itself
        return tuple(bases)
    return (*bases, vendored.ClickException)


INTERRUPTED = 130  # 128 + SIGINT


def main() -> None:
    """Entry point: bad input exits 2 and any failure exits non-zero with a message, never a traceback."""
    try:
        _mount_subcommands(sys.argv[1:])
        # Outside standalone mode click returns (not raises) the code of a `typer.Exit` raised by a command.
        code = app(standalone_mode=False)
        code = code if isinstance(code, int) and not isinstance(code, bool) else 0
        if code == INTERRUPTED:  # typer turns Ctrl-C inside a command into a silent Exit(130)
            err_console.print("interrupted")
        sys.exit(code)
    except ShadowJudgeError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(INTERRUPTED)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(INTERRUPTED)
    except Exception as exc:  # the last line of defence: a message, not a traceback
        if isinstance(exc, _click_errors()):  # bad option or argument: click's usage message, exit 2
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("SHADOWJUDGE_DEBUG"):
            raise
        print_error(f"{describe_failure(exc)}\n(set SHADOWJUDGE_DEBUG=1 for the traceback)")
        sys.exit(1)


def describe_failure(exc: BaseException) -> str:
    """One message for an unexpected failure. A database error shows the driver's first line only: SQLAlchemy's
    own text carries the statement's parameters, which may hold request data."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, DBAPIError):
        cause = exc.orig if exc.orig is not None else exc
        first = (str(cause).strip().splitlines() or [""])[0]
        what = "the store cannot be reached or failed" if isinstance(exc, OperationalError) else \
            "the store refused a statement"
        return f"{what}: {type(cause).__name__}: {first}"
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    main()
