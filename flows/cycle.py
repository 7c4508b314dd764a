"""The continuous evaluation cycle as a Prefect flow: one task per stage, the stages are shadowjudge functions.

Runs in Prefect's in-process ephemeral mode by default (no server); deployments in prefect.yaml schedule it.
Tasks are idempotent, so Prefect's retries and a manual rerun with the same cycle_id never double-write.
"""

from __future__ import annotations

from typing import Any

from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from shadowjudge import cycle as stages  # noqa: E402
from shadowjudge.config import Config, RouteConfig, load_config  # noqa: E402
from shadowjudge.store import get_engine, upgrade_database  # noqa: E402


def _engine(config: Config):
    return get_engine(config.store.url)


@task(name="ingest-and-sample", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def ingest_task(config: Config, progress: bool) -> dict[str, Any]:
    return stages.ingest(_engine(config), config, progress=progress)


@task(name="open-run", cache_policy=NO_CACHE)
def open_run_task(config: Config, route: RouteConfig, cycle_id: str) -> stages.RunHandle:
    return stages.open_run(_engine(config), config, route, cycle_id)


@task(name="shadow-test", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, tags=["provider-calls"])
def shadow_task(config: Config, route: RouteConfig, handle: stages.RunHandle, progress: bool) -> dict[str, Any]:
    return stages.shadow(_engine(config), config, route, handle, progress=progress)


@task(name="score", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def score_task(config: Config, route: RouteConfig, handle: stages.RunHandle, progress: bool) -> dict[str, Any]:
    return stages.score(_engine(config), config, route, handle, progress=progress)


@task(name="analyse", cache_policy=NO_CACHE)
def analyse_task(config: Config, route: RouteConfig, handle: stages.RunHandle, judge_version: str | None) -> dict[str, Any]:
    return stages.analyse(_engine(config), config, route, handle, judge_version)


@task(name="log-to-mlflow", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=10)
def track_task(config: Config, route: RouteConfig, handle: stages.RunHandle, analysis: dict[str, Any],
               reports: dict[str, Any]) -> str | None:
    return stages.track(_engine(config), config, route, handle, analysis, reports)


@task(name="alerts", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def alerts_task(config: Config, route: RouteConfig, handle: stages.RunHandle, analysis: dict[str, Any],
                mlflow_run_id: str | None, config_path: str) -> list[dict]:
    return stages.alert(_engine(config), config, route, handle, analysis, mlflow_run_id, config_path)


@task(name="update-routes", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def route_task(config: Config, route: RouteConfig, handle: stages.RunHandle, analysis: dict[str, Any],
               alerts: list[dict], mlflow_run_id: str | None) -> dict[str, Any]:
    return stages.update_routes(_engine(config), config, route, handle, analysis, alerts, mlflow_run_id)


@flow(name="evaluation-cycle", log_prints=True)
def evaluation_cycle(config_path: str, route: str | None = None, cycle_id: str | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Ingest and sample, then per route: shadow-test, score, analyse, log, alert, and step the weights."""
    logger = get_run_logger()
    config = load_config(config_path)
    upgrade_database(config.store.url)
    scheduled = flow_run.get_scheduled_start_time()
    cycle_id = cycle_id or stages.default_cycle_id(scheduled)
    ingest_report = ingest_task(config, progress)
    logger.info("ingest: %s", ingest_report.get("totals"))
    routes = [config.route(route)] if route else config.routes
    outcomes = {}
    for rc in routes:
        handle = open_run_task(config, rc, cycle_id)
        shadow_report = shadow_task(config, rc, handle, progress)
        score_report = score_task(config, rc, handle, progress)
        analysis = analyse_task(config, rc, handle, score_report.get("evaluator"))
        mlflow_run_id = track_task(config, rc, handle, analysis, {"ingest": ingest_report, "shadow": shadow_report,
                                                                  "score": score_report})
        alerts = alerts_task(config, rc, handle, analysis, mlflow_run_id, config_path)
        step = route_task(config, rc, handle, analysis, alerts, mlflow_run_id)
        outcome = stages.close_cycle(_engine(config), config, rc, handle, analysis, step, alerts, mlflow_run_id)
        create_markdown_artifact(key=f"cycle-{_artifact_key(rc.name)}", markdown=outcome["markdown"],
                                 description=f"ShadowJudge cycle {handle.run_key}")
        outcomes[rc.name] = {k: v for k, v in outcome.items() if k != "markdown"}
    return {"cycle_id": cycle_id, "ingest": ingest_report, "routes": outcomes}


def _artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())
