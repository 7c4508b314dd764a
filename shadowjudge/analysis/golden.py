"""Golden regression set: cases from past incidents that a candidate must pass before it can be promoted.

A case is a prompt with the properties its answer must have (YAML):

    - id: refund-policy-2026-03          # stable name; the incident it came from goes in `incident`
      prompt: "What is our refund window?"
      must_contain: ["30 days"]
      must_not_contain: ["I cannot help"]
      max_length: 600                    # characters
      json_schema: {type: object, required: [answer]}
      min_score: 0.6                     # judge score, needs a scorer

The checks are deterministic except `min_score`, which asks the judge (anything with `score(prompts, answers)`).

A case the candidate gave no answer to (the request failed: connection error, timeout, 5xx after retries; or it was
not asked) is unanswered, not failed: an outage, often on the evaluator's side, is no evidence that the candidate
answers wrongly, and must not roll it back. Nor has it passed: the report is incomplete, so the gate is inconclusive.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shadowjudge.errors import InputError


class GoldenSetError(InputError):
    """A golden set that cannot be used; the message names the file and the case."""


class AnswerScorer(Protocol):
    """The judge's pointwise scoring (evaluators.base.Evaluator satisfies it)."""

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]: ...


# An empty text is in every answer: required, it checks nothing; forbidden, it fails every answer.
NonEmptyText = Annotated[str, Field(min_length=1)]


class GoldenCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    incident: str | None = None
    must_contain: tuple[NonEmptyText, ...] = ()
    must_not_contain: tuple[NonEmptyText, ...] = ()
    case_sensitive: bool = False
    max_length: int | None = Field(default=None, gt=0)
    json_schema: dict[str, Any] | None = None
    min_score: float | None = Field(default=None, ge=0, le=1)

    @field_validator("must_contain", "must_not_contain", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from jsonschema.exceptions import SchemaError
            from jsonschema.validators import validator_for

            try:
                validator_for(v).check_schema(v)
            except SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
        return v


@dataclass(frozen=True)
class NoAnswer:
    """Stands for the answer to a case the candidate was asked but gave none to; `error_class` says why (the
    endpoint's: connection_error, timeout, server_error, ...), for the availability alert."""

    error_class: str


NOT_ASKED = NoAnswer("not_asked")
# Why a case may go unanswered without counting against the candidate: the endpoint was out of reach, overloaded or
# cut off (an outage, maybe the evaluator's own), or our side raised something unclassified. Any other error class
# (a malformed reply, a request it refused: bad_request, auth_error, not_found) is the candidate failing the case.
UNAVAILABLE = frozenset({"connection_error", "timeout", "server_error", "rate_limited", "stalled_stream",
                         "truncated_stream", "not_asked", "unexpected"})


@dataclass(frozen=True)
class GoldenCaseResult:
    """One case's outcome. `unanswered` is the error class of a case without an answer: neither passed nor failed."""

    case_id: str
    passed: bool
    failures: list[str]
    score: float | None = None
    incident: str | None = None
    unanswered: str | None = None


@dataclass(frozen=True)
class GoldenReport:
    target: str
    results: list[GoldenCaseResult]

    @property
    def passed(self) -> bool:
        """Every case answered and passed: only then has the candidate passed its golden set."""
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[GoldenCaseResult]:
        """Cases the candidate answered wrongly: these, and only these, fail the golden gate."""
        return [r for r in self.results if not r.passed and r.unanswered is None]

    @property
    def unanswered(self) -> list[GoldenCaseResult]:
        return [r for r in self.results if r.unanswered is not None]

    @property
    def status(self) -> str:
        """passed, failed (some answer is wrong, whatever else went unanswered) or incomplete (none wrong, some
        unanswered: the gate is inconclusive)."""
        return "failed" if self.failed else "incomplete" if self.unanswered else "passed"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "status": self.status, "passed": self.passed, "n_cases": len(self.results),
                "n_passed": sum(r.passed for r in self.results), "n_failed": len(self.failed),
                "n_unanswered": len(self.unanswered), "results": [asdict(r) for r in self.results]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GoldenReport:
        return cls(data["target"], [GoldenCaseResult(**r) for r in data["results"]])


def parse_golden_set(data: Any, source: str = "<golden set>") -> list[GoldenCase]:
    """Validate a list of cases (or a mapping with a `cases` list); ids must be unique."""
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    if not isinstance(data, list) or not data:
        raise GoldenSetError(f"{source}: expected a non-empty list of cases (or a mapping with 'cases')")
    cases = []
    for index, raw in enumerate(data):
        try:
            cases.append(GoldenCase.model_validate(raw))
        except ValidationError as exc:
            where = raw.get("id", f"#{index}") if isinstance(raw, dict) else f"#{index}"
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'case'}: {e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())
            raise GoldenSetError(f"{source}: case {where}: {problems}") from None
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise GoldenSetError(f"{source}: duplicate case ids {duplicates}")
    return cases


def load_golden_set(path: str | Path) -> list[GoldenCase]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GoldenSetError(f"{path}: cannot read golden set: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise GoldenSetError(f"{path}: cannot read golden set: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                             f"at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        raise GoldenSetError(f"{path}: not valid YAML: {exc}") from None
    return parse_golden_set(data, str(path))


_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n(.*?)\n\s*```\s*$", re.DOTALL)


def _json_failures(answer: str, schema: dict[str, Any]) -> list[str]:
    from jsonschema.validators import validator_for

    fenced = _FENCE.match(answer)
    text = fenced.group(1) if fenced else answer
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"answer is not JSON ({exc.msg} at line {exc.lineno})"]
    validator = validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"JSON schema: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5]]


def check_answer(case: GoldenCase, answer: str, score: float | None = None) -> list[str]:
    """What is wrong with `answer` for `case` (empty when it passes)."""
    failures = []
    haystack = answer if case.case_sensitive else answer.lower()
    for needle in case.must_contain:
        if (needle if case.case_sensitive else needle.lower()) not in haystack:
            failures.append(f"missing required text {needle!r}")
    for needle in case.must_not_contain:
        if (needle if case.case_sensitive else needle.lower()) in haystack:
            failures.append(f"contains forbidden text {needle!r}")
    if case.max_length is not None and len(answer) > case.max_length:
        failures.append(f"{len(answer)} characters, at most {case.max_length} allowed")
    if case.json_schema is not None:
        failures.extend(_json_failures(answer, case.json_schema))
    if case.min_score is not None and score is not None and not score >= case.min_score:  # NaN fails too
        failures.append(f"judge score {score:.3f} below {case.min_score}")
    return failures


def run_golden_set(cases: Sequence[GoldenCase], answers: Mapping[str, str | NoAnswer],
                   scorer: AnswerScorer | None = None, target: str = "candidate") -> GoldenReport:
    """Check the candidate's answers (by case id) against every golden case; any failure blocks promotion.

    A case without an answer (a NoAnswer, or missing: not asked) is unanswered, not failed, when the reason is in
    UNAVAILABLE; a NoAnswer for any other reason fails the case. Cases with `min_score`
    need `scorer`; the judge sees only the answered ones, in one batch.
    """
    texts = {c.id: a for c in cases if isinstance(a := answers.get(c.id), str)}
    needs_score = [c for c in cases if c.min_score is not None and c.id in texts]
    if needs_score and scorer is None:
        raise GoldenSetError(f"cases {[c.id for c in needs_score]} set min_score: run_golden_set needs a scorer")
    scores: dict[str, float] = {}
    if needs_score:
        values = scorer.score([c.prompt for c in needs_score], [texts[c.id] for c in needs_score])
        scores = {c.id: float(v) for c, v in zip(needs_score, values, strict=True)}
    results = []
    for case in cases:
        if case.id in texts:
            failures = check_answer(case, texts[case.id], scores.get(case.id))
            results.append(GoldenCaseResult(case.id, not failures, failures, scores.get(case.id), case.incident))
        else:
            missing = answers.get(case.id)
            reason = missing.error_class if isinstance(missing, NoAnswer) else NOT_ASKED.error_class
            if reason in UNAVAILABLE:
                results.append(GoldenCaseResult(case.id, False, [], incident=case.incident, unanswered=reason))
            else:
                results.append(GoldenCaseResult(case.id, False, [f"no usable answer: {reason}"],
                                                incident=case.incident))
    return GoldenReport(target, results)
