"""Build the evaluator a config asks for; the cycle flow calls `load_evaluator` once per run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from evaluators.base import Evaluator
from shadowjudge.errors import InputError

if TYPE_CHECKING:
    from evaluators.encoder import TextEmbedder
    from shadowjudge.config import JudgeConfig


log = logging.getLogger(__name__)


class EvaluatorConfigError(InputError):
    """The judge section names an evaluator that cannot be built; the message says how to fix it."""


def load_evaluator(judge: "JudgeConfig", tracking_uri: str) -> Evaluator:
    """The evaluator named by `judge.evaluator`.

    small-judge: the registered model `judge.model_uri` (default `models:/<registered_name>@champion`) from the
    MLflow registry at `tracking_uri`, or a local judge directory; llm-judge: the teacher endpoint in
    `judge.teacher`; lexical: a model-free heuristic for smoke tests.
    """
    kind = judge.evaluator
    if kind == "small-judge":
        return load_small_judge(judge_model_uri(judge), tracking_uri,
                                batch_size=judge.batch_size)
    if kind == "llm-judge":
        from evaluators.llm_judge import LlmJudge

        teacher = getattr(judge, "teacher", None)
        if teacher is None:
            raise EvaluatorConfigError("judge.evaluator is 'llm-judge' but judge.teacher (an endpoint) is not set")
        return LlmJudge.from_target(teacher)
    if kind == "lexical":
        from evaluators.lexical import LexicalEvaluator

        return LexicalEvaluator()
    raise EvaluatorConfigError(f"judge.evaluator '{kind}' is unknown; use small-judge, llm-judge or lexical")


def load_evaluator_version(judge: "JudgeConfig", tracking_uri: str, version: str | None) -> Evaluator:
    """The evaluator that gave `version` (a run's judge), else the one the config names now, with a warning.

    The champion can move between a cycle's score stage and a later one (the train-judge flow promoting, a rerun
    after a promotion); a registry judge's version names its model version and the digest of its files, so that
    exact judge is loaded again and checked."""
    prefix = "small-judge:models:/"
    if judge.evaluator == "small-judge" and version and version.startswith(prefix) and "@" in version:
        from evaluators.judge_registry import JudgeNotFound

        try:
            pinned = load_small_judge(version.removeprefix("small-judge:").rpartition("@")[0], tracking_uri,
                                      batch_size=judge.batch_size)
        except JudgeNotFound:
            pinned = None
        if pinned is not None and pinned.version == version:
            return pinned
    evaluator = load_evaluator(judge, tracking_uri)
    if version and evaluator.version != version:
        log.warning("the judge that scored this run (%s) cannot be loaded again; using %s", version, evaluator.version)
    return evaluator


def judge_model_uri(judge: "JudgeConfig") -> str:
    """`judge.model_uri`, by default the registered champion."""
    return judge.model_uri or f"models:/{judge.registered_name}@champion"


def pinned_judge_model_uri(judge: "JudgeConfig", tracking_uri: str) -> str | None:
    """The judge `load_evaluator` would load now, named so that it cannot move: a registry alias
    (`models:/name@champion`) as the version it points at (`models:/name/3`); a version or a directory as it is; None
    for an evaluator that is no small judge. Work split across processes (a run's scoring batches) loads this one, so
    a promotion meanwhile cannot leave a run judged by two judges, of which the analysis would read one."""
    if judge.evaluator != "small-judge":
        return None
    model_uri = judge_model_uri(judge)
    if model_uri.startswith("models:/") and "@" in model_uri:
        from evaluators import judge_registry as reg

        return reg.resolve(tracking_uri, model_uri).uri
    return model_uri


def _not_a_judge(model_uri: str) -> EvaluatorConfigError:
    return EvaluatorConfigError(f"judge model '{model_uri}' is neither a models:/ URI nor a judge directory")


def check_evaluator(judge: "JudgeConfig", tracking_uri: str) -> None:
    """What `load_evaluator` would refuse, found without loading a model: a cycle checks it before its paid shadow
    calls (a missing champion used to fail only at the score stage, leaving the run open to be replayed again)."""
    from pathlib import Path

    if judge.evaluator == "llm-judge" and getattr(judge, "teacher", None) is None:
        raise EvaluatorConfigError("judge.evaluator is 'llm-judge' but judge.teacher (an endpoint) is not set")
    if judge.evaluator != "small-judge":
        return
    model_uri = judge_model_uri(judge)
    if model_uri.startswith("models:/"):
        from evaluators import judge_registry as reg

        reg.resolve(tracking_uri, model_uri)
    elif not Path(model_uri.removeprefix("file://")).is_dir():
        raise _not_a_judge(model_uri)


def load_small_judge(model_uri: str, tracking_uri: str, *, batch_size: int = 32, backend: str | None = None,
                     embedder: "TextEmbedder | None" = None):
    """A SmallJudge from `models:/name@alias`, `models:/name/version` or a local directory.

    `backend` (torch | onnx | onnx-int8) overrides the encoder runtime the judge was validated with; `embedder`
    replaces the encoder (e.g. training's embedding cache). A registered judge that will not load is named by its
    registry version, not by the temporary directory it was downloaded to.
    """
    import os
    import tempfile
    from pathlib import Path

    from evaluators import judge_registry as reg
    from evaluators.small_judge import JudgeLoadError, SmallJudge
    from shadowjudge.tracking.mlflow_tracking import redact_uri

    if model_uri.startswith("models:/"):
        found = reg.resolve(tracking_uri, model_uri)
        alias = f" ({model_uri.rpartition('@')[2]})" if "@" in model_uri else ""
        # load reads judge.json and head.npz whole, so the download is removed once it returns (or fails)
        with tempfile.TemporaryDirectory(prefix="shadowjudge-judge-") as download:
            judge_dir = reg.download_judge(tracking_uri, found, Path(download))
            try:
                return SmallJudge.load(judge_dir, name=found.uri, batch_size=batch_size, backend=backend,
                                       embedder=embedder)
            except JudgeLoadError as exc:
                reason = str(exc).replace(f"{judge_dir}{os.sep}", "").replace(f"{judge_dir}: ", "")
                raise JudgeLoadError(f"{found.uri}{alias} in the MLflow registry at {redact_uri(tracking_uri)} "
                                     f"will not load: {reason}") from exc
    path = Path(model_uri.removeprefix("file://"))
    if not path.is_dir():
        raise _not_a_judge(model_uri)
    return SmallJudge.load(path, batch_size=batch_size, backend=backend, embedder=embedder)


def ensure_champion(judge: "JudgeConfig", tracking_uri: str, data_dir, *, console=None, seed: int = 0) -> str:
    """The champion judge's URI; if the registry has none yet, train a quick one from `data_dir` first (demo)."""
    from evaluators import judge_registry as reg

    name = judge.registered_name
    found = reg.find_alias(tracking_uri, name, reg.CHAMPION)
    if found is not None:
        return f"{found.uri} (champion)"
    from evaluators.judge_training import train_judge

    if console is not None:
        console.print(f"no champion judge '{name}' yet: training a quick one from {data_dir}")
    result = train_judge(data_dir, tracking_uri, quick=True, seed=seed, registered_name=name)
    return (f"{result.model_uri} ({result.alias}, trained in {result.duration_s:.0f} s; held-out agreement "
            f"{result.metrics['agreement']:.3f}, length baseline {result.metrics['baseline_agreement']:.3f})")
