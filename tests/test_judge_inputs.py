"""Training and measuring the judge on input that cannot give a judge: a champion that will not load, labels that
never say which answer is better, files with the wrong columns. Each fails before the slow work, with one message
that names what to fix, or, where a judge can be trained, never crowns one without figures."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evaluators.judge_cli import judge_cli
from evaluators.judge_registry import CHALLENGER, CHAMPION, find_alias, set_alias
from evaluators import judge_training
from evaluators.judge_training import train_judge
from evaluators.preference_data import REFERENCE_MODEL, PreferenceDataError, load_preference_data, split_by_model
from tests.test_judge_training import TINY, _register_random_judge, _run_bench, write_subset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from evaluators.preference_data import MINI_DATA

    return write_subset(MINI_DATA, tmp_path_factory.mktemp("data") / "tiny", 60)


def _relabel(src: Path, dst: Path, label) -> Path:
    """A copy of `src` whose label rows are rewritten by `label(row)` (a new p_b_better)."""
    write_subset(src, dst, 10 ** 6)
    with gzip.open(src / "labels.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    with gzip.open(dst / "labels.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({**row, "p_b_better": label(row)}) + "\n" for row in rows)
    return dst


@pytest.fixture
def no_embedding(monkeypatch):
    """Fails the test if training gets as far as embedding the answers (the slow part)."""
    def embed(*args, **kwargs):
        raise AssertionError("training started embedding answers")

    monkeypatch.setattr("evaluators.judge_training.embed_answers", embed)


@pytest.fixture
def broken_champion(tmp_path) -> str:
    """A registry whose champion, version 1 of 'j', lost its head.npz from the artifact store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    set_alias(uri, _register_random_judge(uri, "j", 0, tmp_path / "src"), CHAMPION)
    weights = [p for p in tmp_path.rglob("head.npz") if "src" not in p.parts]
    assert weights
    for path in weights:
        path.unlink()
    return uri


def test_a_champion_that_will_not_load_stops_training_before_it_starts(broken_champion, tiny_data, tmp_path,
                                                                        no_embedding):
    """It failed every training at the contest, after all the work (17 minutes in full), naming a deleted
    temporary directory instead of the registry version."""
    from mlflow.tracking import MlflowClient

    with pytest.raises(judge_training.ChampionUnusable) as caught:
        train_judge(tiny_data, broken_champion, quick=True, registered_name="j", settings=TINY,
                    cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith("models:/j/1 (champion) in the MLflow registry at ") and "missing head.npz" in message
    assert "--no-contest" in message and "/tmp" not in message.replace(str(tmp_path), "")
    assert caught.value.exit_code == 2
    assert MlflowClient(broken_champion).get_experiment_by_name("shadowjudge-judge-training") is None


def test_evaluate_names_the_registry_version_of_a_judge_that_will_not_load(broken_champion, tiny_data):
    done = CliRunner().invoke(judge_cli, ["evaluate", "--data", str(tiny_data), "--registered-name", "j",
                                          "--tracking-uri", broken_champion, "--no-progress"])
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output
    flat = " ".join(done.output.split())
    assert "models:/j/1 (champion)" in flat and "missing head.npz" in flat and "shadowjudge-judge-" not in flat


def test_no_contest_crowns_the_new_judge_over_a_champion_that_will_not_load(broken_champion, tiny_data, tmp_path,
                                                                            monkeypatch):
    given = {}
    monkeypatch.setattr(judge_training, "train_judge", lambda *args, **kwargs: given.update(kwargs) or None)
    CliRunner().invoke(judge_cli, ["train", "--data", str(tiny_data), "--no-contest", "--no-progress",
                                   "--cache-dir", str(tmp_path / "c")])
    assert given["contest"] is False
    monkeypatch.undo()
    result = train_judge(tiny_data, broken_champion, quick=True, registered_name="j", settings=TINY,
                         cache_dir=tmp_path / "cache", contest=False)
    assert result.alias == CHAMPION and result.version == "2" and result.champion_metrics is None
    assert "without a contest" in result.alias_reason
    assert find_alias(broken_champion, "j", CHAMPION).version == "2"


def test_labels_that_are_all_ties_are_refused_before_training(tiny_data, tmp_path, no_embedding):
    """A judge fitted on ties learned nothing, and with no champion it was crowned (agreement nan, n 0)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ties = _relabel(tiny_data, tmp_path / "ties", lambda row: 0.5)
    with pytest.raises(PreferenceDataError, match="every labelled pair is a tie"):
        train_judge(ties, uri, quick=True, registered_name="j", settings=TINY, cache_dir=tmp_path / "cache")
    heldout = set(split_by_model(load_preference_data(tiny_data), TINY.heldout_fraction, 0).heldout_models)
    decided_only_heldout = _relabel(tiny_data, tmp_path / "heldout-decided",
                                    lambda row: row["p_b_better"] if row["model_b"] in heldout else 0.5)
    with pytest.raises(PreferenceDataError, match="every label of the training models .* is a tie"):
        train_judge(decided_only_heldout, uri, quick=True, registered_name="j", settings=TINY,
                    cache_dir=tmp_path / "cache")
    assert find_alias(uri, "j", CHAMPION) is None


def test_a_judge_without_held_out_figures_is_never_crowned(tiny_data, tmp_path):
    """Decided labels for the training models, ties for the held-out ones: the judge trains, but its held-out
    agreement is undefined, and no champion to beat is no reason to crown it."""
    data = load_preference_data(tiny_data)
    heldout = set(split_by_model(data, TINY.heldout_fraction, 0).heldout_models)
    tied = _relabel(tiny_data, tmp_path / "tied-heldout",
                    lambda row: 0.5 if {row["model_a"], row["model_b"]} & heldout else row["p_b_better"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_judge(tied, uri, quick=True, registered_name="j", settings=TINY, cache_dir=tmp_path / "cache")
    assert set(result.heldout_models) == heldout
    assert result.metrics["n"] == 0 and result.metrics["agreement"] != result.metrics["agreement"]  # nan
    assert result.alias == CHALLENGER and "no finite held-out" in result.alias_reason
    assert find_alias(uri, "j", CHAMPION) is None


def test_the_bench_stops_on_labels_or_a_leaderboard_with_other_columns(tiny_data, tmp_path):
    """README: malformed input stops the bench with one line naming the file and line, exit 1 (it exited 0)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _register_random_judge(uri, "j", 0, tmp_path / "src")
    common = ("--model-uri", "models:/j/1", "--tracking-uri", uri)
    env = {"SHADOWJUDGE_CACHE_DIR": str(tmp_path / "onnx-cache")}
    columns = write_subset(tiny_data, tmp_path / "columns", 5)
    with gzip.open(columns / "labels.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"prompt": "x", "a": REFERENCE_MODEL, "b": "m", "pref": 0.9}) + "\n")
    board = write_subset(tiny_data, tmp_path / "board", 5)
    (board / "leaderboard.csv").write_text("name,score\nm,1\n")
    for directory, where in ((columns, "labels.jsonl.gz:1: no field 'prompt_id'"),
                             (board, "leaderboard.csv:1: the header has no 'model' or 'win_rate' column")):
        done = _run_bench("--data", str(directory), *common, env=env)
        assert done.returncode == 1 and where in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_evaluating_a_set_with_only_the_reference_model_says_so(tiny_data, tmp_path):
    from evaluators.judge_training import evaluate_judge

    only_reference = write_subset(tiny_data, tmp_path / "ref", 5)
    with gzip.open(tiny_data / "outputs.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    prompts = set(load_preference_data(only_reference).prompts)
    with gzip.open(only_reference / "outputs.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows if r["model"] == REFERENCE_MODEL and r["prompt_id"] in prompts)
    (only_reference / "labels.jsonl.gz").unlink()
    from evaluators.encoder import EmbeddingCache
    from evaluators.factory import load_small_judge

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _register_random_judge(uri, "j", 0, tmp_path / "src")
    judge = load_small_judge("models:/j/1", uri, embedder=EmbeddingCache(tmp_path / "cache", TINY.encoder))
    with pytest.raises(PreferenceDataError, match=f"no outputs of a model other than the reference {REFERENCE_MODEL}"):
        evaluate_judge(judge, only_reference, include_seen=True)
