"""The continuous evaluation cycle as a Prefect flow: one task per stage, the stages are shadowjudge functions.

Runs in Prefect's in-process ephemeral mode by default (no server); deployments in prefect.yaml schedule it.
Tasks are idempotent, so Prefect's retries and a manual rerun with the same cycle_id never double-write.
The tasks and the single-stage flows are in flows/stages.py.
"""

from __future__ import annotations

from typing import Any

from shadowjudge.environment import apply_defaults, release_memory

apply_defaults()

from prefect import flow, get_run_logger  # noqa: E402

from evaluators.factory import check_evaluator  # noqa: E402
from shadowjudge.config import check_api_keys  # noqa: E402
from shadowjudge.errors import InputError, ShadowJudgeError  # noqa: E402
from shadowjudge.tracking.reachability import check_config_tracking  # noqa: E402

from flows.stages import current_cycle_id, ingest_task, load, run_route_cycle  # noqa: E402


@flow(name="evaluation-cycle", log_prints=True)
def evaluation_cycle(config_path: str, route: str | None = None, cycle_id: str | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Ingest and sample, then per route: shadow-test, score (and calibrate against the teacher), analyse with the
    golden set and drift checks, log, alert, and step the weights. Without a `cycle_id` (a scheduled run), a route
    whose newest run failed, or was left running by a cycle that is gone (killed), finishes that run instead of
    opening a new one (orchestration.resume_failed_runs)."""
    logger = get_run_logger()
    config = load(config_path)
    cycle_id_given = cycle_id is not None  # without one, a route whose newest run failed or was interrupted resumes it
    cycle_id = current_cycle_id(cycle_id)
    # a scheduled cycle whose MLflow is down, or whose judge is missing, fails now, before the paid shadow calls
    check_config_tracking(config)
    check_evaluator(config.judge, config.mlflow.tracking_uri)
    ingest_report = ingest_task(config, progress)
    logger.info("ingest: %s", ingest_report.get("totals"))
    routes = [config.route(route)] if route else config.routes
    outcomes: dict[str, dict[str, Any]] = {}
    failures: dict[str, BaseException] = {}
    for rc in routes:
        try:
            # a key that is not set is bad input of this route, before its run opens: it used to fail the shadow
            # test, which Prefect retried twice, 10 s apart, as a transient fault
            check_api_keys(config.endpoints([rc]))
            # holds the route's cycle lease: another cycle of it meanwhile fails at once instead of paying for the
            # same samples again
            outcomes[rc.name] = run_route_cycle(config, rc, cycle_id, ingest_report, config_path, progress,
                                                cycle_id_given=cycle_id_given)
        except Exception as exc:  # noqa: BLE001 - one route's failure must not starve the routes after it
            logger.error("route %s failed: %s: %s", rc.name, type(exc).__name__, exc)
            failures[rc.name] = exc
    release_memory()  # plots and ORM sessions leave reference cycles; a serving process runs cycles for weeks
    if failures:
        raise routes_failed(failures, outcomes)
    return {"cycle_id": cycle_id, "ingest": ingest_report, "routes": outcomes}


class RoutesFailed(ShadowJudgeError):
    """Some routes of a cycle failed after every route was tried; the flow run fails."""


def routes_failed(failures: dict[str, BaseException], outcomes: dict[str, dict[str, Any]]) -> RoutesFailed:
    """One error naming every failed route and the ones that completed; bad input (exit 2) when every failure was."""
    done = f"; route(s) {', '.join(outcomes)} completed" if outcomes else ""
    exc = RoutesFailed("; ".join(f"route {name}: {err}" for name, err in failures.items()) + done)
    if all(isinstance(err, InputError) for err in failures.values()):
        exc.exit_code = InputError.exit_code
    return exc
