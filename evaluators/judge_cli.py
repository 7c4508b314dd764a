"""`shadowjudge judge ...`: train the small judge and measure it, from one command each.

The lead mounts `judge_cli` under the main CLI; it also runs alone: `python -m evaluators.judge_cli train --quick`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import typer

from shadowjudge.subcommands import ConfigOption, fail

DEFAULT_TRACKING_URI = "sqlite:///.shadowjudge/mlflow.db"

judge_cli = typer.Typer(help="Train, register and measure the small judge.", no_args_is_help=True,
                        pretty_exceptions_enable=False, add_completion=False)


def tracking_uri_default(explicit: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the local SQLite store ShadowJudge uses by default."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def plain_progress(stream: TextIO, every_s: float = 10.0) -> Callable[[str, int, int], None]:
    """Progress as plain lines (a log file shows no live bar): a stage's start, its end, and every `every_s`."""
    started = time.monotonic()
    last: dict[str, float] = {}

    def update(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        first = stage not in last
        if first or done >= total or now - last[stage] >= every_s:
            last[stage] = now
            pct = 100.0 * done / total if total else 100.0
            stream.write(f"[{now - started:7.1f} s] {stage}: {done}/{total} ({pct:.0f}%)\n")
            stream.flush()

    return update


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """A rich progress bar on stderr (stdout stays one JSON object), one line per stage; plain lines when stderr is
    not a terminal; a no-op when disabled."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        yield plain_progress(sys.stderr)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def writable_directory(path: Path, option: str) -> Path:
    """Create a directory a command will write into now, so a bad path fails before slow or paid work."""
    from shadowjudge.errors import InputError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot be used as a directory ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: directory is not writable")
    return path


def strict_json(value):
    """NaN (a figure with nothing to measure, e.g. agreement without labels) as null: strict JSON for jq and co."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


@judge_cli.command()
def train(
    data: list[Path] = typer.Option(None, metavar="DIR",
                                    help="AlpacaEval-format directory (default: the demo mini set with --quick, "
                                         "../shared/data/alpacaeval beside the checkout otherwise); repeat it to "
                                         "train on several as one set, e.g. the public set and label-traffic's"),
    quick: bool = typer.Option(False, "--quick", help="Small, fast judge for demos (~1 minute on 2 cores)"),
    seed: int = typer.Option(0, min=0, max=2 ** 32 - 1, help="Seed for the split and the training"),
    tracking_uri: str = typer.Option(None, help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI or "
                                                f"{DEFAULT_TRACKING_URI})"),
    registered_name: str = typer.Option("shadowjudge-judge", help="Registered model name"),
    cache_dir: Path = typer.Option(Path(".shadowjudge/cache"), help="Embedding cache (gitignored)"),
    progress: bool = typer.Option(True, help="Show a progress bar"),
    no_contest: bool = typer.Option(False, "--no-contest",
                                    help="Crown the new judge without measuring the current champion against it "
                                         "(e.g. a champion whose files are gone); never one without held-out "
                                         "figures"),
) -> None:
    """Train a judge, measure it on held-out models, register it (champion only if it beats the current one)."""
    from evaluators.judge_training import train_judge
    from evaluators.preference_data import FULL_DATA, MINI_DATA
    from shadowjudge.errors import ShadowJudgeError

    data = data or [MINI_DATA if quick else FULL_DATA]
    try:
        writable_directory(cache_dir, "--cache-dir")
        with progress_bar(progress) as update:
            result = train_judge(data, tracking_uri_default(tracking_uri), quick=quick, seed=seed,
                                 registered_name=registered_name, cache_dir=cache_dir, progress=update,
                                 contest=not no_contest)
    except ShadowJudgeError as exc:
        fail(exc)
    typer.echo(json.dumps(strict_json(result.as_dict()), indent=2, sort_keys=True, default=str))


@judge_cli.command()
def evaluate(
    data: Path = typer.Option(..., help="AlpacaEval-format directory; only models the judge never trained on count"),
    model_uri: str = typer.Option(None, help="models:/name@alias, models:/name/version or a judge directory "
                                             "(default: the champion)"),
    prompts: int = typer.Option(None, help="Score a fixed, seeded subset of N prompts"),
    seed: int = typer.Option(0),
    include_seen: bool = typer.Option(False, "--include-seen", help="Also measure models the judge trained on"),
    tracking_uri: str = typer.Option(None, help="MLflow tracking/registry URI"),
    registered_name: str = typer.Option("shadowjudge-judge"),
    progress: bool = typer.Option(True),
) -> None:
    """Measure a judge against the labels and leaderboard in a directory; prints one JSON object."""
    from evaluators.factory import load_small_judge
    from evaluators.judge_registry import resolve
    from evaluators.judge_training import evaluate_judge
    from shadowjudge.errors import ShadowJudgeError

    uri = tracking_uri_default(tracking_uri)
    model_uri = model_uri or f"models:/{registered_name}@champion"
    try:
        if model_uri.startswith("models:/"):  # resolved here so a missing judge's hint names this command's option
            resolve(uri, model_uri, instead="pass --model-uri")
        judge = load_small_judge(model_uri, uri)  # an error names the version and the alias it was found by
        with progress_bar(progress) as update:
            report = evaluate_judge(judge, data, prompts=prompts, seed=seed, include_seen=include_seen,
                                    progress=update)
    except ShadowJudgeError as exc:  # a judge that will not load (JudgeLoadError) printed a traceback
        fail(exc)
    typer.echo(json.dumps(strict_json({"judge": judge.version, **report}), indent=2, sort_keys=True))


@judge_cli.command("label-traffic")
def label_traffic(
    out: Path = typer.Option(..., help="Directory to write (AlpacaEval format: prompts, outputs, labels)"),
    config: Path = ConfigOption,
    route: str = typer.Option(None, help="Route whose stored pairs to label (default: the config's only route)"),
    max_pairs: int = typer.Option(2000, help="Label at most this many pairs, a seeded sample"),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True),
) -> None:
    """Have the teacher (judge.teacher) label a sample of stored shadow pairs, for `judge train --data OUT`."""
    from evaluators.traffic_labels import label_route_traffic
    from shadowjudge.errors import ShadowJudgeError

    try:
        writable_directory(out, "--out")
        with progress_bar(progress) as update:
            report = label_route_traffic(config, out, route=route, max_pairs=max_pairs, seed=seed, progress=update)
    except ShadowJudgeError as exc:
        fail(exc)
    typer.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))


if __name__ == "__main__":
    judge_cli()
