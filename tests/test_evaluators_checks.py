"""Deterministic checks and the model-free evaluators."""

from __future__ import annotations

import pytest

from evaluators import EvaluatorConfigError, load_evaluator
from evaluators.base import Evaluator
from evaluators.checks import (
    CheckSpecError,
    ChecksEvaluator,
    JsonCheck,
    LengthCheck,
    RefusalCheck,
    RegexCheck,
    build_checks,
    looks_like_refusal,
)
from evaluators.lexical import LexicalEvaluator
from shadowjudge.config import JudgeConfig

SCHEMA = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}


def test_json_validity_and_schema():
    check = JsonCheck(SCHEMA)
    assert check.check("", '{"name": "Ada", "age": 36}').passed
    assert check.check("", '```json\n{"name": "Ada", "age": 36}\n```').passed
    bad = check.check("", '{"name": "Ada"')
    assert not bad.passed and bad.detail.startswith("not JSON")
    wrong = check.check("", '{"name": "Ada", "age": -1}')
    assert not wrong.passed and "schema violation at age" in wrong.detail
    assert "required" in check.check("", '{"name": "Ada"}').detail
    with pytest.raises(CheckSpecError, match="invalid JSON schema"):
        JsonCheck({"type": "no-such-type"})


def test_regex_and_length_bounds():
    assert RegexCheck(r"^\d{3}-\d{4}$").check("", "555-1234").passed
    assert not RegexCheck(r"TODO", must_match=False).check("", "x TODO y").passed
    with pytest.raises(CheckSpecError, match="invalid regex"):
        RegexCheck("(")
    check = LengthCheck(min_words=2, max_chars=20)
    assert check.check("", "two words").passed
    assert "1 words < minimum 2" in check.check("", "one").detail
    assert "characters > maximum 20" in check.check("", "a " * 30).detail


@pytest.mark.parametrize("answer, refused", [
    ("I'm sorry, but I can't help with that request.", True),
    ("As an AI language model, I cannot browse the internet.", True),
    ("I cannot provide instructions for that.", True),
    ("I must decline.", True),
    ("Sorry to hear that! Here is how to fix your bike chain: ...", False),
    ("The function can't be called before init; move the call below.", False),
    ("Here's a poem about autumn.", False),
])
def test_refusal_detection(answer, refused):
    assert looks_like_refusal(answer) is refused
    assert RefusalCheck().check("", answer).passed is not refused


def test_checks_from_specs_and_as_evaluator():
    checks = build_checks([{"kind": "json", "schema": SCHEMA}, {"kind": "length", "max_chars": 100},
                           {"kind": "refusal"}])
    evaluator = ChecksEvaluator(checks)
    assert isinstance(evaluator, Evaluator) and evaluator.version.startswith("checks:")
    good, bad = '{"name": "Ada", "age": 36}', "I'm sorry, I can't help with that."
    assert evaluator.score(["p", "p"], [good, bad]) == [1.0, pytest.approx(1 / 3)]  # bad: only length passes
    assert evaluator.compare(["p"], [bad], [good]) == [pytest.approx(0.5 + (1 - 1 / 3) / 2)]
    with pytest.raises(CheckSpecError, match="kind must be one of"):
        build_checks([{"kind": "nope"}])
    with pytest.raises(CheckSpecError, match=r"check #0 \(length\)"):
        build_checks([{"kind": "length", "max_lines": 3}])


def test_lexical_evaluator_through_the_factory(tmp_path):
    evaluator = load_evaluator(JudgeConfig(evaluator="lexical"), f"sqlite:///{tmp_path}/unused.db")
    assert isinstance(evaluator, LexicalEvaluator)
    prompt = "Explain why the sky is blue."
    full = ("The sky is blue because air molecules scatter short blue wavelengths of sunlight much more than red "
            "ones (Rayleigh scattering), so blue light reaches your eyes from every direction.")
    assert evaluator.score([prompt], [""]) == [0.0]
    assert evaluator.compare([prompt], ["I'm sorry, I can't help with that."], [full])[0] > 0.9
    with pytest.raises(EvaluatorConfigError, match="judge.teacher"):
        load_evaluator(JudgeConfig(evaluator="llm-judge"), "sqlite:///x.db")
    with pytest.raises(EvaluatorConfigError, match="unknown"):
        load_evaluator(JudgeConfig(evaluator="oracle"), "sqlite:///x.db")
