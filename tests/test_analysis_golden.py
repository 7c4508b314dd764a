"""Golden regression set: loading, every check, and a scorer for min_score."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from shadowjudge.analysis import GoldenSetError, load_golden_set, parse_golden_set, run_golden_set
from test_analysis_alpaca_runs import mini

GOLDEN_YAML = """
cases:
  - id: refund-window
    incident: INC-101 (candidate invented a 90-day window)
    prompt: What is the refund window?
    must_contain: ["30 days"]
    must_not_contain: ["90 days"]
    max_length: 200
  - id: order-json
    prompt: Return the order as JSON.
    json_schema:
      type: object
      required: [order_id, items]
      properties:
        order_id: {type: string}
        items: {type: array, minItems: 1}
  - id: helpful
    prompt: How do I cook a salmon fillet on a stove top pan?
    must_not_contain: I cannot help
    min_score: 0.5
"""


class LengthScorer:
    """Scores by answer length (a stand-in judge with known output): long answers score high."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        self.calls.append((list(prompts), list(answers)))
        return [min(1.0, len(a) / 500) for a in answers]


@pytest.fixture
def cases(tmp_path):
    path = tmp_path / "golden.yaml"
    path.write_text(GOLDEN_YAML)
    return load_golden_set(path)


def _salmon_answer(model: str) -> str:
    data = mini()
    pid = next(p["id"] for p in data.prompts if p["instruction"].startswith("How do I cook a salmon fillet"))
    return data.outputs[(model, pid)]


def test_a_good_candidate_passes_every_case(cases):
    scorer = LengthScorer()
    answers = {"refund-window": "You can return items within 30 days of delivery.",
               "order-json": '```json\n{"order_id": "A-1", "items": [{"sku": "x"}]}\n```',
               "helpful": _salmon_answer("FuseChat-Gemma-2-9B-Instruct")}  # a real, long answer
    report = run_golden_set(cases, answers, scorer, target="gemma")
    assert report.passed, report.to_dict()
    assert scorer.calls and scorer.calls[0][0] == ["How do I cook a salmon fillet on a stove top pan?"]


def test_each_failure_is_named(cases):
    answers = {"refund-window": "Refunds are accepted for 90 days. " + "x" * 200,
               "order-json": '{"order_id": 7}',
               "helpful": "I cannot help with cooking."}
    report = run_golden_set(cases, answers, LengthScorer(), target="bad")
    assert not report.passed and len(report.failed) == 3
    failures = {r.case_id: " | ".join(r.failures) for r in report.results}
    assert "missing required text '30 days'" in failures["refund-window"]
    assert "forbidden text '90 days'" in failures["refund-window"]
    assert "at most 200 allowed" in failures["refund-window"]
    assert "order_id: 7 is not of type 'string'" in failures["order-json"]
    assert "'items' is a required property" in failures["order-json"]
    assert "forbidden text 'I cannot help'" in failures["helpful"] and "judge score" in failures["helpful"]
    assert report.results[0].incident.startswith("INC-101")
    assert report.to_dict()["n_failed"] == 3


def test_a_judge_score_that_is_not_a_number_fails_min_score(cases):
    class NanScorer:
        def score(self, prompts, answers):
            return [float("nan")] * len(prompts)

    report = run_golden_set(cases, {"helpful": _salmon_answer("FuseChat-Gemma-2-9B-Instruct")}, NanScorer())
    helpful = next(r for r in report.results if r.case_id == "helpful")
    assert any("judge score nan below" in f for f in helpful.failures)


def test_missing_answers_are_unanswered_not_failed_and_min_score_needs_a_scorer(cases):
    report = run_golden_set(cases, {"refund-window": "30 days"}, LengthScorer())
    assert report.failed == [] and not report.passed and report.status == "incomplete"
    assert [(r.case_id, r.unanswered, r.failures) for r in report.unanswered] == [
        ("order-json", "not_asked", []), ("helpful", "not_asked", [])]
    with pytest.raises(GoldenSetError, match="min_score: run_golden_set needs a scorer"):
        run_golden_set(cases, {"helpful": "some answer"})
    assert not run_golden_set(cases, {"order-json": "not json"}).passed


@pytest.mark.parametrize("data, message", [
    ([], "non-empty list"),
    ([{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}], "duplicate case ids"),
    ([{"id": "a", "prompt": "p", "max_lenght": 3}], "case a: max_lenght"),
    ([{"id": "b", "prompt": "p", "json_schema": {"type": "objekt"}}], "not a valid JSON Schema"),
    ([{"prompt": "p"}], "case #0: id"),
    # An empty text is in every answer: forbidden it failed every answer, required it checked nothing.
    ([{"id": "a", "prompt": "p", "must_not_contain": [""]}], "case a: must_not_contain.0: String should have at least"),
    ([{"id": "a", "prompt": "p", "must_contain": ""}], "case a: must_contain.0: String should have at least"),
])
def test_bad_golden_sets_are_clear_errors(data, message):
    with pytest.raises(GoldenSetError, match=message):
        parse_golden_set(data, "golden.yaml")


def test_unreadable_golden_file(tmp_path):
    with pytest.raises(GoldenSetError, match="cannot read golden set"):
        load_golden_set(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cases: [unclosed")
    with pytest.raises(GoldenSetError, match="not valid YAML"):
        load_golden_set(bad)
