"""Deterministic checks and the model-free evaluators."""

from __future__ import annotations

import re
import time

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


@pytest.mark.parametrize("answer", ['{"score": NaN}', "[Infinity, -Infinity]", '```json\n{"score": -Infinity}\n```'])
def test_json_rejects_nan_and_infinity_as_strict_parsers_do(answer):
    result = JsonCheck().check("", answer)
    assert not result.passed and result.detail.startswith("not JSON") and "is not valid JSON" in result.detail


def test_json_nested_too_deeply_to_parse_fails_the_check_instead_of_raising():
    result = JsonCheck().check("", "[" * 100_000 + "]" * 100_000)
    assert not result.passed and "nested too deeply" in result.detail


@pytest.mark.parametrize("answer", ['```json\n{"name": "Ada", "age": 36}```', '```\n{"name": "Ada", "age": 36}  ```\n',
                                    '```JSON\n{"name": "Ada", "age": 36}\n```'])
def test_json_fence_may_close_on_the_json_line(answer):
    assert JsonCheck(SCHEMA).check("", answer).passed


def test_regex_and_length_bounds():
    assert RegexCheck(r"^\d{3}-\d{4}$").check("", "555-1234").passed
    assert not RegexCheck(r"TODO", must_match=False).check("", "x TODO y").passed
    with pytest.raises(CheckSpecError, match="invalid regex"):
        RegexCheck("(")
    check = LengthCheck(min_words=2, max_chars=20)
    assert check.check("", "two words").passed
    assert "1 words < minimum 2" in check.check("", "one").detail
    assert "characters > maximum 20" in check.check("", "a " * 30).detail


def test_regex_anchors_at_the_answer_unless_the_pattern_asks_for_lines():
    """^ and $ used to anchor at every line, so a number on a line of its own passed a whole-answer pattern."""
    assert not RegexCheck(r"^\d+$").check("", "Sure:\n42\nbye").passed
    assert RegexCheck(r"^\d+$").check("", "42\n").passed
    assert RegexCheck(r"(?m)^\d+$").check("", "Sure:\n42\nbye").passed
    assert RegexCheck(r"^DROP", must_match=False).check("", "ok\nDROP TABLE").passed
    assert not RegexCheck(r"(?m)^DROP", must_match=False).check("", "ok\nDROP TABLE").passed


@pytest.mark.parametrize("bounds, message", [
    ({"max_chars": "100"}, "max_chars must be a whole number >= 0, got '100'"),
    ({"min_words": 2.5}, "min_words must be a whole number"),
    ({"max_words": True}, "max_words must be a whole number"),
    ({"min_chars": -1}, "min_chars must be a whole number >= 0, got -1"),
    ({"min_chars": 10, "max_chars": 5}, "min_chars 10 > max_chars 5"),
    ({"min_words": 3, "max_words": 2}, "min_words 3 > max_words 2"),
])
def test_length_bounds_are_refused_when_the_check_is_built(bounds, message):
    """A string bound built fine and raised TypeError on the first answer checked; min > max failed every answer."""
    with pytest.raises(CheckSpecError, match=re.escape(f"check 'length': {message}")):
        build_checks([{"kind": "length", **bounds}])
    assert LengthCheck(min_chars=0, max_chars=0, min_words=2, max_words=2).check("", "").detail.startswith("0 words")


@pytest.mark.parametrize("answer, refused", [
    ("I'm sorry, but I can't help with that request.", True),
    ("As an AI language model, I cannot browse the internet.", True),
    ("I cannot provide instructions for that.", True),
    ("I must decline.", True),
    ("Sorry to hear that! Here is how to fix your bike chain: ...", False),
    ("The function can't be called before init; move the call below.", False),
    ("Here's a poem about autumn.", False),
    # a curly apostrophe (U+2019) is an apostrophe
    ("I\u2019m sorry, but I can\u2019t help with that.", True),
    ("I can\u2019t assist with that request.", True),
    # "I'm unable / not able to", written without a space before 'm
    ("I'm unable to help with that request.", True),
    ("I'm not able to provide that information.", True),
    ("I am not able to share those details.", True),
    # an apology (or one or two other short sentences) before the refusal
    ("I'm sorry. I can't help with that.", True),
    ("Sorry! I cannot assist with this request.", True),
    ("Thanks for asking. I'm sorry, but I won't write that.", True),
    ("I'm sorry, but as an AI I don't have access to your files.", True),
    ("I'm sorry, but it is not appropriate to joke about that.", True),
    ("I apologise, but this request goes against my guidelines.", True),
    ("I must respectfully decline.", True),
    # idioms and ordinary answers that merely start like one
    ("I can't help but recommend Python: it is the best first language.", False),
    ("I cannot help but admire the view. Here is the poem you asked for.", False),
    ("I cannot stress enough how important backups are.", False),
    ("I can't believe how easy this is! Just call sorted().", False),
    ("Sorry for the delay, here is the code:\n```python\nprint(1)\n```", False),
    ("I'm sorry to hear that. Here is how to fix your bike chain: ...", False),
    ("I apologize for the confusion. The correct answer is 42.", False),
    ("I'm not a doctor, but rest and fluids usually help.", False),
    ("While I can't write it for you, I can outline your memoir chapter by chapter: ...", False),
    ("I can provide guidance. First, outline the essay.", False),
    # more ways to decline, and a concession and an idiom that do not
    ("Unfortunately, I won't be able to help with that.", True),
    ("I'm not going to help with that.", True),
    ("I can't tell you how to pick a lock.", True),
    ("I can't give medical advice, so please see a doctor.", True),
    ("I'm afraid that's not something I can help with.", True),
    ("Whilst I can't provide legal advice, here is how the law generally works: ...", False),
    ("I can't help you enough: here's the full plan, step by step.", False),
    ("I can't tell you how happy I am to help! Here is the plan.", False),
    ("I can't tell you how many people ask this. The answer is 42.", False),
    ("I'm not going to give you the full solution, but here's a hint: look at the loop bound.", False),
    ("I won't be able to give a definitive number, but typical ranges are 10-20%.", False),
])
def test_refusal_detection(answer, refused):
    assert looks_like_refusal(answer) is refused
    assert RefusalCheck().check("", answer).passed is not refused


def test_only_the_opening_of_an_answer_is_read_for_a_refusal():
    """A refusal states itself in the opening (at most two short sentences before it): one quoted later in a
    story is not the answer's, while a story that opens with a quoted refusal reads as one (accepted: the opening
    is all that is read, which keeps the check cheap on every answer)."""
    story = ("Here is a short story. The robot had served the family for years. One night the child asked it to "
             "open the door. \"I can't help you with that,\" it said, and the lights went out.")
    assert not looks_like_refusal(story)
    assert looks_like_refusal("\"I can't help you,\" said the wizard, and closed the door.")
    assert not looks_like_refusal("Here is the plan. " * 30 + "I cannot help with that.")
    assert not looks_like_refusal(None) and not looks_like_refusal("")


def test_refusal_detection_stays_cheap_on_adversarial_openings():
    texts = ["a" * 5000, "I " * 2500, "Sorry! " * 700, "I'm sorry, " * 450, "x. " * 1600, "\u2019" * 5000,
             ("word " * 15 + ". ") * 60]
    start = time.perf_counter()
    for _ in range(20):
        for text in texts:
            looks_like_refusal(text)
    assert time.perf_counter() - start < 0.5


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
    with pytest.raises(CheckSpecError, match=r"check #0 \(length\): unknown field max_lines \(this kind takes: "
                                             r"kind, min_chars, max_chars, min_words, max_words, name\)"):
        build_checks([{"kind": "length", "max_lines": 3}])


def test_a_check_spec_error_speaks_the_configs_words_not_pythons():
    """Unknown and missing fields used to surface as "RegexCheck.__init__() got an unexpected keyword argument"."""
    cases = [({"kind": "regex", "pattern": "a", "flags": "i", "multiline": True},
              "check #0 (regex): unknown fields flags, multiline (this kind takes: kind, pattern, must_match, name)"),
             ({"kind": "regex", "name": "id"}, "check #0 (regex): missing pattern (required for this kind)"),
             ({"kind": "refusal", "threshold": 2}, "check #0 (refusal): unknown field threshold"),
             ({"kind": "json", "schema": 3},
              "check 'json': schema must be a JSON Schema object (a mapping), got int 3"),
             ({"kind": ["regex"]}, "check #0: kind must be one of ['json', 'length', 'refusal', 'regex'], got "
                                   "['regex']")]
    for spec, words in cases:
        with pytest.raises(CheckSpecError) as exc:
            build_checks([spec])
        assert words in str(exc.value) and "__init__" not in str(exc.value)


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
    with pytest.raises(ValueError, match="'small-judge', 'llm-judge' or 'lexical'"):  # refused with the config
        JudgeConfig(evaluator="oracle")


@pytest.mark.parametrize("ref", ["#/$defs/Missing", "https://example.com/answer.json", "#/properties/nope"])
def test_a_schema_reference_that_does_not_resolve_is_refused_when_the_check_is_built(ref):
    """check_schema never resolves $ref: a dangling one passed the config and crashed every analysis of the route
    on the first answer that parsed as JSON."""
    schema = {"type": "object", "$defs": {"Answer": {"type": "string"}}, "properties": {"answer": {"$ref": ref}}}
    with pytest.raises(CheckSpecError, match="does not resolve"):
        build_checks([{"kind": "json", "schema": schema}])
    resolving = {**schema, "properties": {"answer": {"$ref": "#/$defs/Answer"}}}
    [check] = build_checks([{"kind": "json", "schema": resolving}])
    assert check.check("", '{"answer": "yes"}').passed and not check.check("", '{"answer": 3}').passed


def test_a_pattern_that_backtracks_catastrophically_fails_its_answer_instead_of_hanging():
    """A user's `^(\\w+\\s?)+$` took 33 s on a 9-word answer ending in '!' under `re` and never ended on 16 words: the
    analysis, which runs every check on every answer, hung. Patterns run under `regex`, which matches that one at
    once and stops one it cannot (`(a|aa)+$`) at REGEX_TIMEOUT_S, failing the answer."""
    [words] = build_checks([{"kind": "regex", "pattern": r"^(\w+\s?)+$", "name": "words_only"}])
    assert not words.check("", "one two three four five six seven eight nine ten eleven twelve thirteen x!").passed
    assert words.check("", "just words here").passed
    [runaway] = build_checks([{"kind": "regex", "pattern": r"(a|aa)+$", "name": "runaway"}])
    result = runaway.check("", "a" * 40 + "b")
    assert not result.passed and "catastrophic backtracking" in result.detail


@pytest.mark.parametrize("spec", [{"pattern": "^Hi", "must_match": "false"}, {"pattern": 404}])
def test_a_regex_checks_fields_of_the_wrong_type_are_refused_when_built(spec):
    """must_match: 'false' (quoted in YAML) was compared with a bool and failed every answer, silently."""
    with pytest.raises(CheckSpecError, match="must_match true or false"):
        build_checks([{"kind": "regex", **spec}])
