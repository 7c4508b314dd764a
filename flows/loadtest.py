"""Load testing a route's targets as a Prefect flow; the work is shadowjudge.shadow.loadtest.

A concurrency ramp with the route's stored (sampled, redacted) prompts, one target at a time, each logged as an
MLflow run in `<prefix>/<route>/loadtest`. It loads provider endpoints, so its task carries the `provider-calls`
tag (the shared concurrency limit) and its deployment's schedule ships inactive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shadowjudge.environment import apply_defaults

apply_defaults()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.stages import PROVIDER_CALLS, load, transient_fault  # noqa: E402
from shadowjudge.config import ShadowConfig, TargetConfig  # noqa: E402
from shadowjudge.errors import InputError  # noqa: E402


@task(name="load-test-target", tags=[PROVIDER_CALLS], cache_policy=NO_CACHE)
def load_test_task(target: TargetConfig, prompts: list, ramp: str, max_requests: int, shadow: ShadowConfig) -> dict:
    """One target up the ramp. Not retried: a retry would measure a different moment and load the endpoint twice."""
    from shadowjudge.shadow.loadtest import Ramp, run_loadtest

    return run_loadtest(target, prompts, ramp=Ramp.parse(ramp), max_requests=max_requests, shadow=shadow).as_dict()


@task(name="log-load-test", retries=3, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=transient_fault)
def log_load_test_task(report: dict[str, Any], tracking_uri: str, experiment: str) -> str:
    from shadowjudge.shadow.loadtest import LoadStep, LoadTestReport, log_loadtest

    steps = [LoadStep(**s) for s in report["steps"]]
    return log_loadtest(LoadTestReport(**{**report, "steps": steps}), tracking_uri, experiment)


@flow(name="load-test", log_prints=True)
def load_test(config_path: str, route: str, targets: list[str] | None = None, ramp: str = "2:2:10:8",
              max_requests: int = 2000, max_prompts: int = 500) -> dict[str, Any]:
    """Ramp concurrency (start:step:hold_s:max) against the route's candidates, or the named targets."""
    from shadowjudge.shadow.loadtest import Ramp, prompts_from_store

    Ramp.parse(ramp)  # bad input fails before any request
    config = load(config_path)
    rc = config.route(route)
    known = {t.name: t for t in rc.targets}
    unknown = sorted(set(targets or ()) - set(known))
    if unknown:
        raise InputError(f"load-test: route '{route}' has no target(s) {unknown} (known: {sorted(known)})")
    chosen = [known[name] for name in targets] if targets else list(rc.candidates)
    prompts = prompts_from_store(Path(config_path), route, max_prompts)
    if not prompts:
        raise InputError(f"load-test: route '{route}' has no stored traffic yet: ingest first")
    shadow = ShadowConfig(stream=config.shadow.stream, timeout_s=config.shadow.timeout_s, max_retries=0,
                          max_tokens=config.shadow.max_tokens)
    experiment = f"{config.mlflow.experiment_prefix}/{route}/loadtest"
    logger = get_run_logger()
    results = {}
    for target in chosen:
        report = load_test_task(target, prompts, ramp, max_requests, shadow)
        run_id = log_load_test_task(report, config.mlflow.tracking_uri, experiment) if config.mlflow.enabled else None
        # throughput (successes over the whole step, drain included): what the endpoint delivered at that level
        peak = max(report["steps"], key=lambda s: s["achieved_rps"], default=None)
        results[target.name] = {"mlflow_run_id": run_id, "steps": len(report["steps"]), "capped": report["capped"],
                                "peak_rps": peak["achieved_rps"] if peak else 0.0,
                                "concurrency_at_peak": peak["concurrency"] if peak else None}
        logger.info("%s: peak %.1f req/s at concurrency %s", target.name, results[target.name]["peak_rps"],
                    results[target.name]["concurrency_at_peak"])
    return {"route": route, "ramp": ramp, "targets": results}
