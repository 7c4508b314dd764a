"""The small judge end to end: a tiny judge trained on real AlpacaEval answers in seconds, registered in a real
MLflow store, loaded back through load_evaluator, and measured on models it never saw."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from evaluators import Evaluator, load_evaluator
from evaluators.encoder import EncoderSettings
from evaluators.factory import load_small_judge
from evaluators.judge_registry import CHAMPION, JudgeRegistryError, find_alias
from evaluators.judge_training import HeadConfig, TrainSettings, evaluate_judge, int8_keeps_agreement, train_judge
from evaluators.preference_data import MINI_DATA as MINI
from evaluators.preference_data import PreferenceDataError, load_preference_data, split_by_model
from shadowjudge.config import JudgeConfig

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
    assert judge.version.startswith("small-judge:models:/tiny-judge/1@")  # and the digest of its files
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


def test_the_champion_contest_counts_only_models_neither_judge_trained_on(trained, tiny_data):
    """A judge trained with another seed holds out models the champion was fitted on; comparing there would
    flatter the champion, so the contest keeps to the held-out models the champion never saw, or is not held."""
    from mlflow.tracking import MlflowClient

    uri, root, _ = trained
    common = dict(quick=True, registered_name="contest-judge", settings=TINY, cache_dir=root / "cache")
    train_judge(tiny_data, uri, seed=0, **common)
    data = load_preference_data(tiny_data)
    unseen_by_champion = set(split_by_model(data, TINY.heldout_fraction, 0).heldout_models)

    disjoint = train_judge(tiny_data, uri, seed=1, **common)  # every model it holds out, the champion trained on
    assert not set(disjoint.heldout_models) & unseen_by_champion
    assert disjoint.champion_metrics is None and disjoint.alias == "challenger"
    assert find_alias(uri, "contest-judge", CHAMPION).version == "1"

    overlapping = train_judge(tiny_data, uri, seed=10, **common)
    contest = sorted(set(overlapping.heldout_models) & unseen_by_champion)
    assert 0 < len(contest) < len(overlapping.heldout_models)
    assert overlapping.champion_metrics["n_models"] == len(contest)
    assert overlapping.champion_metrics["n"] == sum(1 for p in data.pairs if p.model_b in contest
                                                    and abs(p.p_b_better - 0.5) > 1e-9)
    run = MlflowClient(uri).get_run(overlapping.run_id).data
    assert run.params["contest_models"] == ",".join(contest)
    assert run.metrics["contest_n_models"] == len(contest) < run.metrics["n_models"]


def test_missing_champion_says_how_to_train_one(tmp_path):
    with pytest.raises(JudgeRegistryError, match="shadowjudge judge train"):
        load_evaluator(JudgeConfig(registered_name="never-trained"), f"sqlite:///{tmp_path}/mlflow.db")


def test_a_registry_that_cannot_be_used_is_an_error_not_a_missing_champion(tmp_path, tiny_data):
    assert find_alias(f"sqlite:///{tmp_path}/mlflow.db", "never-trained") is None
    with pytest.raises(JudgeRegistryError, match="not a model registry URI"):
        find_alias("bogus://nowhere", "tiny-judge")
    with pytest.raises(JudgeRegistryError, match="not a model registry URI"):  # before any embedding or training
        train_judge(tiny_data, "bogus://nowhere", quick=True, settings=TINY, cache_dir=tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()


def test_split_is_by_model_and_seeded(tiny_data):
    data = load_preference_data(tiny_data)
    a, b = split_by_model(data, 0.3, seed=7), split_by_model(data, 0.3, seed=7)
    assert a == b
    assert not set(a.train_models) & set(a.heldout_models)
    assert {p.model_b for p in a.heldout_pairs(data)} == set(a.heldout_models)


def test_judge_records_its_training_models_and_evaluation_leaves_them_out(trained, tiny_data):
    uri, _, result = trained
    judge = load_small_judge(result.model_uri, uri)
    seen = set(judge.spec.trained_models)
    assert seen and not seen & set(result.heldout_models)
    report = evaluate_judge(judge, tiny_data)
    assert report["unseen_models"] == sorted(result.heldout_models)
    assert set(report["excluded_seen_models"]) == seen - {"gpt4_1106_preview"}
    assert report["instance"]["n"] == result.metrics["n"]  # the same held-out pairs training measured
    assert report["system"]["n_models"] == len(result.heldout_models)
    assert report["system_length_controlled"]["n_models"] == len(result.heldout_models)
    assert report["system_teacher_length_controlled"]["n_models"] == len(result.heldout_models)
    assert all(0 <= w["judge_length_controlled"] <= 100 for w in report["win_rates"].values())
    everything = evaluate_judge(judge, tiny_data, include_seen=True)
    assert everything["excluded_seen_models"] == [] and everything["n_models"] > report["n_models"]


def test_evaluating_only_seen_models_is_refused(trained, tiny_data, tmp_path):
    uri, _, result = trained
    judge = load_small_judge(result.model_uri, uri)
    data = load_preference_data(tiny_data)
    judge.spec.trained_models = sorted({p.model_b for p in data.pairs} | {"gpt4_1106_preview"})
    with pytest.raises(PreferenceDataError, match="training set"):
        evaluate_judge(judge, tiny_data)


def _holdout_shaped(src: Path, dst: Path, models: list[str]) -> Path:
    """What an acceptance set looks like: only new models and the AlpacaEval 2.0 reference (no text_davinci_003
    and no AlpacaEval 1.0 labels), label rows the annotator left empty, and leaderboard rows with gaps."""
    dst.mkdir(parents=True, exist_ok=True)
    keep = set(models) | {"gpt4_1106_preview"}
    (dst / "prompts.jsonl.gz").write_bytes((src / "prompts.jsonl.gz").read_bytes())
    with gzip.open(src / "outputs.jsonl.gz", "rt") as fh, gzip.open(dst / "outputs.jsonl.gz", "wt") as out:
        out.writelines(line for line in fh if json.loads(line)["model"] in keep)
    with gzip.open(src / "labels.jsonl.gz", "rt") as fh, gzip.open(dst / "labels.jsonl.gz", "wt") as out:
        rows = [json.loads(line) for line in fh]
        rows = [r for r in rows if r["model_a"] == "gpt4_1106_preview" and r["model_b"] in keep]
        out.writelines(json.dumps(r) + "\n" for r in rows)
        out.write(json.dumps({**rows[0], "p_b_better": None}) + "\n")
        out.write('{"prompt_id": "%s", "model_a": "gpt4_1106_preview", "model_b": "%s", "p_b_better": NaN}\n'
                  % (rows[1]["prompt_id"], rows[1]["model_b"]))
    lines = (src / "leaderboard.csv").read_text().splitlines()
    board = [lines[0]] + [row for row in lines[1:] if row.split(",")[0] in keep]
    (dst / "leaderboard.csv").write_text("\n".join(board + ["not-ranked-model,,,,"]) + "\n")
    return dst


def _run_bench(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    bench = Path(__file__).resolve().parents[1] / "bench" / "judge_quality.py"
    return subprocess.run([sys.executable, str(bench), *args, "--no-progress"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_bench_judge_quality_runs_on_a_holdout_shaped_directory(trained, tiny_data, tmp_path):
    """The acceptance check's own command, as a user runs it, on a directory in the format but not our split."""
    uri, root, result = trained
    holdout = _holdout_shaped(tiny_data, tmp_path / "holdout", list(result.heldout_models))
    env = {"SHADOWJUDGE_CACHE_DIR": str(root / "onnx-cache")}
    done = _run_bench("--data", str(holdout), "--prompts", "40", "--tracking-uri", uri,
                      "--registered-name", "tiny-judge", env=env)
    assert done.returncode == 0, done.stderr[-2000:]

    def no_nan(token):
        raise AssertionError(f"not strict JSON: {token}")

    out = json.loads(done.stdout, parse_constant=no_nan)
    assert out["benchmark"] == "judge_quality" and out["judge"].startswith("small-judge:models:/tiny-judge/1@")
    assert out["n_prompts"] == 40 and out["unseen_models"] == sorted(result.heldout_models)
    assert out["unlabelled_rows_skipped"] == 2 and out["excluded_seen_models"] == []
    assert 0 < out["instance"]["n"] and 0 <= out["instance"]["balanced_agreement"] <= 1
    assert set(out["win_rates"]) == set(result.heldout_models)
    for key in ("spearman_win_rate", "spearman_lc_win_rate"):
        assert isinstance(out["targets"][key]["met"], bool) and -1 <= out["targets"][key]["value"] <= 1
    assert out["targets"]["balanced_agreement_above_baseline"]["met"] in (True, False)

    again = _run_bench("--data", str(holdout), "--prompts", "40", "--tracking-uri", uri,
                       "--registered-name", "tiny-judge", env=env)
    assert json.loads(again.stdout)["win_rates"] == out["win_rates"]  # the seeded subset is the same subset


def test_evaluate_prints_strict_json_when_a_set_has_no_labels(trained, tiny_data, tmp_path):
    """Figures with nothing to measure (agreement without labels) are null, not NaN, which jq and co reject."""
    import shutil

    from typer.testing import CliRunner

    from evaluators.judge_cli import judge_cli

    uri, root, _ = trained
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tiny_data, unlabelled)
    (unlabelled / "labels.jsonl.gz").unlink()
    done = CliRunner(env={"SHADOWJUDGE_CACHE_DIR": str(root / "onnx-cache")}).invoke(
        judge_cli, ["evaluate", "--data", str(unlabelled), "--tracking-uri", uri, "--registered-name", "tiny-judge",
                    "--prompts", "20", "--no-progress"])
    assert done.exit_code == 0, done.output

    def no_nan(token):
        raise AssertionError(f"not strict JSON: {token}")

    out = json.loads(done.stdout, parse_constant=no_nan)
    assert out["instance"]["agreement"] is None and out["instance"]["n"] == 0
    assert -1 <= out["system"]["spearman_win_rate"] <= 1


def test_bench_judge_quality_bad_input_is_one_line_not_a_traceback(trained, tiny_data, tmp_path):
    uri, root, _ = trained
    env = {"SHADOWJUDGE_CACHE_DIR": str(root / "onnx-cache")}
    common = ("--tracking-uri", uri, "--registered-name", "tiny-judge")
    missing = _run_bench("--data", str(tmp_path / "nowhere"), *common, env=env)
    assert missing.returncode == 1 and "not a directory" in missing.stderr and "Traceback" not in missing.stderr
    broken = write_subset(tiny_data, tmp_path / "broken", 10)
    with gzip.open(broken / "labels.jsonl.gz", "at") as fh:
        fh.write('{"prompt_id": "x", "model_a": "a", "model_b": "b", "p_b_better": "high"}\n')
    bad = _run_bench("--data", str(broken), *common, env=env)
    assert bad.returncode == 1 and "labels.jsonl.gz:" in bad.stderr and "p_b_better" in bad.stderr
    assert "Traceback" not in bad.stderr
    for n in ("0", "-5"):
        none = _run_bench("--data", str(tiny_data), "--prompts", n, *common, env=env)
        assert none.returncode == 1 and "at least 1" in none.stderr and "Traceback" not in none.stderr
    no_judge = _run_bench("--data", str(tiny_data), "--tracking-uri", uri, "--registered-name", "absent", env=env)
    assert no_judge.returncode == 1 and "shadowjudge judge train" in no_judge.stderr


def test_int8_check_compares_both_encoders_on_the_same_pairs(trained, tiny_data):
    uri, _, result = trained
    judge = load_small_judge(result.model_uri, uri, backend="onnx")
    data = load_preference_data(tiny_data)
    heldout = split_by_model(data, TINY.heldout_fraction, seed=0).heldout_pairs(data)
    check = int8_keeps_agreement(judge, data, heldout, n=60, seed=0)
    assert check["int8_check_pairs"] == 60
    sample = random.Random(0).sample(heldout, 60)  # the sample int8_keeps_agreement draws
    fp32 = judge.compare([data.prompts[p.prompt_id] for p in sample],
                         [data.answer(p.prompt_id, p.model_a) for p in sample],
                         [data.answer(p.prompt_id, p.model_b) for p in sample])
    labels = [p.p_b_better for p in sample]
    decided = [(f > 0.5) == (y > 0.5) for f, y in zip(fp32, labels) if y != 0.5]
    assert check["int8_check_fp32_agreement"] == pytest.approx(sum(decided) / len(decided))
    assert 0 < check["int8_max_abs_diff"] < 0.5  # quantisation moves the preferences, a little
    assert check["int8_decision_flips"] <= 0.2
    assert check["int8_ok"] == float(check["int8_check_int8_agreement"] >= check["int8_check_fp32_agreement"] - 0.005)
    strict = int8_keeps_agreement(judge, data, heldout, n=60, seed=0, tolerance=-1.0)
    assert strict["int8_ok"] == 0.0  # a gate that cannot be met is reported as failed


def _length_biased_corpus(n_prompts: int = 150):
    """Answers whose content says nothing (random vectors) and a teacher that prefers the longer one 90% of the
    time: everything a head could learn here is length."""
    import numpy as np

    from evaluators.answer_features import answer_features
    from evaluators.judge_training import EmbeddedAnswers
    from evaluators.preference_data import LabelledPair

    rng = np.random.default_rng(0)
    keys = [(f"p{i}", m) for i in range(n_prompts) for m in ("a", "b")]
    prompts = [f"question {pid}" for pid, _ in keys]
    answers = ["word " * int(rng.integers(5, 400)) for _ in keys]
    vectors = rng.normal(size=(len(keys), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = EmbeddedAnswers({k: i for i, k in enumerate(keys)}, prompts, answers, vectors,
                          np.ones_like(vectors) / np.sqrt(384), answer_features(prompts, answers, use_length=True),
                          np.asarray([len(a) for a in answers]))
    pairs = [LabelledPair(f"p{i}", "a", "b", 0.9 if len(answers[2 * i + 1]) > len(answers[2 * i]) else 0.1)
             for i in range(n_prompts)]
    return emb, pairs


def test_length_controlled_training_fits_the_length_term_and_keeps_it_only_when_asked():
    import numpy as np

    from evaluators.judge_training import fit_head
    from evaluators.small_judge import SmallJudge

    emb, pairs = _length_biased_corpus()
    encoder = EncoderSettings(max_tokens=32)
    dropped, _ = fit_head(emb, pairs, HeadConfig("lc", use_length=False, length_controlled=True, epochs=5), encoder, 0)
    assert dropped.length_weight == 0.0
    kept, state = fit_head(emb, pairs, HeadConfig("lc-keep", use_length=False, length_controlled=True,
                                                  keep_length_term=True, epochs=5), encoder, 0)
    assert kept.length_weight > 1.0  # the teacher's taste for length, as one explicit weight

    class Precomputed:
        def embed(self, texts):
            return np.stack([emb.answer_emb[emb.answers.index(t)] if t in emb.answers else emb.prompt_emb[0]
                             for t in texts])

    judge = SmallJudge(kept, state, version="t", embedder=Precomputed())
    prefs = judge.compare([emb.prompts[2 * i] for i in range(150)], [emb.answers[2 * i] for i in range(150)],
                          [emb.answers[2 * i + 1] for i in range(150)])
    agree = np.mean([(p > 0.5) == (pair.p_b_better > 0.5) for p, pair in zip(prefs, pairs)])
    assert agree > 0.9, agree


def test_heads_are_chosen_by_cross_validation_over_the_training_models(tiny_data, tmp_path):
    import mlflow

    from evaluators.judge_registry import tracking
    from evaluators.judge_training import DEFAULT_EXPERIMENT, selection_score

    assert selection_score({"spearman_win_rate": 0.9, "spearman_lc_win_rate": 0.7, "agreement": 0.6}) == \
        pytest.approx(0.8)
    assert selection_score({"spearman_win_rate": float("nan"), "agreement": 0.6}) == 0.6
    settings = replace(TINY, selection_folds=3, heads=(HeadConfig("with-length", epochs=5, hidden=16),
                                                       HeadConfig("lc", use_length=False, length_controlled=True,
                                                                  epochs=5, hidden=16)))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_judge(tiny_data, uri, quick=True, seed=0, registered_name="cv-judge", settings=settings,
                         cache_dir=tmp_path / "cache")
    with tracking(uri):
        runs = mlflow.search_runs(experiment_names=[DEFAULT_EXPERIMENT],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    scores = dict(zip(runs["tags.mlflow.runName"], runs["metrics.selection_score"], strict=True))
    assert set(scores) == {"with-length", "lc"}
    assert result.head == max(scores, key=scores.get)
    assert runs["metrics.cv_spearman_win_rate"].notna().all()  # out-of-fold: over training models only
    assert runs["metrics.cv_lc_spearman_lc_win_rate"].notna().all()
    assert not set(result.heldout_models) & set(load_small_judge(result.model_uri, uri).spec.trained_models)


def test_the_word_term_learns_what_only_the_middle_of_an_answer_says():
    """The teacher prefers answers whose (long) body is right; the encoder, which sees only head and tail, gets
    random vectors here. With the word term the head picks the right answer on new pairs; without it, chance."""
    import numpy as np

    from evaluators.answer_features import answer_features
    from evaluators.judge_training import EmbeddedAnswers, answer_rewards, fit_head
    from evaluators.preference_data import LabelledPair

    rng = np.random.default_rng(1)
    n = 400
    keys = [(f"p{i}", m) for i in range(n) for m in ("a", "b")]
    good = {k: bool(rng.integers(2)) for k in keys}
    filler = "some words that open and close every answer alike . "
    answers = [filler * 10 + ("the body is right ." if good[k] else "the body is wrong .") * 3 + filler * 10
               for k in keys]
    prompts = [f"question {pid}" for pid, _ in keys]
    vectors = rng.normal(size=(len(keys), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = EmbeddedAnswers({k: i for i, k in enumerate(keys)}, prompts, answers, vectors, vectors.copy(),
                          answer_features(prompts, answers, use_length=True),
                          np.asarray([len(a) for a in answers]))
    pairs = [LabelledPair(f"p{i}", "a", "b", 0.5 + 0.4 * (good[(f"p{i}", "b")] - good[(f"p{i}", "a")]))
             for i in range(n)]
    train, test = pairs[:300], [p for p in pairs[300:] if p.p_b_better != 0.5]
    encoder = EncoderSettings(max_tokens=32)

    def agreement(config: HeadConfig) -> float:
        spec, state = fit_head(emb, train, config, encoder, 0)
        r = answer_rewards(emb, spec, state)
        a, b = emb.rows([(p.prompt_id, "a") for p in test]), emb.rows([(p.prompt_id, "b") for p in test])
        return float(np.mean([(rb > ra) == (p.p_b_better > 0.5) for ra, rb, p in zip(r[a], r[b], test)]))

    plain = HeadConfig("plain", use_length=False, hidden=16, epochs=20)
    assert agreement(replace(plain, word_buckets=4096)) > 0.95
    assert agreement(plain) < 0.75


def test_cross_validation_reports_length_controlled_ranks_and_runs_the_length_penalty(tiny_data, tmp_path):
    from evaluators.encoder import EmbeddingCache
    from evaluators.judge_experiments import cross_validate
    from evaluators.judge_training import embed_answers

    data = load_preference_data(tiny_data)
    emb = embed_answers(data, sorted(data.outputs), EmbeddingCache(tmp_path, TINY.encoder))
    head = HeadConfig("lc", use_length=False, length_controlled=True, epochs=5, hidden=16)
    plain = cross_validate(data, emb, head, TINY.encoder, folds=3)
    penalised = cross_validate(data, emb, head, TINY.encoder, folds=3, length_penalty=-5.0)
    assert plain["n_models"] == 11 and -1 <= plain["lc_spearman_lc_win_rate"] <= 1
    assert -1 <= plain["half_lc_spearman_lc_win_rate"] <= 1 and len(plain["win_rates"]) == 11
    assert all(set(rates) == {"plain", "length_controlled"} for rates in plain["win_rates"].values())
    assert penalised["prefers_longer"] < 0.2 < plain["prefers_longer"]


def test_experiments_can_leave_out_the_models_training_holds_out(tiny_data, tmp_path, monkeypatch, capsys):
    """`judge_experiments --exclude-heldout SEED`: a design is chosen on training models only."""
    import json

    from evaluators.judge_experiments import main
    from evaluators.judge_training import FULL
    from evaluators.preference_data import split_by_model

    monkeypatch.chdir(tmp_path)  # the embedding cache goes under the working directory
    data = load_preference_data(tiny_data)
    heldout = split_by_model(data, FULL.heldout_fraction, 0).heldout_models
    common = ["--data", str(tiny_data), "--tracking-uri", "", "--folds", "3", "--max-tokens", "32",
              "--num-layers", "2", "--only", "linear-nolength-lc"]
    main(common)
    main([*common, "--exclude-heldout", "0"])
    everything, training_only = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert everything["n_models"] == len(data.judged_models()) == 11
    assert training_only["n_models"] == 11 - len(heldout) and training_only["excluded_heldout_of_seed"] == 0


def test_a_judge_the_registry_does_not_hold_is_bad_input(tmp_path):
    """The registry answered and holds no such judge: the stage that loads it must not be retried as a passing
    fault, and the CLI exits 2 (it mapped the error by hand, and only in `run`)."""
    from evaluators.judge_registry import JudgeNotFound, resolve
    from flows.stages import transient_fault
    from shadowjudge.errors import InputError

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for ref in ("models:/never-trained@champion", "models:/never-trained/3", "runs:/abc/judge"):
        with pytest.raises(JudgeNotFound) as caught:
            resolve(uri, ref)
        assert isinstance(caught.value, InputError) and caught.value.exit_code == 2
        assert not transient_fault(None, None, type("State", (), {"data": caught.value})())


def _register_random_judge(uri: str, name: str, seed: int, root: Path):
    """A judge with a random head (no training), logged and registered the way training does it."""
    import mlflow
    import numpy as np
    import torch

    from evaluators import judge_registry as reg
    from evaluators.answer_features import feature_names
    from evaluators.small_judge import JudgeSpec, build_head

    torch.manual_seed(seed)
    n = len(feature_names(True))
    spec = JudgeSpec(encoder=EncoderSettings(max_tokens=32, num_layers=2), hidden=8, feature_mean=[0.0] * n,
                     feature_std=[1.0] * n, serving_backend="torch")
    directory = root / f"{name}-{seed}" / "judge"
    directory.mkdir(parents=True)
    (directory / "judge.json").write_text(spec.to_json())
    np.savez(directory / "head.npz", **{k: v.detach().numpy() for k, v in build_head(spec).state_dict().items()})
    with reg.tracking(uri), mlflow.start_run(experiment_id=reg.ensure_experiment(uri, "registry-test")):
        return reg.log_and_register(directory, name, uri)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("registry")
    return f"sqlite:///{root}/mlflow.db", root


def test_a_version_number_the_registry_reuses_for_other_weights_is_another_judge(registry):
    """Delete a registered model and register new weights under its name: they are version 1 again, and a version
    string without the files' digest made score_run skip their pairs as judged already."""
    from mlflow.tracking import MlflowClient

    from evaluators.judge_registry import JudgeNotFound, resolve

    uri, root = registry
    assert _register_random_judge(uri, "reused", 0, root).version == "1"
    first = load_small_judge("models:/reused/1", uri).version
    assert load_small_judge("models:/reused/1", uri).version == first  # the same weights: the same judge
    MlflowClient(uri).delete_registered_model("reused")
    assert _register_random_judge(uri, "reused", 1, root).version == "1"
    second = load_small_judge("models:/reused/1", uri).version
    assert second != first
    assert first.startswith("small-judge:models:/reused/1@") and second.startswith("small-judge:models:/reused/1@")
    with pytest.raises(JudgeNotFound):
        resolve(uri, "models:/reused/2")


def test_loading_a_registry_judge_leaves_no_download_behind(registry, tmp_path, monkeypatch):
    """Every load (each cycle's score and golden stages) downloaded into a directory nothing removed, a failed
    download included; a long-running `serve` piled them up."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    uri, root = registry
    _register_random_judge(uri, "downloaded", 0, root)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for _ in range(3):
        load_small_judge("models:/downloaded/1", uri)

    def unreachable(**kwargs):
        raise MlflowException("artifact store unreachable")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", unreachable)
    with pytest.raises(JudgeRegistryError, match="cannot download"):
        load_small_judge("models:/downloaded/1", uri)
    assert list(tmp_path.iterdir()) == []


def test_a_registry_that_cannot_be_used_is_an_error_not_a_missing_version(tmp_path):
    """`models:/name/N` turned every registry failure into JudgeNotFound (exit 2, never retried) where
    `models:/name@alias` said the registry could not be used."""
    from evaluators.judge_registry import JudgeNotFound, resolve

    for ref in ("models:/j@champion", "models:/j/1"):
        with pytest.raises(JudgeRegistryError, match="not a model registry URI") as caught:
            resolve("foo://bar", ref)
        assert not isinstance(caught.value, JudgeNotFound) and caught.value.exit_code == 1


def test_evaluate_reports_a_judge_that_will_not_load_in_one_line(tiny_data, tmp_path):
    """A judge directory of another format (JudgeLoadError) escaped `judge evaluate` as a traceback."""
    from typer.testing import CliRunner

    from evaluators.judge_cli import judge_cli

    broken = tmp_path / "judge"
    broken.mkdir()
    (broken / "judge.json").write_text(json.dumps({"format_version": 99}))
    import numpy as np

    np.savez(broken / "head.npz", w=np.zeros(1))
    done = CliRunner().invoke(judge_cli, ["evaluate", "--data", str(tiny_data), "--model-uri", str(broken),
                                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-progress"])
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output
    assert "judge format 99" in done.output and "Traceback" not in done.output


def test_cross_validation_trains_on_no_pair_that_shows_a_held_out_model(tiny_data, tmp_path, monkeypatch):
    """A labels file may compare two judged models; such a pair must not teach a fold the model it holds out."""
    from evaluators import judge_experiments
    from evaluators.encoder import EmbeddingCache
    from evaluators.judge_training import embed_answers
    from evaluators.preference_data import LabelledPair

    data = load_preference_data(tiny_data)
    judged = sorted({p.model_b for p in data.pairs})
    pid = data.pairs[0].prompt_id
    data.pairs.extend(LabelledPair(pid, a, b, 0.5) for a in judged for b in judged
                      if a != b and (pid, a) in data.outputs and (pid, b) in data.outputs)
    emb = embed_answers(data, sorted(data.outputs), EmbeddingCache(tmp_path, TINY.encoder))
    seen: list[set[str]] = []
    real_fit = judge_experiments.fit_head

    def recording_fit(emb, train, *args):
        seen.append({p.model_a for p in train} | {p.model_b for p in train})
        return real_fit(emb, train, *args)

    monkeypatch.setattr(judge_experiments, "fit_head", recording_fit)
    head = HeadConfig("plain", use_length=False, epochs=2, hidden=8)
    judge_experiments.cross_validate(data, emb, head, TINY.encoder, folds=3)
    folds = judge_experiments.model_folds(judged, 3, 0)
    assert len(seen) == len(folds) == 3
    for fold, trained_on in zip(folds, seen):
        assert not trained_on & set(fold)


def test_a_runs_judge_is_loaded_again_after_the_champion_moved(registry, monkeypatch):
    """golden_gate was handed the run's judge version and loaded whatever held @champion: a promotion between the
    score stage and the golden stage (or a rerun after one) scored golden cases with another judge."""
    from evaluators import factory
    from evaluators import judge_registry as reg
    from evaluators.factory import load_evaluator_version

    warned: list[str] = []  # recorded here: earlier tests of a session may leave logging without propagation
    monkeypatch.setattr(factory.log, "warning", lambda message, *args: warned.append(message % args))

    uri, root = registry
    first = _register_random_judge(uri, "moving", 0, root)
    reg.set_alias(uri, first, reg.CHAMPION)
    judge = JudgeConfig(registered_name="moving")
    scored_by = load_evaluator(judge, uri).version
    reg.set_alias(uri, _register_random_judge(uri, "moving", 1, root), reg.CHAMPION)
    assert load_evaluator(judge, uri).version != scored_by
    assert load_evaluator_version(judge, uri, scored_by).version == scored_by
    gone = scored_by.replace("/moving/1@", "/moving/7@")
    assert load_evaluator_version(judge, uri, gone).version == load_evaluator(judge, uri).version
    assert len(warned) == 1 and "cannot be loaded again" in warned[0]
