"""Labelled answer pairs in AlpacaEval format, and the by-model split that keeps evaluation honest.

A directory holds `prompts.jsonl.gz` ({id, instruction}), `outputs.jsonl.gz` ({prompt_id, model, output}),
`labels.jsonl.gz` ({prompt_id, model_a, model_b, p_b_better, annotator}) and optionally `leaderboard.csv`
(model, win_rate, lc_win_rate, ...). Splits are by model: a judge measured on prompts it saw with other models'
answers would look better than it is on a new model.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shadowjudge.errors import InputError

REFERENCE_MODEL = "gpt4_1106_preview"
# The demo subset shipped in the package, and the full set in ../shared beside the checkout.
MINI_DATA = Path(__file__).resolve().parent.parent / "shadowjudge" / "demo_data" / "alpacaeval-mini"
FULL_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "alpacaeval"


class PreferenceDataError(InputError):
    """A data directory that is missing files or has malformed rows; the message names file and line."""


@dataclass(frozen=True)
class LabelledPair:
    prompt_id: str
    model_a: str
    model_b: str
    p_b_better: float
    annotator: str = ""


@dataclass(frozen=True)
class LeaderboardRow:
    model: str
    win_rate: float
    lc_win_rate: float | None


@dataclass
class PreferenceData:
    """Prompts, every model's outputs, judge labels and (optionally) the published leaderboard."""

    prompts: dict[str, str]
    outputs: dict[tuple[str, str], str]
    pairs: list[LabelledPair]
    leaderboard: dict[str, LeaderboardRow] = field(default_factory=dict)
    source: str = ""
    # Label rows read but not used, counted over the whole files (also after restrict_prompts): a report must say why
    # it measured fewer pairs than the labels file has.
    unlabelled_rows: int = 0  # without a preference (null or NaN)
    duplicate_label_rows: int = 0  # repeating an earlier row's prompt, models, annotator and label
    rows_without_answers: dict[str, int] = field(default_factory=dict)  # by reason: an answer is not in outputs

    def models(self) -> list[str]:
        return sorted({m for _, m in self.outputs})

    def judged_models(self) -> list[str]:
        """Models that appear as `model_b` (the judged side) of some pair."""
        return sorted({p.model_b for p in self.pairs})

    def answer(self, prompt_id: str, model: str) -> str:
        return self.outputs[(prompt_id, model)]

    def restrict_prompts(self, prompt_ids: Sequence[str]) -> "PreferenceData":
        keep = set(prompt_ids)
        return replace(self, prompts={k: v for k, v in self.prompts.items() if k in keep},
                       outputs={k: v for k, v in self.outputs.items() if k[0] in keep},
                       pairs=[p for p in self.pairs if p.prompt_id in keep])

    def sample_prompts(self, n: int, seed: int) -> "PreferenceData":
        """A fixed, seeded subset of `n` prompts (all of them if n >= the number of prompts)."""
        if n < 1:
            raise PreferenceDataError(f"the number of prompts to sample must be at least 1, got {n}")
        ids = sorted(self.prompts)
        if n >= len(ids):
            return self
        return self.restrict_prompts(random.Random(seed).sample(ids, n))


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise PreferenceDataError(f"{path}: file not found (an AlpacaEval-format directory needs it)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # utf-8-sig: a file saved with a byte-order mark (Excel, pandas' "utf-8-sig") reads like one without
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PreferenceDataError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
                except RecursionError:
                    raise PreferenceDataError(f"{path}:{lineno}: not valid JSON: nested too deeply") from None
                if not isinstance(row, dict):
                    raise PreferenceDataError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise PreferenceDataError(f"{path}: cannot read: {exc}") from None


def _field(row: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in row:
        raise PreferenceDataError(f"{where}: no field '{key}' (fields: {', '.join(map(str, row))[:120] or 'none'})")
    value = row[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise PreferenceDataError(f"{where}: field '{key}' is too large for a number") from None
    if not isinstance(value, kind):
        raise PreferenceDataError(f"{where}: field '{key}' must be {kind.__name__}, got {value!r:.60}")
    return value


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (directory / name).exists():
            return directory / name
    return directory / f"{stem}.jsonl.gz"


def load_preference_data(directory: str | Path, *, require_labels: bool = True) -> PreferenceData:
    """Read an AlpacaEval-format directory; raises PreferenceDataError naming the file and line of bad input."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PreferenceDataError(f"{directory}: not a directory")
    prompts: dict[str, str] = {}
    path = _find(directory, "prompts")
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        prompts[_field(row, "id", str, where)] = _field(row, "instruction", str, where)
    outputs: dict[tuple[str, str], str] = {}
    path = _find(directory, "outputs")
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        pid = _field(row, "prompt_id", str, where)
        if pid not in prompts:
            raise PreferenceDataError(f"{where}: prompt_id '{pid}' is not in prompts")
        output = row.get("output")
        outputs[(pid, _field(row, "model", str, where))] = output if isinstance(output, str) else ""
    if not outputs:
        raise PreferenceDataError(f"{directory}: no model outputs in {path.name}; nothing to judge")
    data = PreferenceData(prompts, outputs, [], _read_leaderboard(directory / "leaderboard.csv"), str(directory))
    path = _find(directory, "labels")
    if path.exists() or require_labels:
        _read_labels(path, data)
    return data


def _read_labels(path: Path, data: PreferenceData) -> None:
    """Add the usable label rows of `path` to `data.pairs` and count the others.

    A repeated row is one judgment, counted once (copies would weigh a pair twice); a repeat with another label is
    not a copy but a contradiction, refused."""
    first_seen: dict[tuple[str, str, str, str], tuple[float, int]] = {}
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        # A row without the fields (other column names) is malformed; only a present null / NaN is unlabelled.
        names = [_field(row, key, str, where) for key in ("prompt_id", "model_a", "model_b")]
        if "p_b_better" not in row:
            _field(row, "p_b_better", float, where)
        if _is_missing(row["p_b_better"]):  # AlpacaEval keeps rows its annotator could not parse
            data.unlabelled_rows += 1
            continue
        pair = LabelledPair(*names, p_b_better=_field(row, "p_b_better", float, where),
                            annotator=str(row.get("annotator") or ""))
        if not 0.0 <= pair.p_b_better <= 1.0:
            raise PreferenceDataError(f"{where}: p_b_better must be in [0, 1], got {pair.p_b_better}")
        key = (pair.prompt_id, pair.model_a, pair.model_b, pair.annotator)
        if key in first_seen:
            label, first_line = first_seen[key]
            if label != pair.p_b_better:
                raise PreferenceDataError(f"{where}: p_b_better {pair.p_b_better} contradicts line {first_line}'s "
                                          f"{label} for the same prompt, models and annotator")
            data.duplicate_label_rows += 1
            continue
        first_seen[key] = (pair.p_b_better, lineno)
        reason = _missing_answer(pair, data)
        if reason:
            data.rows_without_answers[reason] = data.rows_without_answers.get(reason, 0) + 1
        else:
            data.pairs.append(pair)


def _missing_answer(pair: LabelledPair, data: PreferenceData) -> str:
    """Why a label row cannot be used (its prompt or one of its answers is not in the data), or ''."""
    if pair.prompt_id not in data.prompts:
        return "prompt_id not in prompts"
    for side, model in (("model_a", pair.model_a), ("model_b", pair.model_b)):
        if (pair.prompt_id, model) not in data.outputs:
            return f"no output of {side}"
    return ""


def load_preference_sets(directories: Sequence[str | Path]) -> PreferenceData:
    """Several AlpacaEval-format directories as one training set, e.g. a broad public set plus labels from the
    route's own traffic (`shadowjudge judge label-traffic`).

    Prompt ids of every directory after the first are prefixed with its position ("1:", "2:", ...), so two sources
    can never mix answers under one id; a model that appears in several directories stays one model, so the split by
    model holds it out everywhere. Leaderboard rows of a model in more than one directory must agree."""
    if not directories:
        raise PreferenceDataError("no data directory given")
    resolved = [Path(d).resolve() for d in directories]
    if len(set(resolved)) < len(resolved):
        twice = next(str(d) for d, r in zip(directories, resolved) if resolved.count(r) > 1)
        raise PreferenceDataError(f"{twice}: given more than once (its pairs would count twice)")
    parts = [load_preference_data(d) for d in directories]
    if len(parts) == 1:
        return parts[0]
    merged = PreferenceData({}, {}, [], {}, " + ".join(p.source for p in parts),
                            unlabelled_rows=sum(p.unlabelled_rows for p in parts),
                            duplicate_label_rows=sum(p.duplicate_label_rows for p in parts),
                            rows_without_answers=dict(sum((Counter(p.rows_without_answers) for p in parts),
                                                          Counter())))
    for position, part in enumerate(parts):
        prefix = f"{position}:" if position else ""
        for pid, text in part.prompts.items():
            if prefix + pid in merged.prompts:
                raise PreferenceDataError(f"{part.source}: prompt id '{prefix}{pid}' also comes from an earlier "
                                          "directory; rename it")
            merged.prompts[prefix + pid] = text
        merged.outputs.update({(prefix + pid, model): text for (pid, model), text in part.outputs.items()})
        merged.pairs += [replace(p, prompt_id=prefix + p.prompt_id) for p in part.pairs]
        for model, row in part.leaderboard.items():
            if merged.leaderboard.setdefault(model, row) != row:
                raise PreferenceDataError(f"{part.source}/leaderboard.csv: the row of '{model}' differs from an "
                                          "earlier directory's; keep one leaderboard per model")
    return merged


def _is_missing(value: Any) -> bool:
    """null, NaN or an empty / 'nan' string: a value the source left out, not a malformed one."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null")


LEADERBOARD_COLUMNS = ("model", "win_rate")  # lc_win_rate is optional


def _read_leaderboard(path: Path) -> dict[str, LeaderboardRow]:
    if not path.exists():
        return {}
    rows: dict[str, LeaderboardRow] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # a byte-order mark is not part of the header
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            absent = [column for column in LEADERBOARD_COLUMNS if column not in header]
            if absent:  # another file's columns would read as "listed, not ranked" and measure nothing
                raise PreferenceDataError(f"{path}:1: the header has no {' or '.join(map(repr, absent))} column "
                                          f"(it needs {', '.join(LEADERBOARD_COLUMNS)}; got {','.join(header)[:120]})")
            for lineno, row in enumerate(reader, 2):
                if None in row or None in row.values():  # DictReader's filler for extra / missing cells
                    raise PreferenceDataError(f"{path}:{lineno}: bad leaderboard row: {len(header)} columns in the "
                                              "header, another number of cells here")
                rows.update(_leaderboard_row(row, f"{path}:{lineno}", rows))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PreferenceDataError(f"{path}: cannot read: {exc}") from None
    return rows


def _leaderboard_row(row: dict[str, Any], where: str, seen: dict[str, LeaderboardRow]) -> dict[str, LeaderboardRow]:
    try:
        if _is_missing(row.get("win_rate")):  # listed but not ranked: no row to compare with
            return {}
        lc = row.get("lc_win_rate")
        found = LeaderboardRow(row["model"], float(row["win_rate"]), None if _is_missing(lc) else float(lc))
    except (KeyError, TypeError, ValueError) as exc:
        raise PreferenceDataError(f"{where}: bad leaderboard row: {exc}") from None
    if not all(math.isfinite(v) for v in (found.win_rate, found.lc_win_rate) if v is not None):
        raise PreferenceDataError(f"{where}: bad leaderboard row: win rates must be finite numbers")
    if found.model in seen and seen[found.model] != found:
        raise PreferenceDataError(f"{where}: '{found.model}' is listed twice with different win rates")
    return {found.model: found}


@dataclass(frozen=True)
class ModelSplit:
    train_models: tuple[str, ...]
    heldout_models: tuple[str, ...]

    def train_pairs(self, data: PreferenceData) -> list[LabelledPair]:
        return _pairs_among(data, self.train_models)

    def heldout_pairs(self, data: PreferenceData) -> list[LabelledPair]:
        return _pairs_among(data, self.heldout_models)


def _pairs_among(data: PreferenceData, models: Sequence[str]) -> list[LabelledPair]:
    """Pairs that judge one of `models` (model_b) against one of them or a reference (a model never judged).

    A judged model can be model_a too (traffic labels after a promotion: yesterday's candidate is today's incumbent);
    a pair that sets a model of the other side of the split against it would carry that model's answers across."""
    keep = set(models)
    other_side = set(data.judged_models()) - keep
    return [p for p in data.pairs if p.model_b in keep and p.model_a not in other_side]


def split_by_model(data: PreferenceData, heldout_fraction: float, seed: int) -> ModelSplit:
    """Hold out whole judged models (never prompts), on both sides of every pair; the references judged against
    (never judged themselves) stay on both sides of the split."""
    models = data.judged_models()
    if len(models) < 2:
        raise PreferenceDataError(f"{data.source}: need labels for at least 2 judged models to split, got {models}")
    n_heldout = min(len(models) - 1, max(1, round(len(models) * heldout_fraction)))
    heldout = sorted(random.Random(seed).sample(models, n_heldout))
    return ModelSplit(tuple(m for m in models if m not in heldout), tuple(heldout))
