"""The registered judge through MLflow's own pyfunc loader, as registry users and `mlflow models serve` call it."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest

from evaluators import judge_registry as reg
from evaluators.answer_features import feature_names
from evaluators.encoder import EncoderSettings
from evaluators.small_judge import WORDS_KEY, JudgeSpec, SmallJudge, build_head

PROMPT = "Name three primary colours."
ANSWERS = ["Red, yellow and blue.", "Red.", ""]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small judge with a random head (training is not what is tested here), logged and registered the way
    training does it, then loaded back through mlflow.pyfunc."""
    root = tmp_path_factory.mktemp("pyfunc")
    n = len(feature_names(True))
    spec = JudgeSpec(encoder=EncoderSettings(max_tokens=32, num_layers=2), feature_mean=[0.0] * n,
                     feature_std=[1.0] * n, word_buckets=16, serving_backend="torch")
    state = {k: v.detach().numpy() for k, v in build_head(spec).state_dict().items()}
    state[WORDS_KEY] = np.random.default_rng(0).normal(size=16).astype(np.float32) * 0.05
    judge = SmallJudge(spec, state, version="test", backend="torch")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHADOWJUDGE_CACHE_DIR", str(root / "cache"))
        with reg.tracking(uri):
            with mlflow.start_run(experiment_id=reg.ensure_experiment(uri, "pyfunc-test")):
                registered = reg.log_and_register(judge.save(root / "judge"), "pyfunc-judge", uri)
            model = mlflow.pyfunc.load_model(registered.uri)
        yield judge, model


def test_a_dataframe_and_records_score_alike(served):
    """A DataFrame with several columns is what `mlflow models serve` hands the model."""
    judge, model = served
    expected = judge.score([PROMPT] * len(ANSWERS), ANSWERS)
    records = [{"prompt": PROMPT, "answer": a} for a in ANSWERS]
    np.testing.assert_allclose(model.predict(pd.DataFrame(records)), expected, atol=1e-6)
    np.testing.assert_allclose(model.predict(records), expected, atol=1e-6)


def test_pairs_as_a_dataframe_and_as_records(served):
    judge, model = served
    pairs = [{"prompt": PROMPT, "incumbent": "Red.", "candidate": "Red, yellow and blue."}]
    expected = judge.compare([PROMPT], ["Red."], ["Red, yellow and blue."])
    np.testing.assert_allclose(model.predict(pd.DataFrame(pairs)), expected, atol=1e-6)
    np.testing.assert_allclose(model.predict(pairs), expected, atol=1e-6)


def test_a_missing_answer_is_scored_as_empty_not_as_the_word_none(served):
    judge, model = served
    frame = pd.DataFrame({"prompt": [PROMPT, PROMPT], "answer": [None, math.nan]})
    empty = judge.score([PROMPT], [""])[0]
    assert model.predict(frame) == pytest.approx([empty, empty], abs=1e-6)
    assert judge.score([PROMPT], ["None"])[0] != pytest.approx(empty, abs=1e-6)


def test_records_without_the_needed_columns_are_refused(served):
    _, model = served
    with pytest.raises(ValueError, match="prompt\\+answer or prompt\\+incumbent\\+candidate"):
        model.predict(pd.DataFrame({"prompt": [PROMPT], "response": ["Red."]}))
    assert list(model.predict(pd.DataFrame({"prompt": [], "answer": []}))) == []
