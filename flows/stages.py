"""The cycle's stages as Prefect tasks and flows; every task calls one `shadowjudge.cycle` stage function.

The stage flows (ingest-and-sample, shadow-test, score, score-batch, analyse, update-routes) run a single stage of
a cycle on their own: a manual rerun, or a deployment other workers pick up. The parent flow, `evaluation_cycle`
in flows/cycle.py, runs the same tasks in order.

Every stage is idempotent (natural keys, inserts that ignore duplicates), so a retried task, a rerun stage or a
rerun cycle never writes a row twice. Tasks retry transient faults (a provider, MLflow or the database briefly
away) but not bad input, which would fail the same way again. Tasks that call model providers carry the
`provider-calls` tag: one Prefect concurrency limit on that tag (created by `shadowjudge deploy` and `serve`)
caps them across all flow runs and workers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from shadowjudge.environment import apply_defaults

apply_defaults()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from shadowjudge import cycle as stages  # noqa: E402
from shadowjudge.config import Config, RouteConfig, load_config  # noqa: E402
from shadowjudge.errors import InputError, ShadowJudgeError  # noqa: E402
from shadowjudge.routing.step import RouteBusy  # noqa: E402
from shadowjudge.store import get_engine, upgrade_database  # noqa: E402
from shadowjudge.store.lease import LeaseLock  # noqa: E402

PROVIDER_CALLS = "provider-calls"


class ScoreFanOutError(ShadowJudgeError):
    """Scoring batches run by other workers failed or did not finish in time (those are cancelled); the message
    names them."""


def transient_fault(task, task_run, state) -> bool:  # noqa: ARG001 (Prefect's retry_condition_fn signature)
    """Retry anything but bad input (a config, a file, a cycle that does not exist), which fails again, a scoring
    fan-out that gave up (its batches failed or were cancelled, and a retry re-attaches to those same runs), and a
    cycle that lost its lease to another (it must stop, not try again beside it)."""
    return not isinstance(state.data, (InputError, ScoreFanOutError, stages.CycleLeaseLost))


STAGE = {"cache_policy": NO_CACHE, "retry_condition_fn": transient_fault}


def load(config_path: str) -> Config:
    """Load the config and bring the store's schema up to date (a no-op when it already is)."""
    config = load_config(config_path)
    upgrade_database(config.store.url)
    return config


def engine_of(config: Config):
    return get_engine(config.store.url)


def current_cycle_id(cycle_id: str | None) -> str:
    """The given cycle id, else the scheduled minute of this flow run: a retried schedule slot is the same cycle."""
    return cycle_id or stages.default_cycle_id(flow_run.get_scheduled_start_time())


# --- tasks: one per stage ---

@task(name="ingest-and-sample", retries=2, retry_delay_seconds=5, **STAGE)
def ingest_task(config: Config, progress: bool = False) -> dict[str, Any]:
    return stages.ingest(engine_of(config), config, progress=progress)


@task(name="open-run", retries=2, retry_delay_seconds=5, **STAGE)
def open_run_task(config: Config, route: RouteConfig, cycle_id: str, driver: str | None = None) -> stages.RunHandle:
    return stages.open_run(engine_of(config), config, route, cycle_id, driver)


@task(name="find-run", retries=2, retry_delay_seconds=5, **STAGE)
def find_run_task(config: Config, route: RouteConfig, cycle_id: str, driver: str | None = None) -> stages.RunHandle:
    return stages.find_run(engine_of(config), stages.cycle_run_key(route.name, cycle_id), driver)


@task(name="shadow-test", retries=2, retry_delay_seconds=10, tags=[PROVIDER_CALLS], **STAGE)
def shadow_task(config: Config, route: RouteConfig, handle: stages.RunHandle, progress: bool = False) -> dict[str, Any]:
    return stages.shadow(engine_of(config), config, route, handle, progress=progress)


@task(name="score", retries=1, retry_delay_seconds=5, **STAGE)
def score_task(config: Config, route: RouteConfig, handle: stages.RunHandle, config_path: str,
               progress: bool = False) -> dict[str, Any]:
    """Score in this process, or fan the run's sample ranges out to the score-batch deployment."""
    if config.orchestration.score_batches > 1 and handle.sample_ids:
        return fan_out_scoring(config, config_path, route, handle)
    return stages.score(engine_of(config), config, route, handle, progress=progress)


@task(name="calibrate", retries=2, retry_delay_seconds=10, tags=[PROVIDER_CALLS], **STAGE)
def calibrate_task(config: Config, handle: stages.RunHandle, judge_version: str | None) -> dict[str, Any] | None:
    return stages.calibrate(engine_of(config), config, handle, judge_version)


@task(name="golden-set", retries=2, retry_delay_seconds=10, tags=[PROVIDER_CALLS], **STAGE)
def golden_task(config: Config, route: RouteConfig, judge_version: str | None) -> dict[str, Any]:
    return stages.golden_gate(config, route, judge_version)


@task(name="drift", retries=1, retry_delay_seconds=5, **STAGE)
def drift_task(config: Config, route: RouteConfig) -> dict[str, Any] | None:
    return stages.drift_check(engine_of(config), config, route)


@task(name="score-batch", retries=1, retry_delay_seconds=5, **STAGE)
def score_range_task(config: Config, route: RouteConfig, handle: stages.RunHandle,
                     sample_range: tuple[int, int]) -> dict[str, Any]:
    from dataclasses import asdict

    from evaluators import load_evaluator
    from shadowjudge.scoring import score_run

    evaluator = load_evaluator(config.judge, config.mlflow.tracking_uri)
    report = score_run(engine_of(config), handle.run_id, evaluator, [c.name for c in route.candidates],
                       batch_size=config.judge.batch_size, sample_range=sample_range)
    return asdict(report)


@task(name="analyse", retries=1, retry_delay_seconds=5, **STAGE)
def analyse_task(config: Config, route: RouteConfig, handle: stages.RunHandle,
                 judge_version: str | None) -> dict[str, Any]:
    return stages.analyse(engine_of(config), config, route, handle, judge_version)


@task(name="log-to-mlflow", retries=3, retry_delay_seconds=10, **STAGE)
def track_task(config: Config, route: RouteConfig, handle: stages.RunHandle, analysis: dict[str, Any],
               reports: dict[str, Any]) -> str | None:
    return stages.track(engine_of(config), config, route, handle, analysis, reports)


@task(name="alerts", retries=1, retry_delay_seconds=5, **STAGE)
def alerts_task(config: Config, route: RouteConfig, handle: stages.RunHandle, analysis: dict[str, Any],
                mlflow_run_id: str | None, config_path: str) -> list[dict]:
    return stages.alert(engine_of(config), config, route, handle, analysis, mlflow_run_id, config_path)


@task(name="update-routes", retries=2, retry_delay_seconds=10, **STAGE)
def route_task(config: Config, route: RouteConfig, handle: stages.RunHandle, analysis: dict[str, Any],
               alerts: list[dict], mlflow_run_id: str | None) -> dict[str, Any]:
    return stages.update_routes(engine_of(config), config, route, handle, analysis, alerts, mlflow_run_id)


@task(name="close-cycle", retries=2, retry_delay_seconds=10, **STAGE)
def close_task(config: Config, route: RouteConfig, handle: stages.RunHandle, analysis: dict[str, Any],
               step: dict[str, Any], alerts: list[dict], mlflow_run_id: str | None) -> dict[str, Any]:
    return stages.close_cycle(engine_of(config), config, route, handle, analysis, step, alerts, mlflow_run_id)


# --- the per-route sequence the parent and the stage flows share ---

def run_route_cycle(config: Config, route: RouteConfig, cycle_id: str, ingest_report: dict[str, Any],
                    config_path: str, progress: bool = False, *, cycle_id_given: bool = True) -> dict[str, Any]:
    """One route's cycle after ingest, holding the route's cycle lease from opening its run to closing it: another
    cycle of the route meanwhile fails at once (RouteBeingEvaluated) instead of shadow-testing the same samples.
    Each stage starts only while the lease is still ours (CycleLeaseLost otherwise).

    `cycle_id_given` False (a scheduled cycle, `shadowjudge run` without --cycle-id): when the route's newest run
    failed or was interrupted, the cycle resumes it instead of opening run `cycle_id` (`stages.choose_cycle_run`);
    the outcome says so. The run is marked driven by a full cycle, and this process holds its driver lease while it
    works on it (RouteBeingEvaluated when a live cycle that lost the route's lease still does): if this process dies
    or stops before closing or failing it, the next cycle started without a cycle id finds it interrupted and
    resumes it."""
    with stages.cycle_lease(engine_of(config), route.name, cycle_id) as lease:
        choice = choose_run(config, route, cycle_id, lease, cycle_id_given)
        lease.drive(route.name, stages.cycle_run_key(route.name, choice.cycle_id), cycle_id)
        handle = open_run_task(config, route, choice.cycle_id, stages.FULL_CYCLE)
        try:
            stages.ensure_lease(lease)
            shadow_report = shadow_task(config, route, handle, progress)
            score_report = score_and_calibrate(config, route, handle, config_path, lease, progress)
            analysed = analyse_and_log(config, route, handle,
                                       {"ingest": ingest_report, "shadow": shadow_report, "score": score_report},
                                       config_path, lease)
            outcome = decide_and_publish(config, route, handle, analysed, lease)
            if score_report.get("calibration_failed"):
                outcome["calibration_failed"] = score_report["calibration_failed"]
            return {**outcome, **choice.outcome()}
        except (RouteBusy, stages.CycleLeaseLost):
            # the run stays open for the update-routes rerun (or the next cycle without a cycle id, which finds it
            # interrupted once this cycle released its driver lease, and resumes it)
            raise
        except Exception as exc:
            stages.fail_run(engine_of(config), handle.run_id, exc)
            raise


def choose_run(config: Config, route: RouteConfig, cycle_id: str, lease: stages.CycleLease,
               cycle_id_given: bool) -> stages.CycleRunChoice:
    """`stages.choose_cycle_run`, saying in the flow's log and in the lease's holder which run it resumed."""
    choice = stages.choose_cycle_run(engine_of(config), config, route, cycle_id, lease, cycle_id_given=cycle_id_given)
    if choice.note:
        get_run_logger().warning("route %s: %s", route.name, choice.note)
    if choice.cycle_id != cycle_id:
        lease.relabel(choice.lease_label)
    return choice


def score_and_calibrate(config: Config, route: RouteConfig, handle: stages.RunHandle, config_path: str,
                        lease: LeaseLock, progress: bool = False) -> dict[str, Any]:
    """Judge the run's pairs, then send the calibration share of them to the teacher (called inside a flow, holding
    the route's cycle `lease`).

    Calibration measures the judge; it decides nothing about the candidates. A teacher that fails (down, a revoked
    key) is a warning, recorded in the report as `calibration_failed`, and the cycle goes on to its analysis, alerts
    and route step: a regression must still be caught and rolled back. The verdicts it did buy are stored, and the
    next calibration of the run (a rerun of the cycle) asks only for the rest."""
    stages.ensure_lease(lease)
    report = score_task(config, route, handle, config_path, progress)
    stages.ensure_lease(lease)
    try:
        calibration = calibrate_task(config, handle, report.get("evaluator"))
    except Exception as exc:  # noqa: BLE001 - a side measurement: reported, never the end of the cycle
        get_run_logger().warning("route %s: calibration against the teacher failed (%s: %s); the cycle goes on "
                                 "without it: rerun the cycle to calibrate this run", route.name,
                                 type(exc).__name__, exc)
        return {**report, "calibration_failed": f"{type(exc).__name__}: {exc}"}
    return {**report, "calibration": calibration} if calibration else report


def analyse_and_log(config: Config, route: RouteConfig, handle: stages.RunHandle, reports: dict[str, Any],
                    config_path: str, lease: LeaseLock) -> dict[str, Any]:
    """Analyse the run, check the golden set and drift, log it all to MLflow and raise alerts (inside a flow,
    holding the route's cycle `lease`)."""
    stages.ensure_lease(lease)
    judge_version = reports.get("score", {}).get("evaluator")
    analysis = {**analyse_task(config, route, handle, judge_version),
                "golden": golden_task(config, route, judge_version), "drift": drift_task(config, route)}
    if reports.get("score", {}).get("calibration"):
        reports = {**reports, "calibration": reports["score"]["calibration"]}
    try:
        mlflow_run_id, not_logged = track_task(config, route, handle, analysis, reports), None
    except Exception as exc:  # noqa: BLE001 - raised again once alerts and the route step are done
        mlflow_run_id, not_logged = None, exc
        get_run_logger().error("route %s: the cycle could not be logged to MLflow (%s); its alerts and route step go "
                               "ahead, and the cycle fails afterwards: rerun it to log it", route.name, exc)
    stages.ensure_lease(lease)
    alerts = alerts_task(config, route, handle, analysis, mlflow_run_id, config_path)
    return {"analysis": analysis, "mlflow_run_id": mlflow_run_id, "alerts": alerts, "not_logged": not_logged}


def raise_if_not_logged(analysed: dict[str, Any]) -> None:
    """Fail the flow with the MLflow logging error `analyse_and_log` held back: an MLflow outage must not stop a
    regression's alerts or rollback, but it must not pass unnoticed either (a rerun of the cycle logs it)."""
    if analysed.get("not_logged") is not None:
        raise analysed["not_logged"]


def decide_and_publish(config: Config, route: RouteConfig, handle: stages.RunHandle, analysed: dict[str, Any],
                       lease: LeaseLock) -> dict[str, Any]:
    """Step the route's weights, close the run, and publish the cycle's summary as a Prefect artifact (inside a flow,
    holding the route's cycle `lease`). A step that finds the route's lock busy fails the update-routes task (retried)
    and leaves the run open."""
    analysis, alerts, mlflow_run_id = analysed["analysis"], analysed["alerts"], analysed["mlflow_run_id"]
    stages.ensure_lease(lease)
    step = route_task(config, route, handle, analysis, alerts, mlflow_run_id)
    stages.ensure_lease(lease)
    outcome = close_task(config, route, handle, analysis, step, alerts, mlflow_run_id)
    create_markdown_artifact(key=artifact_key(route.name), markdown=outcome["markdown"],
                             description=f"ShadowJudge cycle {handle.run_key}")
    raise_if_not_logged(analysed)
    return {k: v for k, v in outcome.items() if k != "markdown"}


def artifact_key(route: str) -> str:
    """The cycle summary's artifact key: `cycle-<route>` (Prefect keys allow lowercase letters, digits, dashes)."""
    return "cycle-" + "".join(c if c.isalnum() else "-" for c in route.lower())


# --- scoring past one process ---

def fan_out_scoring(config: Config, config_path: str, route: RouteConfig, handle: stages.RunHandle) -> dict[str, Any]:
    """Score the run's sample-id ranges as runs of the score-batch deployment, which any worker of its pool takes.

    Batches write through the judgments' unique key, so a batch retried, rerun or overlapping another never
    duplicates a judgment; what the run holds afterwards is read back from the store. Each batch's run is keyed by
    this flow run and its range, so a retry of the task re-attaches to the batches it started instead of queueing a
    second set; a rerun of the stage (a new flow run) starts new ones.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from evaluators.factory import pinned_judge_model_uri

    orchestration = config.orchestration
    logger = get_run_logger()
    ranges = stages.sample_ranges(handle.sample_ids, orchestration.score_batches)
    judge_model_uri = pinned_judge_model_uri(config.judge, config.mlflow.tracking_uri)
    cycle_id = stages.cycle_id_of(route.name, handle.run_key)
    runs = []
    for first, last in ranges:
        try:
            runs.append(run_deployment(
                orchestration.score_deployment, timeout=0, flow_run_name=f"{handle.run_key} samples {first}-{last}",
                idempotency_key=f"{handle.run_key}:{first}-{last}:{flow_run.get_id()}",
                parameters={"config_path": str(Path(config_path).resolve()), "route": route.name,
                            "cycle_id": cycle_id, "first_sample_id": first, "last_sample_id": last,
                            **({"judge_model_uri": judge_model_uri} if judge_model_uri else {})}))
        except ObjectNotFound:
            raise InputError(f"orchestration.score_batches is {orchestration.score_batches} but there is no "
                             f"deployment '{orchestration.score_deployment}': run `shadowjudge deploy` (or set "
                             "orchestration.score_batches: 1 to score in the cycle's process)") from None
    logger.info("scoring %s in %d batches: %s", handle.run_key, len(runs), ", ".join(r.name for r in runs))
    finished = wait_for_flow_runs([r.id for r in runs], orchestration.score_batch_timeout_s)
    failed = [f"{r.name} ({r.state.name})" for r in finished if not r.state.is_completed()]
    if failed:
        raise ScoreFanOutError(f"scoring batches of {handle.run_key} did not complete: {', '.join(failed)}")
    summary = stages.scoring_summary(engine_of(config), handle.run_id)
    return {**summary, "batches": [{"samples": [first, last], "flow_run": r.name}
                                   for (first, last), r in zip(ranges, finished, strict=True)]}


def wait_for_flow_runs(flow_run_ids: list, timeout_s: float, poll_s: float = 2.0) -> list:
    """Poll the Prefect API until every flow run is in a final state; after `timeout_s`, cancel the unfinished ones
    (left scheduled, a worker would still score them long after the cycle gave up) and raise ScoreFanOutError."""
    from prefect import get_client
    from prefect.states import Cancelling

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(run_id) for run_id in flow_run_ids]
            if all(r.state is not None and r.state.is_final() for r in runs):
                return runs
            if time.monotonic() > deadline:
                unfinished = [r for r in runs if r.state is None or not r.state.is_final()]
                for r in unfinished:
                    client.set_flow_run_state(r.id, Cancelling(message=f"scoring gave up after {timeout_s:g} s"))
                waiting = [f"{r.name} ({r.state.name if r.state else 'no state'})" for r in unfinished]
                raise ScoreFanOutError(f"scoring batches still unfinished after {timeout_s:g} s, cancelled: "
                                       f"{', '.join(waiting)}; is a worker polling the deployment's work pool?")
            time.sleep(poll_s)


# --- stage flows ---

@flow(name="ingest-and-sample", log_prints=True)
def ingest_and_sample(config_path: str, progress: bool = False) -> dict[str, Any]:
    """Read new gateway log records from every source, redact and sample them into the store."""
    return ingest_task(load(config_path), progress)


# The stage flows of one cycle hold the route's cycle lease as the whole cycle does (see stages.cycle_lease);
# score-batch does not: the score stage that fans it out holds the lease while its batches run on other workers.

@flow(name="shadow-test", log_prints=True)
def shadow_test(config_path: str, route: str, cycle_id: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Open the cycle's run (fixing its sample set) and replay its samples against the route's targets.

    Without a `cycle_id` it chooses its run as a full cycle does (`stages.choose_cycle_run`): a failed or
    interrupted newest run of the route is resumed, not stranded behind a new run. The result's `cycle_id` names the
    run worked on: the later stage flows take that one."""
    config = load(config_path)
    rc = config.route(route)
    cycle_id_given = cycle_id is not None
    cycle_id = current_cycle_id(cycle_id)
    with stages.cycle_lease(engine_of(config), rc.name, cycle_id) as lease:
        choice = choose_run(config, rc, cycle_id, lease, cycle_id_given)
        handle = open_run_task(config, rc, choice.cycle_id, stages.STAGE_FLOWS)
        if choice.resumed:
            get_run_logger().warning("route %s: run the later stages with cycle_id %s", rc.name, choice.cycle_id)
        stages.ensure_lease(lease)
        return {"run_key": handle.run_key, **choice.outcome(), **shadow_task(config, rc, handle, progress)}


@flow(name="score", log_prints=True)
def score(config_path: str, route: str, cycle_id: str, progress: bool = False) -> dict[str, Any]:
    """Judge the cycle's (incumbent, candidate) answer pairs, fanned out when orchestration.score_batches > 1."""
    config = load(config_path)
    rc = config.route(route)
    with stages.cycle_lease(engine_of(config), rc.name, cycle_id) as lease:
        handle = find_run_task(config, rc, cycle_id, stages.STAGE_FLOWS)
        return score_and_calibrate(config, rc, handle, config_path, lease, progress)


@flow(name="score-batch", log_prints=True)
def score_batch(config_path: str, route: str, cycle_id: str, first_sample_id: int,
                last_sample_id: int, judge_model_uri: str | None = None) -> dict[str, Any]:
    """Judge the pairs of one sample-id range of a cycle's run (inclusive): the unit the score stage fans out.
    `judge_model_uri` (a small judge's pinned version, which the score stage resolved once for all its batches)
    replaces the config's `judge.model_uri`: a batch that ran after a promotion used the new champion, and the
    analysis, reading one judge's judgments, dropped the other batches' pairs."""
    if first_sample_id > last_sample_id:
        raise InputError(f"score-batch: first_sample_id {first_sample_id} is after last_sample_id {last_sample_id}")
    config = load(config_path)
    if judge_model_uri:
        config = config.model_copy(update={"judge": config.judge.model_copy(update={"model_uri": judge_model_uri})})
    rc = config.route(route)
    handle = find_run_task(config, rc, cycle_id)
    return score_range_task(config, rc, handle, (first_sample_id, last_sample_id))


@flow(name="analyse", log_prints=True)
def analyse(config_path: str, route: str, cycle_id: str) -> dict[str, Any]:
    """Analyse the cycle's run, log it to MLflow and raise alerts; reports are rebuilt from the store."""
    config = load(config_path)
    rc = config.route(route)
    with stages.cycle_lease(engine_of(config), rc.name, cycle_id) as lease:
        handle = find_run_task(config, rc, cycle_id, stages.STAGE_FLOWS)
        analysed = analyse_and_log(config, rc, handle, stages.stored_reports(engine_of(config), rc, handle),
                                   config_path, lease)
    raise_if_not_logged(analysed)
    return {"run_key": handle.run_key, "mlflow_run_id": analysed["mlflow_run_id"],
            "verdicts": {c["target"]: c["verdict"] for c in analysed["analysis"].get("candidates", [])},
            "alerts": [a.get("id") for a in analysed["alerts"]]}


@flow(name="update-routes", log_prints=True)
def update_routes(config_path: str, route: str, cycle_id: str) -> dict[str, Any]:
    """Step the route's weights from the cycle's verdicts (analysed again: the analysis is a function of the store)."""
    config = load(config_path)
    rc = config.route(route)
    with stages.cycle_lease(engine_of(config), rc.name, cycle_id) as lease:
        handle = find_run_task(config, rc, cycle_id, stages.STAGE_FLOWS)
        analysed = analyse_and_log(config, rc, handle, stages.stored_reports(engine_of(config), rc, handle),
                                   config_path, lease)
        return decide_and_publish(config, rc, handle, analysed, lease)
