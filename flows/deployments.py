"""Deploying and serving the schedules of prefect.yaml: `shadowjudge deploy` and `shadowjudge serve`.

prefect.yaml is the one list of deployments. `deploy_schedules` prepares what the deployments rely on (the work
pool of type process, the `provider-calls` concurrency limit) and hands the file (with `--pool`, a copy of it on
that pool) to `prefect deploy --all`; `serve_schedules` builds the same deployments in-process and serves them with
`prefect.serve` (no pool, no worker). Both fill the file's `{{ $SHADOWJUDGE_* }}` placeholders from the config, so
both give the same deployments the same parameters, and both refuse a `route` parameter the config has no route of.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowjudge.environment import apply_defaults

apply_defaults()

import yaml  # noqa: E402

from shadowjudge.config import Config, load_config  # noqa: E402
from shadowjudge.errors import InputError, ShadowJudgeError  # noqa: E402

PROVIDER_CALLS = "provider-calls"  # the tag flows/stages.py puts on provider-calling tasks
DEFAULT_JUDGE_DATA = Path(__file__).resolve().parent.parent / "shadowjudge" / "demo_data" / "alpacaeval-mini"
PLACEHOLDER = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")
SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "active", "parameters", "slug", "day_or", "anchor_date"}


class DeploymentFileError(InputError):
    """prefect.yaml cannot be read or a deployment in it is incomplete; the message names the file and entry."""


class PrefectApiError(ShadowJudgeError):
    """No Prefect server to deploy to or serve from, or it refused a request."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of prefect.yaml, placeholders filled."""

    name: str
    entrypoint: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    concurrency_limit: int | None = None
    work_pool: str | None = None


def template_environment(config_path: str | Path, config: Config,
                         judge_data: str | Path | None = None) -> dict[str, str]:
    """Values of prefect.yaml's `{{ $SHADOWJUDGE_* }}` placeholders, taken from the config."""
    return {
        "SHADOWJUDGE_CONFIG": str(Path(config_path).resolve()),
        "SHADOWJUDGE_ROUTE": config.routes[0].name,  # the route load-test ramps: every config has one
        "SHADOWJUDGE_MLFLOW_URI": config.mlflow.tracking_uri,
        "SHADOWJUDGE_JUDGE_NAME": config.judge.registered_name,
        "SHADOWJUDGE_JUDGE_DATA": str(judge_data or os.environ.get("SHADOWJUDGE_JUDGE_DATA") or DEFAULT_JUDGE_DATA),
    }


def fill_placeholders(value: Any, environ: dict[str, str]) -> Any:
    """Replace `{{ $VAR }}` in every string of a YAML value, as `prefect deploy` does; unset variables become ''."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: environ.get(m.group(1), ""), value)
    if isinstance(value, dict):
        return {k: fill_placeholders(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, environ) for v in value]
    return value


def read_deployments(prefect_file: str | Path, environ: dict[str, str] | None = None) -> list[DeploymentSpec]:
    """The deployments of prefect.yaml with `{{ $VAR }}` placeholders filled from os.environ updated by `environ`."""
    path = Path(prefect_file)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeploymentFileError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise DeploymentFileError(f"{path}: not valid YAML: {exc}") from None
    entries = data.get("deployments") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DeploymentFileError(f"{path}: no `deployments` list")
    values = {**os.environ, **(environ or {})}
    return [_spec(path, i, fill_placeholders(entry, values)) for i, entry in enumerate(entries)]


def _spec(path: Path, index: int, entry: Any) -> DeploymentSpec:
    where = f"{path}: deployments[{index}]"
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("entrypoint"):
        raise DeploymentFileError(f"{where}: needs `name` and `entrypoint`")
    where = f"{path}: deployment '{entry['name']}'"
    if ":" not in str(entry["entrypoint"]):
        raise DeploymentFileError(f"{where}: entrypoint must be FILE.py:FUNCTION, got {entry['entrypoint']!r}")
    parameters = entry.get("parameters") or {}
    empty = sorted(k for k, v in parameters.items() if v in ("", None))
    if empty:
        raise DeploymentFileError(f"{where}: parameter(s) {empty} are empty: is the environment variable their "
                                  "placeholder names set? (`shadowjudge deploy -c CONFIG` sets them)")
    schedules = entry.get("schedules") or []
    for schedule in schedules:
        if not isinstance(schedule, dict) or len({"cron", "interval", "rrule"} & set(schedule)) != 1:
            raise DeploymentFileError(f"{where}: each schedule needs exactly one of cron, interval, rrule")
        unknown = set(schedule) - SCHEDULE_KEYS
        if unknown:
            raise DeploymentFileError(f"{where}: unknown schedule key(s) {sorted(unknown)}")
    pool = entry.get("work_pool") or {}
    return DeploymentSpec(name=entry["name"], entrypoint=entry["entrypoint"], parameters=dict(parameters),
                          schedules=[dict(s) for s in schedules], tags=list(entry.get("tags") or []),
                          description=entry.get("description"), concurrency_limit=entry.get("concurrency_limit"),
                          work_pool=pool.get("name") if isinstance(pool, dict) else None)


def check_routes(prefect_file: Path, specs: list[DeploymentSpec], config: Config) -> None:
    """Refuse a `route` parameter that names no route of the config: the deployment would be created without
    complaint and every run of it fail (at once for an on-demand run, at each tick for a scheduled one)."""
    known = [r.name for r in config.routes]
    for spec in specs:
        route = spec.parameters.get("route")
        if route is not None and route not in known:
            raise DeploymentFileError(f"{prefect_file}: deployment '{spec.name}': parameter route '{route}' names no "
                                      f"route of the config (known: {known})")


def to_schedule(entry: dict[str, Any]):
    """A prefect.yaml schedule entry as a Prefect Schedule (interval in seconds, as in the file)."""
    from prefect.schedules import Schedule

    values = dict(entry)
    if "interval" in values:
        values["interval"] = datetime.timedelta(seconds=float(values["interval"]))
    return Schedule(**values)


def require_api() -> str:
    """The configured Prefect API URL, after checking the server answers: deployments need a lasting server."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PrefectApiError("PREFECT_API_URL is not set: start a server (`prefect server start --host 127.0.0.1`) "
                              "and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise PrefectApiError(f"the Prefect API at {url} does not answer: {type(failure).__name__}: {failure}")
    return url


def ensure_provider_limit(limit: int) -> None:
    """Create (or reset) the tag concurrency limit shared by every task that calls a model provider."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=PROVIDER_CALLS, concurrency_limit=limit)


def ensure_work_pool(name: str) -> None:
    """Create the process work pool the deployments name, unless it exists (then it must be of type process)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                return
            except ObjectAlreadyExists:  # a worker started with --type process created it meanwhile
                pool = client.read_work_pool(name)
    if pool.type != "process":
        raise PrefectApiError(f"work pool '{name}' exists with type '{pool.type}'; the deployments need a process "
                              "pool: pick another name in prefect.yaml or pass --pool")


def deploy_schedules(config_path: str | Path, prefect_file: str | Path = "prefect.yaml", pool: str | None = None,
                     judge_data: str | Path | None = None) -> list[dict[str, Any]]:
    """Create the pool and the provider-calls limit, then `prefect deploy --all`; returns what the API now holds."""
    config = load_config(config_path)
    prefect_file = Path(prefect_file).resolve()
    env = template_environment(config_path, config, judge_data)
    specs = read_deployments(prefect_file, env)
    check_routes(prefect_file, specs, config)
    require_api()
    for name in sorted({pool} if pool else {s.work_pool or "shadowjudge" for s in specs}):
        ensure_work_pool(name)
    ensure_provider_limit(config.orchestration.provider_calls_limit)
    with deployments_on_pool(prefect_file, pool) as deploy_file:
        prefect_deploy_all(deploy_file, env)
    return deployed(full_names(specs, prefect_file.parent))


@contextlib.contextmanager
def deployments_on_pool(prefect_file: Path, pool: str | None) -> Iterator[Path]:
    """The deployments file with every deployment's work pool set to `pool` (the file itself when None).

    `prefect deploy --all` ignores `--pool` (multi-deploy ignores CLI options), so the pool goes into a copy written
    beside the file (entrypoints and the runs' working directory stay relative to its folder), removed afterwards.
    """
    if pool is None:
        yield prefect_file
        return
    data = yaml.safe_load(prefect_file.read_text())
    for entry in data["deployments"]:
        entry["work_pool"] = {**(entry.get("work_pool") or {}), "name": pool}
    with tempfile.NamedTemporaryFile("w", dir=prefect_file.parent, prefix=f".{prefect_file.stem}-deploy-",
                                     suffix=".yaml", delete=False) as copy:
        yaml.safe_dump(data, copy, sort_keys=False)
    try:
        yield Path(copy.name)
    finally:
        os.unlink(copy.name)


def prefect_deploy_all(prefect_file: Path, env: dict[str, str]) -> None:
    """`prefect deploy --all` on the file, from its folder; PrefectApiError when it fails or ignores an option
    (Prefect only warns then, and the deployments would not be what was asked for)."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    done = subprocess.run(command, cwd=prefect_file.parent, env={**os.environ, **env}, capture_output=True, text=True,
                          check=False)
    output = (done.stdout + done.stderr).strip()
    tail = "\n".join(output.splitlines()[-15:])
    if done.returncode != 0:
        raise PrefectApiError(f"`prefect deploy --all` failed (exit {done.returncode}):\n{tail}")
    if "will be ignored" in " ".join(output.split()):  # Rich wraps the warning at the console's width
        raise PrefectApiError(f"`prefect deploy --all` ignored options it was given:\n{tail}")


def worker_commands(deployments: list[dict[str, Any]]) -> list[str]:
    """The `prefect worker start` command for each work pool the deployments are on, as the API holds them."""
    pools = sorted({d["work_pool"] for d in deployments if d["work_pool"]})
    return [f"prefect worker start --pool {shlex.quote(pool)}" for pool in pools]


def full_names(specs: list[DeploymentSpec], project_root: Path) -> list[str]:
    """The `flow/deployment` name of each spec: only that names one deployment on a shared server, where another
    flow may have a deployment of the same name. The flow's name is read from its `@flow` decorator without importing
    the file, as Prefect does for a flow it cannot load."""
    from prefect.flows import load_flow_arguments_from_entrypoint

    names = []
    for spec in specs:
        file, function = spec.entrypoint.rsplit(":", 1)
        flow = load_flow_arguments_from_entrypoint(f"{project_root / file}:{function}", {"name"})["name"]
        names.append(f"{flow}/{spec.name}")
    return names


def deployed(names: list[str]) -> list[dict[str, Any]]:
    """Pool, schedules and parameters of the `flow/deployment` names that exist, as the API holds them, in the
    order given. Each is read by its name, not found in a listing: the API lists a page (200) at a time."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    out = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                d = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            out.append({"name": name, "work_pool": d.work_pool_name, "parameters": d.parameters,
                        "schedules": [{"schedule": _describe(s.schedule), "active": s.active} for s in d.schedules]})
    return out


def _describe(schedule: Any) -> str:
    for attr in ("cron", "interval", "rrule"):
        value = getattr(schedule, attr, None)
        if value is not None:
            return f"{attr} {value}" + (f" ({schedule.timezone})" if getattr(schedule, "timezone", None) else "")
    return str(schedule)


def served_deployments(specs: list[DeploymentSpec], project_root: Path) -> list:
    """RunnerDeployments for `prefect.serve`, built from the specs (entrypoints relative to the project root)."""
    from prefect.flows import load_flow_from_entrypoint

    deployments = []
    for spec in specs:
        file, function = spec.entrypoint.rsplit(":", 1)
        try:
            flow = load_flow_from_entrypoint(f"{project_root / file}:{function}")
        except Exception as exc:
            raise DeploymentFileError(f"deployment '{spec.name}': cannot load {spec.entrypoint}: {exc}") from None
        deployments.append(flow.to_deployment(
            name=spec.name, schedules=[to_schedule(s) for s in spec.schedules], parameters=spec.parameters,
            tags=spec.tags, description=spec.description, concurrency_limit=spec.concurrency_limit))
    return deployments


def take_over_deployments(deployments: list, replace: bool) -> None:
    """Refuse to serve a name that a work pool's deployment already holds (workers and this process would race
    for its runs), unless `replace`: then delete that deployment first."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        held = []
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                held.append((existing, f"{d.flow_name}/{d.name} (pool {existing.work_pool_name})"))
        if held and not replace:
            raise PrefectApiError("already deployed to a work pool: " + ", ".join(label for _, label in held)
                                  + "; pass --replace to serve them from here instead")
        for existing, _ in held:
            client.delete_deployment(existing.id)


def serve_schedules(config_path: str | Path, prefect_file: str | Path = "prefect.yaml", only: list[str] | None = None,
                    judge_data: str | Path | None = None, limit: int | None = None, replace: bool = False) -> None:
    """Serve prefect.yaml's deployments from this process until interrupted: each run is a local subprocess."""
    from prefect import serve

    config = load_config(config_path)
    prefect_file = Path(prefect_file).resolve()
    env = template_environment(config_path, config, judge_data)
    specs = read_deployments(prefect_file, env)
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise DeploymentFileError(f"{prefect_file}: no deployment(s) {unknown} (known: {[s.name for s in specs]})")
        specs = [s for s in specs if s.name in only]
    check_routes(prefect_file, specs, config)
    require_api()
    ensure_provider_limit(config.orchestration.provider_calls_limit)
    os.environ.update(env)
    os.chdir(prefect_file.parent)  # entrypoints and the runs' working directory are relative to the project
    deployments = served_deployments(specs, prefect_file.parent)
    take_over_deployments(deployments, replace)
    serve(*deployments, limit=limit)
