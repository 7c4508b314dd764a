"""Training labels from production: the teacher judges a seeded sample of a route's stored shadow pairs, and the
pairs are written as an AlpacaEval-format directory that `shadowjudge judge train --data DIR` reads.

A pair is the production answer (model_a: the incumbent model) against a candidate's shadow answer (model_b: the
model the target serves). Both sides name a model by the one name `model_names` gives it, so a candidate promoted
to incumbent stays one model and a split by model holds it out on both sides. Teacher verdicts are stored as
`Judgment` rows under the teacher's version (role "label"), so a rerun, or a larger sample later, pays only for pairs
the teacher has not judged yet; verdicts calibration already bought are reused too. Prompt ids hash the request id,
so two requests with the same text stay two prompts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select

from evaluators.calibration import LABEL_ROLE, TeacherTask, judge_and_store, readable_preference
from evaluators.preference_data import PreferenceDataError
from shadowjudge.config import logged_name_matches
from shadowjudge.store import Judgment, ShadowResult, TrafficSample, session_scope

if TYPE_CHECKING:
    from evaluators.llm_judge import LlmJudge
    from shadowjudge.config import TargetConfig


@dataclass(frozen=True)
class TrafficLabelReport:
    directory: str
    route: str
    teacher: str
    available_pairs: int
    pairs: int
    teacher_calls: int
    reused_verdicts: int
    models: list[str]
    unusable_verdicts: int = 0  # neither answer order gave a verdict the teacher's reply could be read as: null

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StoredPair:
    """One labellable pair, without its texts (a route can hold millions; only the chosen ones are read)."""

    result_id: int
    run_id: int
    sample_id: int
    request_id: str
    target: str
    model: str  # the model the target served, as stored with its answer
    incumbent_model: str  # the model that answered in production, named as `model_names` names it

    @property
    def key(self) -> tuple[int, int, str]:
        return self.run_id, self.sample_id, self.target


@dataclass(frozen=True)
class _Texts:
    prompt: str
    incumbent: str
    candidate: str


def _label_order(seed: int, request_id: str, target: str) -> bytes:
    return hashlib.sha256(f"label:{seed}:{request_id}:{target}".encode()).digest()


def model_names(logged: Iterable[str], stored: Iterable[str],
                targets: Sequence["TargetConfig"] = ()) -> dict[str, str]:
    """The name labels give each model a gateway `logged` as the incumbent: the model of the one configured target
    it is logged as (its model, name or `logged_as`), else the one `stored` shadow model it names (exactly, else
    ignoring case and a provider prefix), else the logged name. Candidates are named by their stored model, so
    after a promotion the incumbent's logs and its earlier shadow answers are one model, not two."""
    stored = set(stored)
    names: dict[str, str] = {}
    for name in set(logged):
        configured = {t.model for t in targets if t.logged_as_this(name)}
        matching = {name} if name in stored else {m for m in stored if logged_name_matches(name, m)}
        found = configured if len(configured) == 1 else matching
        names[name] = found.pop() if len(found) == 1 else name
    return names


def stored_pairs(engine: Engine, route: str, targets: Sequence["TargetConfig"] = ()) -> list[StoredPair]:
    """Every (sample, model) of the route with both answers, from the latest run that answered it; `targets` (the
    route's, from its config) tell which model each name in the gateway's logs is."""
    with session_scope(engine) as s:
        rows = s.execute(
            select(ShadowResult.id, ShadowResult.run_id, ShadowResult.sample_id, ShadowResult.target,
                   ShadowResult.model, TrafficSample.request_id, TrafficSample.incumbent_model)
            .join(TrafficSample, TrafficSample.id == ShadowResult.sample_id)
            .where(TrafficSample.route == route, ShadowResult.attempt == 0, ShadowResult.error_class.is_(None),
                   ShadowResult.output_text.is_not(None), TrafficSample.response_text.is_not(None))
            .order_by(ShadowResult.run_id, ShadowResult.id)
        ).all()
    names = model_names({r.incumbent_model for r in rows}, {r.model for r in rows}, targets)
    # The incumbent's own replay (a target serving the model that answered in production, however the log spells
    # it) is no comparison: the teacher would be paid to judge the model against itself. Keyed by model: two targets
    # serving one model would put two answers under one (prompt, model) name, so the later one is kept.
    latest = {(r.sample_id, r.model): r for r in rows
              if not logged_name_matches(r.incumbent_model, r.model) and names[r.incumbent_model] != r.model}
    return [StoredPair(r.id, r.run_id, r.sample_id, r.request_id, r.target, r.model, names[r.incumbent_model])
            for r in latest.values()]


def _read_texts(engine: Engine, pairs: list[StoredPair], chunk: int = 500) -> dict[int, _Texts]:
    from shadowjudge.scoring import prompt_text

    texts: dict[int, _Texts] = {}
    ids = [p.result_id for p in pairs]
    with session_scope(engine) as s:
        for start in range(0, len(ids), chunk):
            for r in s.execute(select(ShadowResult.id, ShadowResult.output_text, TrafficSample.messages,
                                      TrafficSample.response_text)
                               .join(TrafficSample, TrafficSample.id == ShadowResult.sample_id)
                               .where(ShadowResult.id.in_(ids[start:start + chunk]))):
                texts[r.id] = _Texts(prompt_text(r.messages), r.response_text, r.output_text)
    return texts


def label_stored_traffic(engine: Engine, route: str, teacher: "LlmJudge", out_dir: str | Path, *,
                         max_pairs: int = 2000, seed: int = 0, batch_size: int = 16,
                         progress: Callable[[str, int, int], None] | None = None,
                         targets: Sequence["TargetConfig"] = ()) -> TrafficLabelReport:
    """Judge up to `max_pairs` of the route's stored pairs with the teacher and write them to `out_dir`
    (`targets`: the route's configured targets, whose `logged_as` names the logged incumbent's model)."""
    if max_pairs < 1:
        raise PreferenceDataError(f"max_pairs must be at least 1, got {max_pairs}")
    _check_output_directory(Path(out_dir))
    available = stored_pairs(engine, route, targets)
    if not available:
        raise PreferenceDataError(f"route '{route}' has no stored shadow answers to label: run a cycle first")
    chosen = sorted(available, key=lambda p: _label_order(seed, p.request_id, p.target))[:max_pairs]
    verdicts = _stored_verdicts(engine, teacher.version)
    reused = sum(p.key in verdicts for p in chosen)
    todo = [p for p in chosen if p.key not in verdicts]
    texts = _read_texts(engine, chosen)
    tasks = [TeacherTask(*p.key, texts[p.result_id].prompt, texts[p.result_id].incumbent,
                         texts[p.result_id].candidate) for p in todo]
    verdicts.update(judge_and_store(engine, teacher, tasks, {"role": LABEL_ROLE}, batch_size=batch_size,
                                    progress=progress and (lambda done, total: progress("teacher", done, total))))
    models = _write_directory(Path(out_dir), chosen, texts, verdicts, teacher.version)
    return TrafficLabelReport(str(out_dir), route, teacher.version, len(available), len(chosen), len(todo), reused,
                              models, unusable_verdicts=sum(verdicts[p.key] is None for p in chosen))


def _stored_verdicts(engine: Engine, teacher_version: str) -> dict[tuple[int, int, str], float | None]:
    """Every stored verdict of this teacher, by (run, sample, target), as `readable_preference` gives it (None, not
    a tie that would train the judge towards 0.5, where no order could be read). Keyed by run too: a later run
    may have answered the same request differently, and a verdict is about answers."""
    with session_scope(engine) as s:
        stored = s.execute(select(Judgment.run_id, Judgment.sample_id, Judgment.target, Judgment.preference,
                                  Judgment.details)
                           .where(Judgment.evaluator == teacher_version, Judgment.preference.is_not(None))
                           .order_by(Judgment.id)).all()
    return {(r.run_id, r.sample_id, r.target): readable_preference(r.preference, r.details) for r in stored}


def label_route_traffic(config_path: str | Path, out_dir: str | Path, *, route: str | None = None,
                        max_pairs: int = 2000, seed: int = 0,
                        progress: Callable[[str, int, int], None] | None = None) -> TrafficLabelReport:
    """`label_stored_traffic` as a config file describes it: its store, its teacher (judge.teacher) and its route
    (the only one when `route` is not given). The CLI command and the training flow both start here."""
    from evaluators.llm_judge import LlmJudge
    from shadowjudge.config import ConfigError, load_config
    from shadowjudge.store import initialised_engine

    config = load_config(config_path)
    if config.judge.teacher is None:
        raise ConfigError(f"{config_path}: judge.teacher is not set; the teacher is the LLM judge that labels pairs")
    if route is None and len(config.routes) != 1:
        raise ConfigError(f"name a route: the config has {len(config.routes)} "
                          f"({', '.join(r.name for r in config.routes)})")
    chosen = config.route(route) if route else config.routes[0]
    return label_stored_traffic(initialised_engine(config.store.url), chosen.name,
                                LlmJudge.from_target(config.judge.teacher), out_dir, max_pairs=max_pairs, seed=seed,
                                progress=progress, targets=chosen.targets)


LABEL_FILES = ("prompts.jsonl.gz", "outputs.jsonl.gz", "labels.jsonl.gz")


def _check_output_directory(out: Path) -> None:
    """Refuse, before the teacher is paid, a directory holding anything but an earlier run's files: its other files
    (an AlpacaEval copy's leaderboard.csv, say) would be read with the new labels as one set."""
    if out.exists() and not out.is_dir():
        raise PreferenceDataError(f"{out}: exists and is not a directory")
    ours = {*LABEL_FILES, *(str(Path(name).with_suffix(".tmp")) for name in LABEL_FILES)}  # .tmp: an interrupted write
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        raise PreferenceDataError(f"{out}: holds files label-traffic did not write ({', '.join(others[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}); use an empty directory")


def _write_directory(out: Path, pairs: list[StoredPair], texts: dict[int, _Texts],
                     verdicts: dict[tuple[int, int, str], float | None], annotator: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    prompts: dict[str, str] = {}
    outputs: dict[tuple[str, str], str] = {}
    labels = []
    for p in sorted(pairs, key=lambda p: (p.request_id, p.model)):
        pid = hashlib.sha1(p.request_id.encode()).hexdigest()[:12]
        text = texts[p.result_id]
        prompts[pid] = text.prompt
        outputs[(pid, p.incumbent_model)] = text.incumbent
        outputs[(pid, p.model)] = text.candidate
        labels.append({"prompt_id": pid, "model_a": p.incumbent_model, "model_b": p.model,
                       "p_b_better": verdicts[p.key], "annotator": annotator})
    _write_jsonl(out / "prompts.jsonl.gz", [{"id": k, "dataset": "traffic", "instruction": v}
                                            for k, v in prompts.items()])
    _write_jsonl(out / "outputs.jsonl.gz", [{"prompt_id": k[0], "model": k[1], "output": v}
                                            for k, v in outputs.items()])
    _write_jsonl(out / "labels.jsonl.gz", labels)
    return sorted({m for _, m in outputs})


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp.replace(path)


__all__ = ["LABEL_ROLE", "StoredPair", "TrafficLabelReport", "label_route_traffic", "label_stored_traffic",
           "model_names", "stored_pairs"]
