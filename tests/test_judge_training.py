"""The small judge end to end: a tiny judge trained on real AlpacaEval answers in seconds, registered in a real
MLflow store, loaded back through load_evaluator, and measured on models it never saw."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from evaluators import Evaluator, load_evaluator
from evaluators.encoder import EncoderSettings
from evaluators.judge_registry import CHAMPION, JudgeRegistryError, find_alias
from evaluators.judge_training import HeadConfig, TrainSettings, train_judge
from evaluators.preference_data import load_preference_data, split_by_model
from shadowjudge.config import JudgeConfig

MINI = Path(__file__).resolve().parent.parent / "shadowjudge" / "demo_data" / "alpacaeval-mini"
TINY = TrainSettings(encoder=EncoderSettings(max_tokens=32, num_layers=2),
                     heads=(HeadConfig("tiny", epochs=20, hidden=32),), heldout_fraction=0.3,
                     validation_fraction=0.0)


def write_subset(src: Path, dst: Path, n_prompts: int) -> Path:
    """An AlpacaEval-format copy of the first n prompts of `src` (all models, labels, leaderboard)."""
    dst.mkdir(parents=True, exist_ok=True)
    rows = {name: [json.loads(line) for line in gzip.open(src / f"{name}.jsonl.gz", "rt")]
            for name in ("prompts", "outputs", "labels")}
    keep = {p["id"] for p in sorted(rows["prompts"], key=lambda p: p["id"])[:n_prompts]}
    for name, key in (("prompts", "id"), ("outputs", "prompt_id"), ("labels", "prompt_id")):
        with gzip.open(dst / f"{name}.jsonl.gz", "wt") as fh:
            for row in rows[name]:
                if row[key] in keep:
                    fh.write(json.dumps(row) + "\n")
    (dst / "leaderboard.csv").write_text((src / "leaderboard.csv").read_text())
    return dst


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_subset(MINI, tmp_path_factory.mktemp("data") / "tiny", 60)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHADOWJUDGE_CACHE_DIR", str(root / "onnx-cache"))  # the served judge's ONNX export
        result = train_judge(tiny_data, uri, quick=True, seed=0, registered_name="tiny-judge", settings=TINY,
                             cache_dir=root / "cache")
        yield uri, root, result


def test_tiny_judge_beats_chance_on_heldout_models(trained, tiny_data):
    _, _, result = trained
    data = load_preference_data(tiny_data)
    trained_models = {p.model_b for p in data.pairs} - set(result.heldout_models)
    assert result.heldout_models and not (set(result.heldout_models) & trained_models)
    assert result.metrics["n"] >= 100
    assert result.metrics["agreement"] > 0.6, result.metrics


def test_first_judge_becomes_champion_and_loads_through_the_factory(trained):
    uri, _, result = trained
    assert result.alias == CHAMPION and result.version == "1"
    judge = load_evaluator(JudgeConfig(registered_name="tiny-judge"), uri)
    assert isinstance(judge, Evaluator)
    assert judge.version == "small-judge:models:/tiny-judge/1"
    prompts = ["Name three primary colors."] * 2
    short, full = "Red.", "The three primary colors are red, yellow and blue (RYB), or red, green and blue for light."
    scores = judge.score(prompts, [short, full])
    prefs = judge.compare(prompts, [short, full], [full, short])
    assert all(0.0 <= x <= 1.0 for x in scores + prefs)
    assert prefs[0] == pytest.approx(1.0 - prefs[1], abs=1e-9)  # r_b - r_a is antisymmetric


def test_retraining_the_same_judge_does_not_dethrone_the_champion(trained, tiny_data):
    uri, root, first = trained
    again = train_judge(tiny_data, uri, quick=True, seed=0, registered_name="tiny-judge", settings=TINY,
                        cache_dir=root / "cache")
    assert again.metrics["agreement"] == pytest.approx(first.metrics["agreement"])  # seeded: same judge
    assert again.champion_metrics is not None
    assert again.alias == "challenger" and again.version == "2"
    assert find_alias(uri, "tiny-judge", CHAMPION).version == "1"


def test_missing_champion_says_how_to_train_one(tmp_path):
    with pytest.raises(JudgeRegistryError, match="shadowjudge judge train"):
        load_evaluator(JudgeConfig(registered_name="never-trained"), f"sqlite:///{tmp_path}/mlflow.db")


def test_split_is_by_model_and_seeded(tiny_data):
    data = load_preference_data(tiny_data)
    a, b = split_by_model(data, 0.3, seed=7), split_by_model(data, 0.3, seed=7)
    assert a == b
    assert not set(a.train_models) & set(a.heldout_models)
    assert {p.model_b for p in a.heldout_pairs(data)} == set(a.heldout_models)
