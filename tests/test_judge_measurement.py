"""How a judge is measured and chosen, with stand-in judges (no encoder, no training): which judge wins a contest,
which pairs and models the figures rest on, and what a report says when figures cannot be computed."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from evaluators.encoder import EncoderSettings
from evaluators.judge_training import HeadConfig, TrainSettings, evaluate_judge
from evaluators.preference_data import REFERENCE_MODEL, ModelSplit, load_preference_data

RANKS = {"spearman_win_rate": 0.791, "spearman_lc_win_rate": 0.782, "agreement": 0.837}
# The reviewer's case on the mini set: a collapsed judge (0.5 for every pair, so every win rate tied and Spearman
# undefined) still agrees with every label that prefers model_a, about as often as a judge that ranks models.
FLAT = {"spearman_win_rate": float("nan"), "spearman_lc_win_rate": float("nan"), "agreement": 0.818}


class LengthJudge:
    """Prefers the longer answer, softly: a judge with nothing behind it, so reports can be checked in milliseconds."""

    spec = SimpleNamespace(trained_models=[])

    def compare(self, prompts, incumbent, candidate):
        return [1 / (1 + math.exp((len(a) - len(b)) / 40)) for a, b in zip(incumbent, candidate)]


def _write_set(root: Path, models: dict[str, int], leaderboard: dict[str, float], *, reference: bool = True,
               repeat_labels_of: str = "") -> Path:
    """An AlpacaEval-format directory: 12 prompts, each model's answers of about `models[m]` characters, labels
    against the reference that prefer the longer answer, and the given leaderboard rows."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = [f"p{i}" for i in range(12)]
    lengths = {REFERENCE_MODEL: 100, **models} if reference else models
    outputs = [{"prompt_id": p, "model": m, "output": "x" * (n + 7 * i)} for i, p in enumerate(prompts)
               for m, n in lengths.items()]
    labels = [{"prompt_id": p, "model_a": REFERENCE_MODEL, "model_b": m, "p_b_better": 0.9 if n + 7 * i > 100 else 0.1,
               "annotator": "t"} for i, p in enumerate(prompts) for m, n in models.items()]
    labels += [row for row in labels if row["model_b"] == repeat_labels_of]
    for name, rows in (("prompts", [{"id": p, "instruction": f"question {p}"} for p in prompts]),
                       ("outputs", outputs), ("labels", labels)):
        with gzip.open(root / f"{name}.jsonl.gz", "wt") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    board = "".join(f"{m},{wr},{wr}\n" for m, wr in leaderboard.items())
    (root / "leaderboard.csv").write_text("model,win_rate,lc_win_rate\n" + board)
    return root


MODELS = {"short": 40, "medium": 90, "long": 160, "longer": 220}
BOARD = {"short": 5.0, "medium": 20.0, "long": 40.0, "longer": 60.0}


def test_a_judge_that_ranks_beats_one_that_cannot_whatever_its_agreement():
    from evaluators.judge_training import _beats

    assert not _beats(FLAT, RANKS) and _beats(RANKS, FLAT)
    assert _beats({**RANKS, "spearman_win_rate": -0.9, "spearman_lc_win_rate": -0.9}, FLAT)  # finite side wins
    assert _beats({**FLAT, "agreement": 0.9}, FLAT)  # neither ranks (no leaderboard): pair agreement decides
    assert not _beats(RANKS, RANKS)  # a tie keeps the champion


def test_head_selection_does_not_pick_a_head_that_cannot_rank(tmp_path, monkeypatch):
    import evaluators.judge_experiments as experiments
    from evaluators.judge_registry import tracking
    from evaluators.judge_training import _select_head

    figures = {"flat": FLAT, "ranks": RANKS}
    monkeypatch.setattr(experiments, "cross_validate", lambda data, emb, config, *a, **k: figures[config.name])
    data = load_preference_data(_write_set(tmp_path / "set", MODELS, BOARD))
    split = ModelSplit(("short", "medium", "long"), ("longer",))
    settings = TrainSettings(encoder=EncoderSettings(max_tokens=32), selection_folds=3,
                             heads=(HeadConfig("flat"), HeadConfig("ranks")))
    with tracking(f"sqlite:///{tmp_path}/mlflow.db"):
        chosen = _select_head(data, None, split, split, None, settings, None, 0, None, "set")
    assert chosen.name == "ranks"


def test_a_heldout_model_that_is_model_a_of_a_pair_is_not_recorded_as_trained_on(tmp_path):
    from evaluators.answer_features import answer_features
    from evaluators.judge_training import EmbeddedAnswers, fit_head
    from evaluators.preference_data import split_by_model

    data = load_preference_data(_write_set(tmp_path / "set", MODELS, BOARD))
    split = split_by_model(data, 0.25, seed=0)
    held = split.heldout_models[0]
    promoted = [replace(p, model_a=held, model_b=split.train_models[0]) for p in data.pairs if p.model_b == held]
    data = replace(data, pairs=data.pairs + promoted)  # yesterday's candidate is today's incumbent
    assert split_by_model(data, 0.25, seed=0) == split
    keys = sorted(data.outputs)
    prompts, answers = [data.prompts[p] for p, _ in keys], [data.outputs[k] for k in keys]
    vectors = np.random.default_rng(0).normal(size=(len(keys), 384)).astype(np.float32)
    emb = EmbeddedAnswers({k: i for i, k in enumerate(keys)}, prompts, answers, vectors, vectors,
                          answer_features(prompts, answers, use_length=True), np.asarray([len(a) for a in answers]))
    spec, _ = fit_head(emb, split.train_pairs(data), HeadConfig("tiny", hidden=8, epochs=1), EncoderSettings(), 0)
    assert set(spec.trained_models) == {REFERENCE_MODEL, *split.train_models}


def test_models_without_a_leaderboard_row_get_a_win_rate_but_stay_out_of_the_spearman(tmp_path):
    report = evaluate_judge(LengthJudge(), _write_set(tmp_path / "set", {**MODELS, "newcomer": 120}, BOARD))
    assert set(report["win_rates"]) == {*MODELS, "newcomer"}
    newcomer = report["win_rates"]["newcomer"]
    assert newcomer["leaderboard_win_rate"] is None and newcomer["leaderboard_lc_win_rate"] is None
    assert 0 <= newcomer["judge"] <= 100 and 0 <= newcomer["judge_length_controlled"] <= 100
    assert report["system"]["n_models"] == 4 and report["system"]["spearman_win_rate"] == pytest.approx(1.0)
    assert any("no leaderboard row for 1 measured models" in w and "newcomer" in w for w in report["warnings"])


def test_a_set_without_the_reference_says_why_its_figures_are_missing(tmp_path):
    report = evaluate_judge(LengthJudge(), _write_set(tmp_path / "set", MODELS, BOARD, reference=False))
    assert "system" not in report and report["instance"]["n"] == 0
    assert report["label_rows_without_answers"] == {"no output of model_a": 48}
    assert f"no outputs of the reference model {REFERENCE_MODEL}: system-level win rates cannot be computed" in \
        report["warnings"]
    assert any(w.startswith("48 label rows skipped") for w in report["warnings"])
    assert any("pair agreement cannot be computed" in w for w in report["warnings"])


def test_a_complete_set_has_no_warnings(tmp_path):
    report = evaluate_judge(LengthJudge(), _write_set(tmp_path / "set", MODELS, BOARD))
    assert report["warnings"] == [] and report["label_rows_without_answers"] == {}
    assert report["duplicate_label_rows_skipped"] == 0 and report["system"]["n_models"] == 4


def test_repeated_label_rows_count_once_in_the_figures_and_are_reported(tmp_path):
    distinct = evaluate_judge(LengthJudge(), _write_set(tmp_path / "distinct", MODELS, BOARD))
    repeated = evaluate_judge(LengthJudge(), _write_set(tmp_path / "repeated", MODELS, BOARD,
                                                        repeat_labels_of="long"))
    assert repeated["instance"] == distinct["instance"]
    assert repeated["duplicate_label_rows_skipped"] == 12
    assert "12 label rows repeat an earlier row and were counted once" in repeated["warnings"]
