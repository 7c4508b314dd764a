"""A run's scoring batches load one judge: the score stage resolves the champion alias to its version once and each
batch loads that version, so a promotion during the fan-out cannot split the run between two judges (the analysis
reads one judge's judgments and silently dropped the other batches' pairs)."""

from __future__ import annotations

from evaluators.factory import load_small_judge, pinned_judge_model_uri
from evaluators.judge_registry import CHAMPION, set_alias
from shadowjudge.config import JudgeConfig
from tests.test_judge_training import _register_random_judge


def test_the_champion_is_pinned_to_the_version_it_points_at_now(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = _register_random_judge(uri, "j", 0, tmp_path / "src")
    second = _register_random_judge(uri, "j", 1, tmp_path / "src")
    set_alias(uri, first, CHAMPION)
    judge = JudgeConfig(registered_name="j")
    pinned = pinned_judge_model_uri(judge, uri)
    assert pinned == "models:/j/1"
    # the pinned version is the judge the alias loads: judgments written by the batches carry the run's version
    assert load_small_judge(pinned, uri).version == load_small_judge("models:/j@champion", uri).version

    set_alias(uri, second, CHAMPION)  # a promotion while the batches run
    assert load_small_judge(pinned, uri).version != load_small_judge("models:/j@champion", uri).version
    assert pinned_judge_model_uri(judge, uri) == "models:/j/2"


def test_what_cannot_move_is_passed_as_it_is(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert pinned_judge_model_uri(JudgeConfig(model_uri="models:/j/3"), uri) == "models:/j/3"
    assert pinned_judge_model_uri(JudgeConfig(model_uri=str(tmp_path)), uri) == str(tmp_path)
    assert pinned_judge_model_uri(JudgeConfig(evaluator="lexical"), uri) is None
