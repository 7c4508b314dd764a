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

from flows.stages import (  # noqa: E402
    analyse_and_log,
    current_cycle_id,
    decide_and_publish,
    ingest_task,
    load,
    open_run_task,
    score_and_calibrate,
    shadow_task,
)


@flow(name="evaluation-cycle", log_prints=True)
def evaluation_cycle(config_path: str, route: str | None = None, cycle_id: str | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Ingest and sample, then per route: shadow-test, score (and calibrate against the teacher), analyse with the
    golden set and drift checks, log, alert, and step the weights."""
    logger = get_run_logger()
    config = load(config_path)
    cycle_id = current_cycle_id(cycle_id)
    ingest_report = ingest_task(config, progress)
    logger.info("ingest: %s", ingest_report.get("totals"))
    routes = [config.route(route)] if route else config.routes
    outcomes = {}
    for rc in routes:
        handle = open_run_task(config, rc, cycle_id)
        shadow_report = shadow_task(config, rc, handle, progress)
        score_report = score_and_calibrate(config, rc, handle, config_path, progress)
        analysed = analyse_and_log(config, rc, handle,
                                   {"ingest": ingest_report, "shadow": shadow_report, "score": score_report},
                                   config_path)
        outcomes[rc.name] = decide_and_publish(config, rc, handle, analysed)
    release_memory()  # plots and ORM sessions leave reference cycles; a serving process runs cycles for weeks
    return {"cycle_id": cycle_id, "ingest": ingest_report, "routes": outcomes}
