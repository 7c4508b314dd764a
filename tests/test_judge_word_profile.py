"""The whole-answer word profile: stable hashing, densities that do not grow with length, the reward term, and a
judge that carries it through save and load."""

from __future__ import annotations

import numpy as np
import pytest

from evaluators.word_profile import PER_TOKENS, profile_reward, word_profiles


def test_profiles_are_densities_so_repeating_an_answer_changes_nothing_but_bigrams_across_the_seam():
    once = word_profiles(["Paris is the capital of France."], 1024)
    twice = word_profiles(["Paris is the capital of France. " * 20], 1024)
    dense_once, dense_twice = np.zeros(1024), np.zeros(1024)
    np.add.at(dense_once, once.ids, once.weights)
    np.add.at(dense_twice, twice.ids, twice.weights)
    assert dense_once.sum() == pytest.approx(PER_TOKENS, rel=1e-5)
    assert dense_twice.sum() == pytest.approx(PER_TOKENS, rel=1e-5)
    other = word_profiles(["Berlin lies on the Spree, in Germany."], 1024)
    dense_other = np.zeros(1024)
    np.add.at(dense_other, other.ids, other.weights)
    # Only the ". paris" seam bigram (7% of the long text's grams) tells 20 copies from one; other words do.
    assert np.abs(dense_once - dense_twice).sum() < 0.15 * PER_TOKENS
    assert np.abs(dense_once - dense_other).sum() > 1.5 * PER_TOKENS


def test_hashing_is_the_same_in_every_process_and_empty_answers_have_empty_profiles():
    import subprocess
    import sys

    a = word_profiles(["hello world", "", None], 2 ** 18)
    assert [int(x) for x in a.offsets] == [0, 3, 3, 3]  # hello, world, "hello world"
    other_process = subprocess.run(
        [sys.executable, "-c", "from evaluators.word_profile import word_profiles; "
                               "print(word_profiles(['hello world'], 2 ** 18).ids.tolist())"],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}).stdout
    assert other_process.strip() == str(a.ids.tolist())  # a salted hash() would differ between processes


def test_profile_reward_is_the_dot_product_and_take_selects_rows():
    texts = ["a b c", "", "b b b d", "the end."]
    profiles = word_profiles(texts, 64)
    rng = np.random.default_rng(0)
    weights = rng.normal(size=64).astype(np.float32)
    dense = np.zeros((len(texts), 64))
    for i in range(len(texts)):
        span = slice(profiles.offsets[i], profiles.offsets[i + 1])
        np.add.at(dense[i], profiles.ids[span], profiles.weights[span])
    np.testing.assert_allclose(profile_reward(weights, profiles), dense @ weights, rtol=1e-5, atol=1e-6)
    rows = np.asarray([3, 1, 0, 3])
    np.testing.assert_allclose(profile_reward(weights, profiles.take(rows)), (dense @ weights)[rows], rtol=1e-5,
                               atol=1e-6)
    assert len(profiles.take(rows)) == 4


def test_a_judge_with_a_word_term_saves_loads_and_refuses_weights_that_do_not_match(tmp_path):
    from evaluators.small_judge import WORDS_KEY, JudgeLoadError, JudgeSpec, SmallJudge, build_head

    class Constant:
        def embed(self, texts):
            return np.ones((len(texts), 384), np.float32) / np.sqrt(384)

    spec = JudgeSpec(use_length=False, hidden=8, word_buckets=256, feature_mean=[0.0] * 9, feature_std=[1.0] * 9)
    state = {k: v.detach().numpy() for k, v in build_head(spec).state_dict().items()}
    words = np.zeros(256, np.float32)
    good = word_profiles(["good"], 256).ids[0]
    words[good] = 0.05
    judge = SmallJudge(spec, state | {WORDS_KEY: words}, version="t", embedder=Constant())
    [p] = judge.compare(["q"], ["bad bad"], ["good good"])
    # The same MLP input on both sides, so the words decide: "good" is 2 of the 3 grams of "good good".
    assert p == pytest.approx(1 / (1 + np.exp(-0.05 * PER_TOKENS * 2 / 3)), rel=1e-4)
    loaded = SmallJudge.load(judge.save(tmp_path / "j"), embedder=Constant())
    assert loaded.compare(["q"], ["bad bad"], ["good good"]) == pytest.approx([p])
    with pytest.raises(JudgeLoadError, match="word buckets"):
        SmallJudge(spec, state, version="t", embedder=Constant())


def test_a_judge_registered_under_a_long_name_gets_a_version_the_store_can_hold():
    from evaluators.base import MAX_VERSION_CHARS
    from evaluators.small_judge import JudgeSpec, SmallJudge, build_head

    spec = JudgeSpec(use_length=False, hidden=8, feature_mean=[0.0] * 9, feature_std=[1.0] * 9)
    state = {k: v.detach().numpy() for k, v in build_head(spec).state_dict().items()}
    version = f"small-judge:models:/{'team-' + 'x' * 251}/12"  # MLflow takes registered names up to 256 characters
    judge = SmallJudge(spec, state, version=version)
    assert len(judge.version) == MAX_VERSION_CHARS and judge.version.startswith("small-judge:models:/team-x")
    assert SmallJudge(spec, state, version=version[:-1] + "3").version != judge.version
