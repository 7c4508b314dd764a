"""Deterministic checks: JSON validity and schema, regex, length bounds, refusals.

They catch breakage no judge should have to notice (a model that stopped returning JSON, started refusing, or
truncates), are free to run on every pair, and say exactly what failed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, Protocol

import regex

from shadowjudge.errors import InputError

# The one refusal detector: the refusal check here and the refusal rate of output drift
# (shadowjudge.analysis.drift.is_refusal) both use it. It reads the opening only: the first sentence after at most
# two short leading ones ("I'm sorry." / "Sorry!" / "Thanks for asking."), so a refusal quoted later in a story is
# not the answer's. An apology followed by "but I ..." counts (in answers it almost always declines or cannot
# answer); "I can't help but ...", "I can't help you enough", "I can't tell you how glad ..." and concessions
# ("While I can't X, I can Y") do not.
_REFUSAL = re.compile(
    r"\W*+(?:[^.!?\n]{1,80}[.!?]+\s+){0,2}[^.!?\n]{0,80}?\b(?:"
    r"(?<!while )(?<!whilst )(?<!though )(?:"
    r"(?:I (?:can ?not|can'?t|(?:won'?t|will not)(?: be able to)?)|I(?:'m| am) (?:unable|not able|not going) to) "
    r"(?:help|assist|provide|comply|fulfil|fulfill|do that|answer|create|generate|write|share|support"
    r"|tell you(?! how (?:much|many|happy|glad|pleased|excited|grateful|thrilled|important|often|long|hard)\b)"
    r"|give (?:you )?(?:medical|legal|financial) advice)"
    r"\b(?! but\b)(?!(?: you)? enough\b)"
    r"|(?:that|this|it)(?:'s| is) not something I can (?:help|assist)\b)"
    r"|I(?:'m| am) sorry,? but (?:I|as|it(?:'s| is) not)\b"
    r"|as an AI(?: language model)?,? I (?:can ?not|can'?t|don'?t|do not|(?:'m| am) unable)"
    r"|I must (?:respectfully )?(?:decline|refuse)"
    r"|(?:this|that|your) request (?:is|goes) against"
    r")",
    re.IGNORECASE,
)
# A user's pattern runs on every answer of every analysis: one that backtracks catastrophically (`^(\w+\s?)+$` on a
# sentence ending in '!') must fail its answer, not hang the analysis. Run by the `regex` module, which has a timeout.
REGEX_TIMEOUT_S = 1.0
_REFUSAL_WINDOW = 400  # characters read: room for two short sentences and the refusing one
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\s*```\s*$", re.DOTALL | re.IGNORECASE)


class CheckSpecError(InputError):
    """A check definition that cannot be built (bad regex, bad schema, unknown kind)."""


def looks_like_refusal(answer: str | None) -> bool:
    """True when the answer opens by declining the request (see _REFUSAL; curly apostrophes count as straight
    ones, and only the first 400 characters are read, so the cost per answer is bounded)."""
    return bool(_REFUSAL.match((answer or "")[:_REFUSAL_WINDOW].replace("\u2019", "'")))


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str = ""


class Check(Protocol):
    name: str

    def check(self, prompt: str, answer: str) -> CheckResult: ...


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _refs(schema: Any) -> list[str]:
    """Every `$ref` string in a schema."""
    if isinstance(schema, Mapping):
        found = [schema["$ref"]] if isinstance(schema.get("$ref"), str) else []
        return found + [r for key, value in schema.items() if key != "$ref" for r in _refs(value)]
    if isinstance(schema, list):
        return [r for value in schema for r in _refs(value)]
    return []


def _local_ref_resolves(schema: Mapping[str, Any], ref: str) -> bool:
    """Whether `ref` is a JSON pointer into `schema` ('#', '#/$defs/x') that names something there."""
    if not ref.startswith("#"):
        return False
    node: Any = schema
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


@dataclass(frozen=True)
class JsonCheck:
    """The answer is strict JSON (a lone ```json fenced block is accepted; NaN and Infinity, which Python's parser
    takes but strict parsers reject, are not) and, if a schema is given, conforms to it."""

    schema: Mapping[str, Any] | None = None
    name: str = "json"

    def __post_init__(self) -> None:
        if self.schema is not None:
            import jsonschema

            if not isinstance(self.schema, Mapping):
                raise CheckSpecError(f"check '{self.name}': schema must be a JSON Schema object (a mapping), got "
                                     f"{type(self.schema).__name__} {self.schema!r}"[:300])
            try:
                jsonschema.validators.validator_for(self.schema).check_schema(self.schema)
            except jsonschema.SchemaError as exc:
                raise CheckSpecError(f"check '{self.name}': invalid JSON schema: {exc.message}") from None
            for ref in _refs(self.schema):  # resolved only when an answer reaches them: check them all now
                if not _local_ref_resolves(self.schema, ref):
                    raise CheckSpecError(f"check '{self.name}': JSON schema $ref {ref!r} does not resolve (only "
                                         "references inside the schema, '#/...', are followed)")

    def check(self, prompt: str, answer: str) -> CheckResult:
        text = answer or ""
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1)
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            return CheckResult(self.name, False, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        except ValueError as exc:  # NaN / Infinity, from _reject_constant
            return CheckResult(self.name, False, f"not JSON: {exc}")
        except RecursionError:
            return CheckResult(self.name, False, "not JSON: nested too deeply to parse")
        if self.schema is not None:
            import jsonschema

            error = jsonschema.exceptions.best_match(
                jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(value))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                return CheckResult(self.name, False, f"schema violation at {where}: {error.message}")
        return CheckResult(self.name, True)


@dataclass(frozen=True)
class RegexCheck:
    """The answer matches (or, with must_match=False, never matches) a regular expression, searched anywhere in it:
    ^ and $ anchor at the answer's start and end, so `^\\d+$` means the whole answer is a number; a pattern that
    means lines asks for it with (?m)."""

    pattern: str
    must_match: bool = True
    name: str = "regex"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not isinstance(self.must_match, bool):
            raise CheckSpecError(f"check '{self.name}': pattern must be text and must_match true or false, got "
                                 f"pattern {self.pattern!r}, must_match {self.must_match!r}")
        try:
            regex.compile(self.pattern)
        except (regex.error, ValueError) as exc:
            raise CheckSpecError(f"check '{self.name}': invalid regex {self.pattern!r}: {exc}") from None

    def check(self, prompt: str, answer: str) -> CheckResult:
        try:
            found = regex.search(self.pattern, answer or "", timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            return CheckResult(self.name, False, f"{self.pattern!r} ran over {REGEX_TIMEOUT_S} s on this answer "
                               "(catastrophic backtracking): counted as failed")
        if found == self.must_match:
            return CheckResult(self.name, True)
        return CheckResult(self.name, False, ("no match for " if self.must_match else "forbidden match for ")
                           + repr(self.pattern))


@dataclass(frozen=True)
class LengthCheck:
    """Length in characters and/or words within bounds (None = unbounded)."""

    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None
    name: str = "length"

    def __post_init__(self) -> None:
        """Bad bounds are refused when the check is built, not with a TypeError on the first answer checked."""
        for low, high, unit in ((self.min_chars, self.max_chars, "chars"), (self.min_words, self.max_words, "words")):
            for key, bound in ((f"min_{unit}", low), (f"max_{unit}", high)):
                if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
                    raise CheckSpecError(f"check '{self.name}': {key} must be a whole number >= 0, got {bound!r}")
            if low is not None and high is not None and low > high:
                raise CheckSpecError(f"check '{self.name}': min_{unit} {low} > max_{unit} {high}")

    def check(self, prompt: str, answer: str) -> CheckResult:
        text = answer or ""
        chars, words = len(text), len(text.split())
        for value, low, high, unit in ((chars, self.min_chars, self.max_chars, "characters"),
                                       (words, self.min_words, self.max_words, "words")):
            if low is not None and value < low:
                return CheckResult(self.name, False, f"{value} {unit} < minimum {low}")
            if high is not None and value > high:
                return CheckResult(self.name, False, f"{value} {unit} > maximum {high}")
        return CheckResult(self.name, True)


@dataclass(frozen=True)
class RefusalCheck:
    """Passes when the answer does not decline the request."""

    name: str = "no_refusal"

    def check(self, prompt: str, answer: str) -> CheckResult:
        if looks_like_refusal(answer):
            return CheckResult(self.name, False, "answer opens with a refusal")
        return CheckResult(self.name, True)


_KINDS: dict[str, type] = {"json": JsonCheck, "regex": RegexCheck, "length": LengthCheck, "refusal": RefusalCheck}


def build_checks(specs: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Checks from plain dicts, e.g. [{"kind": "json", "schema": {...}}, {"kind": "length", "max_chars": 4000}]."""
    checks: list[Check] = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if not isinstance(kind, str) or kind not in _KINDS:
            raise CheckSpecError(f"check #{i}: kind must be one of {sorted(_KINDS)}, got {kind!r}")
        spec.setdefault("name", f"{kind}" if kind != "refusal" else "no_refusal")
        check_spec_fields(f"check #{i} ({kind})", _KINDS[kind], spec)
        try:
            checks.append(_KINDS[kind](**spec))
        except (TypeError, ValueError) as exc:  # a field of the wrong type (a schema that is a number, ...)
            raise CheckSpecError(f"check #{i} ({kind}): {exc}") from None
    return checks


def check_spec_fields(label: str, kind: type, spec: Mapping[str, Any]) -> None:
    """Refuse unknown and missing fields in the config's words, before the dataclass would raise a TypeError that
    names `RegexCheck.__init__()`."""
    known = {f.name: f for f in fields(kind)}
    required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    unknown = sorted(str(key) for key in spec if key not in known)
    if unknown:
        raise CheckSpecError(f"{label}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(this kind takes: kind, {', '.join(known)})")
    missing = [name for name in required if name not in spec]
    if missing:
        raise CheckSpecError(f"{label}: missing {', '.join(missing)} (required for this kind)")


def run_checks(checks: Sequence[Check], prompts: Sequence[str], answers: Sequence[str]) -> list[list[CheckResult]]:
    return [[c.check(p, a) for c in checks] for p, a in zip(prompts, answers, strict=True)]


class ChecksEvaluator:
    """The checks as an Evaluator: score = fraction passed; compare = 0.5 + (score_c - score_i) / 2."""

    def __init__(self, checks: Sequence[Check]) -> None:
        if not checks:
            raise CheckSpecError("ChecksEvaluator needs at least one check")
        self.checks = list(checks)
        digest = hashlib.sha1(repr(self.checks).encode()).hexdigest()[:10]
        self.version = f"checks:{digest}"

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [sum(r.passed for r in row) / len(row) for row in run_checks(self.checks, prompts, answers)]

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        inc, cand = self.score(prompts, incumbent), self.score(prompts, candidate)
        return [0.5 + (c - i) / 2 for i, c in zip(inc, cand, strict=True)]
