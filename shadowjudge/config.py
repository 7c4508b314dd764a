"""One YAML config, validated by pydantic, with env-var overrides for secrets and URLs.

Overrides use `SHADOWJUDGE__SECTION__KEY=value` (double underscores walk the tree; list items by
index, e.g. `SHADOWJUDGE__ROUTES__0__INCUMBENT__BASE_URL`; keys match the file's whatever their case). A text
field takes the value as written, other fields read it as YAML. Secrets are never written in the file:
targets name the env var that holds their key (`api_key_env`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shadowjudge.errors import InputError

ENV_PREFIX = "SHADOWJUDGE__"


class ConfigError(InputError):
    """A config that cannot be used; the message names the file, the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[^\x00-\x1f\x7f'\"`/\\]{1,128}")
RESERVED_TARGET_NAMES = frozenset({"__cycle__"})  # the MLflow tag value of a cycle's parent run


def _env_var_name(value: str) -> str:
    """An `*_env` field names a variable; a value that cannot be one is most likely the secret itself, so the
    message never repeats it."""
    if not _ENV_NAME.fullmatch(value):
        raise ValueError("must be the NAME of an environment variable (letters, digits, '_'), not its value: "
                         "put the secret in the environment and its name here")
    return value


def _plain_name(value: str) -> str:
    """Route and target names end up in MLflow search filters, gateway ids (`route/target`) and file names."""
    if value != value.strip() or not _NAME.fullmatch(value):
        raise ValueError(f"{value!r}: a name must be 1-128 characters without quotes, slashes, control "
                         "characters or surrounding spaces")
    return value


def logged_name_matches(logged: str, name: str) -> bool:
    """Whether a model name a gateway logged and a configured one name the same model: equal but for case, or one is
    the other behind a provider prefix (gateways log 'openai/gpt-4o' or 'GPT-4o' for the model a target calls
    'gpt-4o'). 'acme/llama-3' and 'meta-llama/llama-3' stay two models: a fine-tune keeps its base's name."""
    a, b = logged.strip().lower(), name.strip().lower()
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def _logged_name(value: str) -> str:
    if not value.strip() or value.strip().endswith("/"):
        raise ValueError(f"{value!r}: a logged model name must name a model (not be empty or end in '/')")
    return value


def did_you_mean(unknown: Iterable[str], known: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the unknown words that have a near known one (a `metadata.<key>` typo is compared
    with `metadata.`), else ''."""
    known = list(known)
    unknown = list(unknown)
    pairs: list[tuple[str, str]] = []
    for word in unknown:
        head, dot, rest = word.partition(".")
        if dot and difflib.get_close_matches(head, ["metadata"], n=1):
            nearest = [f"metadata.{rest}"]
        else:
            nearest = difflib.get_close_matches(word, known, n=1)
        if nearest:
            pairs.append((word, nearest[0]))
    if not pairs:
        return ""
    if len(unknown) == 1:
        return f"; did you mean '{pairs[0][1]}'?"
    return "; did you mean " + ", ".join(f"'{near}' for '{word}'" for word, near in pairs) + "?"


EnvVarName = Annotated[str, AfterValidator(_env_var_name)]
PlainName = Annotated[str, AfterValidator(_plain_name)]
LoggedName = Annotated[str, AfterValidator(_logged_name)]


class StoreConfig(_Strict):
    url: str = "sqlite:///.shadowjudge/shadowjudge.db"


class MlflowConfig(_Strict):
    tracking_uri: str = "sqlite:///.shadowjudge/mlflow.db"
    experiment_prefix: str = "shadowjudge"
    ui_url: str | None = Field(default=None, description="Base URL of the MLflow UI, for links in alerts")
    enabled: bool = True


class SourceConfig(_Strict):
    """A traffic source. `kind` picks the module in shadowjudge.traffic that reads it."""

    name: str
    kind: Literal["jsonl", "otel", "sql"] = "jsonl"
    path: str | None = None
    url: str | None = None
    table: str | None = None
    mapping: str | dict[str, str] | None = None
    max_record_bytes: int = Field(default=1_000_000, gt=0)
    batch_size: int = Field(default=1000, gt=0)
    settle_s: float = Field(default=0.0, ge=0, description="sql: read only rows older than this many seconds, so "
                            "rows a batching writer (e.g. LiteLLM) commits late are not passed by the cursor")

    @model_validator(mode="after")
    def _needs_location(self) -> "SourceConfig":
        if self.kind in ("jsonl", "otel") and not self.path:
            raise ValueError(f"source kind '{self.kind}' needs 'path'")
        if self.kind == "sql" and not (self.url and (self.table or self.mapping)):
            raise ValueError("source kind 'sql' needs 'url' and 'table' (or a 'mapping' that names one)")
        return self


def mapping_problem(source: SourceConfig) -> str | None:
    """What is wrong with a source's mapping, judged by its reader's own presets and keys: Config checks it when the
    file loads, so a typo is a config error naming the file and the key, not an ingest that fails (sql) or a key
    silently never read (otel, jsonl). A SourceConfig built in code skips this check: its sql mapping and otel
    mapping keys are checked when its reader opens it, an otel preset or a jsonl mapping is ignored there."""
    if source.kind == "sql":
        from shadowjudge.traffic.sources.sql import MappingError, effective_mapping

        try:
            effective_mapping(source.mapping, source.table)
        except MappingError as exc:
            return f"source '{source.name}': {exc}"
    elif source.mapping is not None and source.kind == "otel":
        from shadowjudge.traffic.sources.otel import MAPPABLE

        if not isinstance(source.mapping, dict):
            return (f"source '{source.name}': otel sources have no mapping presets ('{source.mapping}'): give "
                    f"attribute names by key ({sorted(MAPPABLE)} and metadata.<key>)")
        unknown = [k for k in source.mapping if k not in MAPPABLE and not k.startswith("metadata.")]
        if unknown:
            return (f"source '{source.name}': mapping keys {unknown} are not used by otel sources"
                    f"{did_you_mean(unknown, MAPPABLE)} (known: {sorted(MAPPABLE)} and metadata.<key>)")
    elif source.mapping is not None and source.kind == "jsonl":
        return f"source '{source.name}': jsonl sources read OpenAI-style logs and take no 'mapping'"
    return None


def _metadata_scalar(value: Any) -> Any:
    """One message for a value no member of the union takes, not one per member."""
    if value is not None and not isinstance(value, (str, bool, int, float)):
        raise ValueError(f"must be text, a number, true/false or null, not {type(value).__name__}")
    return value


MetadataValue = Annotated[str | bool | int | float | None, BeforeValidator(_metadata_scalar)]


class SamplingConfig(_Strict):
    rate: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: str = "shadowjudge"
    routes: list[str] = Field(default_factory=list, description="Only these routes; empty means all")
    models: list[str] = Field(default_factory=list, description="Only these incumbent models; empty means all")
    metadata_equals: dict[str, MetadataValue] = Field(default_factory=dict, description=(
        "Keep only requests whose metadata has these values: true/false match a JSON boolean (or the text "
        "'true'/'false' in any case), a number an equal number (1 matches 1.0, or text that reads as it), text the "
        "same text (or the boolean or number it spells: 'true' matches true, '1' matches 1), null a missing or null "
        "value"))
    stratify_by: str | None = Field(default=None, description="Metadata key whose values are strata")
    per_stratum_quota: int | None = Field(default=None, gt=0)
    min_per_stratum: int = Field(default=0, ge=0, description=(
        "Floor per stratum per UTC day, kept beyond the rate and even past daily_cap (counting toward it); "
        "first-come in read order"))
    daily_cap: int | None = Field(default=None, gt=0, description=(
        "Samples per UTC day; only min_per_stratum floors go past it; first-come in read order"))


class RedactionConfig(_Strict):
    enabled: bool = True
    extra_patterns: dict[str, str] = Field(default_factory=dict, description="name -> regex")

    @field_validator("extra_patterns")
    @classmethod
    def _compiles(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for name, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern '{name}' is not a valid regex: {exc}") from None
        return v


class Price(_Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)


class TargetConfig(_Strict):
    """One model behind an OpenAI-compatible endpoint, as the gateway names it."""

    name: PlainName
    model: str
    base_url: str
    api_key_env: EnvVarName | None = None
    api_key_secret: str | None = Field(default=None, description="Prefect Secret block holding the key (wins over api_key_env)")
    concurrency: int = Field(default=8, gt=0)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    logged_as: list[LoggedName] = Field(
        default_factory=list, description="Other names the gateway's logs give this target's answers (e.g. the dated "
        "version the provider reports, 'gpt-4o-2024-08-06'); its model and name count without being listed")

    def logged_names(self) -> tuple[str, ...]:
        """Every name a gateway log may give this target's answers (matched with `logged_name_matches`)."""
        return (self.model, self.name, *self.logged_as)

    def logged_as_this(self, logged: str) -> bool:
        return any(logged_name_matches(logged, n) for n in self.logged_names())

    def api_key(self) -> str:
        """The key from the environment; a placeholder for keyless local endpoints."""
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ConfigError(f"target '{self.name}': env var {self.api_key_env} is not set")
            return value
        return "not-needed"


class ShadowConfig(_Strict):
    stream: bool = True
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    max_tokens: int | None = Field(default=512, gt=0)
    budget_usd: float | None = Field(default=None, gt=0)
    consistency_k: int = Field(default=1, ge=1)
    max_samples: int | None = Field(default=None, gt=0, description="Cap on samples replayed per cycle")
    retry_backoff_s: float = Field(default=0.5, gt=0, description="First retry waits about this (x2 each retry, jittered)")


class JudgeConfig(_Strict):
    evaluator: Literal["small-judge", "llm-judge", "lexical"] = "small-judge"
    model_uri: str | None = Field(default=None, description="Default: models:/<registered_name>@champion")
    registered_name: str = "shadowjudge-judge"
    accept_floor: float = Field(default=0.5, ge=0, le=1, description="Score at which an answer is accepted")
    calibration_fraction: float = Field(default=0.0, ge=0, le=1)
    batch_size: int = Field(default=32, gt=0)
    teacher: TargetConfig | None = Field(
        default=None, description="LLM-as-judge endpoint: the evaluator when evaluator=llm-judge, and the teacher "
                                  "that calibration sends calibration_fraction of scored pairs to")

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> "JudgeConfig":
        if self.calibration_fraction > 0 and self.teacher is None:
            raise ValueError("calibration_fraction > 0 needs judge.teacher (the LLM judge endpoint that checks the "
                             "small judge)")
        return self


CANARY_METRICS = ("quality", "error_rate", "cost_per_outcome", "latency_p95", "ttft", "checks")
# `checks` is measured only on a route that declares checks (routes[].checks). There, unless the criteria say
# otherwise, it weighs CHECKS_WEIGHT in the canary score (as much as error_rate: an answer that breaks the declared
# format is, to the caller parsing it, as broken as an error) and is critical.
CHECKS_WEIGHT = 20.0


class CriteriaConfig(_Strict):
    """Success criteria declared before a test starts (Kayenta-style)."""

    min_quality_ratio: float = Field(default=0.97, gt=0)
    max_cost_ratio: float = Field(default=1.10, gt=0)
    max_p95_latency_ratio: float = Field(default=1.0, gt=0)
    max_error_rate_delta: float = Field(default=0.0, ge=0)
    max_check_failure_delta: float = Field(
        default=0.0, ge=0, description="Mean share of the route's checks an answer fails: candidate "
        "minus incumbent on the same samples (only on a route that declares checks)")
    min_samples: int = Field(default=30, gt=0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    # What a judge that only gives preferences must show instead of the quality ratio.
    min_preference: float = Field(default=0.45, ge=0, le=1, description="Lowest mean P(candidate better) tolerated")
    max_ttft_ratio: float = Field(default=1.0, gt=0, description="Time to first token, candidate over incumbent")
    length_controlled_quality: bool = Field(
        default=False, description="Judge quality compared at equal answer length: what the judge's preference for "
        "longer answers gives a wordier candidate is taken out (AlpacaEval 2.0's length control, fitted on the run's "
        "pairs); off, the plain comparison decides and the length-controlled one is reported beside it")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"quality": 40, "error_rate": 20, "cost_per_outcome": 15, "latency_p95": 15, "ttft": 10},
        description="Metric weights of the canary score; a metric left out is measured but not scored (on a route "
        "with checks, `checks` left out weighs 20: give it 0 to measure it without scoring it)")
    critical: list[str] = Field(default_factory=lambda: ["quality", "error_rate"],
                                description="Metrics whose failure fails the candidate whatever the score (on a "
                                "route with checks, the default list gains `checks`; a list given is used as written)")
    pass_score: float = Field(default=95, ge=0, le=100)
    marginal_score: float = Field(default=75, ge=0, le=100)
    min_slice_samples: int = Field(default=20, gt=0)
    slice_failure: Literal["fail", "mark"] = Field(
        default="fail", description="A failing slice fails the candidate ('fail') or caps it at marginal ('mark')")
    bootstrap_resamples: int = Field(default=2000, ge=200)

    @model_validator(mode="after")
    def _known_metrics(self) -> "CriteriaConfig":
        unknown = (set(self.weights) | set(self.critical)) - set(CANARY_METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {list(CANARY_METRICS)}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("metric weights must be >= 0")
        if not sum(self.weights.values()) > 0:
            raise ValueError("metric weights must not all be 0: the canary score would never exist, and every "
                             "verdict would stay inconclusive")
        if self.marginal_score > self.pass_score:
            raise ValueError("marginal_score must not exceed pass_score")
        return self


class DriftConfig(_Strict):
    """Thresholds of the drift checks: a check alarms only when its test AND its effect size agree."""

    enabled: bool = Field(default=True, description="Run the drift checks in every cycle")
    current_window_h: float = Field(default=24, gt=0, description="Current window: the hours of traffic (by request "
                                    "time) up to the newest stored request of the route")
    reference_window_h: float = Field(default=168, gt=0, description="Reference window: the hours just before it")
    input_embeddings: bool = Field(default=True, description="Input drift on MiniLM prompt embeddings (loads the "
                                   "model once per process; off: output and judge drift only)")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="False-alarm rate of one drift check")
    min_samples: int = Field(default=50, gt=1, description="Per window; fewer gives 'nodata'")
    max_window_rows: int = Field(default=5000, ge=100, description="Per window: requests read from the store (a "
                                 "larger window is subsampled by a fixed hash of the request id, so consecutive "
                                 "cycles keep most of the same requests)")
    max_embeddings: int = Field(default=2000, ge=100, description="Per window: larger windows are subsampled")
    max_mmd_samples: int = Field(default=1000, ge=50, description="Per window, for the MMD test (quadratic cost)")
    mmd_alpha_share: float = Field(default=0.8, gt=0, lt=1, description="Input drift: MMD's share of alpha, the "
                                   "domain classifier gets the rest (weighted Bonferroni; MMD is the stronger test)")
    permutations: int = Field(default=500, ge=100)
    min_auc: float = Field(default=0.55, gt=0.5, lt=1, description="Domain-classifier AUC that counts as drift")
    min_mmd: float = Field(default=0.03, gt=0, description="MMD (RBF kernel, not squared) that counts as drift")
    max_psi: float = Field(default=0.2, gt=0, description="Population stability index that counts as drift")
    max_rate_delta: float = Field(default=0.05, gt=0, le=1, description="Refusal / format-compliance rate change")
    max_agreement_drop: float = Field(default=0.05, gt=0, le=1, description="Fall in judge-teacher agreement")


class AlertSinkConfig(_Strict):
    """Where alerts go. URLs that embed a secret (Slack, most webhooks) come from `url_env`, never the file."""

    name: str
    kind: Literal["webhook", "slack", "pagerduty"]
    url: str | None = Field(default=None, description="A URL without secrets; PagerDuty defaults to Events v2")
    url_env: EnvVarName | None = Field(default=None, description="Env var that holds the URL")
    routing_key_env: EnvVarName | None = Field(default=None, description="PagerDuty: env var with the integration key")
    min_severity: Literal["info", "warning", "critical"] = "warning"
    timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=10)
    backoff_s: float = Field(default=0.5, ge=0)
    delivery_budget_s: float = Field(
        default=60.0, gt=0, description="Seconds this sink may take per delivery (one per cycle); then it is skipped")

    @model_validator(mode="after")
    def _has_destination(self) -> "AlertSinkConfig":
        if self.url and self.url_env:
            raise ValueError(f"sink '{self.name}': give 'url' or 'url_env', not both")
        if self.kind != "pagerduty" and not (self.url or self.url_env):
            raise ValueError(f"sink '{self.name}': needs 'url' or 'url_env'")
        if self.kind == "pagerduty" and not self.routing_key_env:
            raise ValueError(f"sink '{self.name}': pagerduty needs 'routing_key_env'")
        return self


class AlertsConfig(_Strict):
    sinks: list[AlertSinkConfig] = Field(default_factory=list)
    max_examples: int = Field(default=5, ge=0, le=50, description="Worst examples carried by each alert")

    @model_validator(mode="after")
    def _unique_sinks(self) -> "AlertsConfig":
        names = [s.name for s in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique: {names}")
        return self


class PolicyConfig(_Strict):
    kind: Literal["ladder", "cost_aware", "bandit"] = "ladder"
    steps: list[int] = Field(default_factory=lambda: [1, 5, 25, 50, 100])
    min_dwell_s: float = Field(default=0, ge=0)
    min_samples_per_step: int = Field(default=0, ge=0)
    max_step_change: int = Field(default=100, gt=0, le=100)
    incumbent_min_weight: int = Field(default=0, ge=0, le=100)
    frozen: bool = False
    manual_gate: bool = False
    quality_floor: float | None = Field(
        default=None, ge=0, description="cost_aware: least verdict quality a target needs; default: a passing verdict")

    @field_validator("steps")
    @classmethod
    def _ladder(cls, v: list[int]) -> list[int]:
        if not v or any(s <= 0 or s > 100 for s in v) or v != sorted(set(v)):
            raise ValueError("steps must be strictly increasing percentages in (0, 100]")
        return v

    @model_validator(mode="after")
    def _promotion_reachable(self) -> "PolicyConfig":
        if self.incumbent_min_weight > self.max_step_change:
            raise ValueError(
                f"incumbent_min_weight ({self.incumbent_min_weight}) exceeds max_step_change ({self.max_step_change}): "
                "the last promotion step moves the incumbent's minimum in one change, so it could never happen")
        return self


class GatewayConfig(_Strict):
    kind: Literal["truefoundry", "litellm", "litellm_api", "portkey", "nginx"] = "truefoundry"
    path: str | None = None
    url: str | None = None
    api_key_env: EnvVarName | None = None
    reload_command: list[str] | None = None


class RouteConfig(_Strict):
    name: PlainName
    incumbent: TargetConfig
    candidates: list[TargetConfig] = Field(min_length=1)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    criteria: CriteriaConfig = Field(default_factory=CriteriaConfig)
    slice_key: str | None = Field(default=None, description="Metadata key to analyse per slice")
    golden_set: str | None = Field(default=None, description="YAML file of golden regression cases (past "
                                   "incidents) every candidate must pass before it can be promoted")
    checks: list[dict[str, Any]] = Field(
        default_factory=list, description="Deterministic checks every answer of the route must pass, as "
        "evaluators.checks.build_checks takes them: {kind: json, schema: {...}}, {kind: regex, pattern: ...}, "
        "{kind: length, max_chars: ...}, {kind: refusal}, each with an optional unique `name`. The analysis compares "
        "the share of checks its answers fail (metric `checks`, criteria.max_check_failure_delta) with the incumbent's")

    @property
    def targets(self) -> list[TargetConfig]:
        """The incumbent, then the candidates: the incumbent is replayed and weighted too, so its latency and cost
        are measured under the candidates' conditions."""
        return [self.incumbent, *self.candidates]

    def served_by_candidate(self, logged: str) -> bool:
        """Whether a sample whose log names `logged` as the serving model is a candidate's own answer; a name the
        incumbent may be logged under too is not: then the logs cannot tell the two apart, and it stays the
        incumbent's."""
        return any(c.logged_as_this(logged) for c in self.candidates) and not self.incumbent.logged_as_this(logged)

    @property
    def canary_metrics(self) -> tuple[str, ...]:
        """The canary metrics measured on this route: `checks` only where the route declares checks."""
        return CANARY_METRICS if self.checks else tuple(m for m in CANARY_METRICS if m != "checks")

    def build_checks(self) -> list[Any]:
        """The route's checks, built (evaluators.checks); validated when the config loads."""
        from evaluators.checks import build_checks

        return build_checks(self.checks)

    @model_validator(mode="after")
    def _checks(self) -> "RouteConfig":
        """Build the checks now, so a bad one is a config error naming the route, not a failed analysis; on a
        route with checks, `checks` gets its default weight and (with the default critical list) is critical."""
        if not self.checks:
            if "checks" in self.criteria.critical:
                raise ValueError(f"route '{self.name}': criteria.critical names 'checks' but the route declares no "
                                 "checks (routes[].checks): its verdicts would stay inconclusive")
            return self
        from evaluators.checks import CheckSpecError

        try:
            built = self.build_checks()
        except CheckSpecError as exc:
            raise ValueError(f"route '{self.name}': {exc}") from None
        names = [c.name for c in built]
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"route '{self.name}': check names must be non-empty text, got {bad}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"route '{self.name}': check names must be unique within the route: {duplicates} "
                             "named more than once (give each check a `name`)")
        update: dict[str, Any] = {}
        if "checks" not in self.criteria.weights:
            update["weights"] = {**self.criteria.weights, "checks": CHECKS_WEIGHT}
        if "critical" not in self.criteria.model_fields_set and "checks" not in self.criteria.critical:
            update["critical"] = [*self.criteria.critical, "checks"]
        if update:
            # A copy: a CriteriaConfig object shared with a route without checks must not change under it.
            self.criteria = self.criteria.model_copy(update=update)
        return self

    @model_validator(mode="after")
    def _unique_targets(self) -> "RouteConfig":
        names = [self.incumbent.name] + [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique within route '{self.name}': {names}")
        reserved = sorted(RESERVED_TARGET_NAMES & set(names))
        if reserved:
            raise ValueError(f"target name(s) {reserved} are reserved")
        return self


def incumbent_served(route: RouteConfig, samples: Iterable[tuple[int, str]]) -> list[int]:
    """The ids, in the order given, of the `samples` (sample id, model the gateway logged as serving it) that the
    route's incumbent served. During a rollout the gateway serves part of the route with a candidate: those logs are
    the candidate's own answers, and a candidate compared with them is compared with itself."""
    by_name: dict[str, bool] = {}  # a window holds millions of samples and a handful of model names
    served: list[int] = []
    for sample_id, model in samples:
        if model not in by_name:
            by_name[model] = route.served_by_candidate(model)
        if not by_name[model]:
            served.append(sample_id)
    return served


class OrchestrationConfig(_Strict):
    """How the Prefect flows spread work past one process (judge scoring fan-out, provider-call limits) and recover
    a route's failed run."""

    score_batches: int = Field(default=1, ge=1, le=256, description="Split a run's judge scoring into this many "
                               "sample-id ranges, each a run of `score_deployment` that any worker may take "
                               "(1: score inside the cycle's own process)")
    score_deployment: str = Field(default="score-batch/score-batch", description="flow/deployment that scores a batch")
    score_batch_timeout_s: float = Field(default=3600, gt=0, description="How long the cycle waits for its batches")
    provider_calls_limit: int = Field(default=4, ge=1, description="Task runs tagged `provider-calls` (shadow tests, "
                                      "load tests) running at once across all flow runs; set by `shadowjudge deploy`")
    resume_failed_runs: int = Field(default=2, ge=0, le=100, description="How many times cycles started without a "
                                    "cycle id resume a route's newest run after it failed, instead of opening a new "
                                    "run past its samples (0: never; then, and once these are used up, the failed "
                                    "run waits for `shadowjudge run --cycle-id`)")


class Config(_Strict):
    store: StoreConfig = Field(default_factory=StoreConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    sources: list[SourceConfig] = Field(min_length=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    redaction: RedactionConfig = Field(default_factory=RedactionConfig)
    pricing: dict[str, Price] = Field(default_factory=dict)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    routes: list[RouteConfig] = Field(min_length=1)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @field_validator("sources")
    @classmethod
    def _usable_mappings(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        problems = [problem for source in sources if (problem := mapping_problem(source))]
        if problems:
            raise ValueError("; ".join(problems))
        return sources

    @model_validator(mode="after")
    def _unique_names(self) -> "Config":
        for kind, names in (("source", [s.name for s in self.sources]), ("route", [r.name for r in self.routes])):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique: {names}")
        return self

    def route(self, name: str) -> RouteConfig:
        for r in self.routes:
            if r.name == name:
                return r
        raise ConfigError(f"no route named '{name}' (known: {[r.name for r in self.routes]})")

    def endpoints(self, routes: list[RouteConfig]) -> list[TargetConfig]:
        """Every endpoint a cycle of `routes` calls: their targets, and the teacher when it judges or calibrates."""
        targets = [target for r in routes for target in r.targets]
        teacher = self.judge.teacher
        if teacher is not None and (self.judge.evaluator == "llm-judge" or self.judge.calibration_fraction > 0):
            targets.append(teacher)
        return targets

    def fingerprint(self) -> str:
        """Hash of the effective config: logged with every run so results trace back to it."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_api_keys(targets: Iterable[TargetConfig]) -> None:
    """Resolve each target's key now (env var or Prefect Secret block): a missing key is bad input found before ingest
    and the paid calls, not a shadow-test failure that Prefect retries. The message names every missing key."""
    from shadowjudge.shadow.credentials import resolve_api_key  # it imports this module

    problems: list[str] = []
    for target in targets:
        try:
            resolve_api_key(target)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


_Location = tuple[str | int, ...]


def _apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[_Location, str]:
    """Set each SHADOWJUDGE__ variable's value in `data`, walking the schema beside it: keys match whatever their
    case, and a value is read as YAML only where the field is not text. Returns the variable of each location set,
    so that a validation error there names the variable, not the file."""
    applied: dict[_Location, str] = {}
    for key, value in environ.items():
        parts = [p for p in key[len(ENV_PREFIX):].split("__") if p] if key.startswith(ENV_PREFIX) else []
        node: Any = data
        kind: Any = Config
        location: list[str | int] = []
        for i, part in enumerate(parts):
            slot: str | int
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"env override {key}: '{part}' is not an index of that list")
                slot = int(part)
            elif isinstance(node, dict):
                slot = _mapping_key(node, part, kind, key)
            else:
                raise ConfigError(f"env override {key}: '{part}' walks into a scalar")
            kind = _member_type(kind, slot)
            location.append(slot)
            if i == len(parts) - 1:
                node[slot] = _env_value(value, kind)
            else:
                node = node[slot] if isinstance(node, list) else node.setdefault(slot, {})
        if parts:
            applied[tuple(location)] = key
    return applied


def _alternatives(kind: Any) -> list[Any]:
    """The types a value of `kind` may take: a union's members, None left out, Annotated's metadata dropped."""
    origin = get_origin(kind)
    if origin is Annotated:
        return _alternatives(get_args(kind)[0])
    if origin in (Union, UnionType):
        return [member for arg in get_args(kind) for member in _alternatives(arg)]
    return [] if kind is None or kind is type(None) else [kind]


def _member_type(kind: Any, slot: str | int) -> Any:
    """The declared type at `slot` inside a value of `kind`; None where the schema does not say."""
    for option in _alternatives(kind):
        if isinstance(option, type) and issubclass(option, BaseModel):
            if slot in option.model_fields:
                return option.model_fields[slot].annotation
        elif get_origin(option) is dict and isinstance(slot, str):
            return get_args(option)[1]
        elif get_origin(option) is list and isinstance(slot, int):
            return get_args(option)[0]
    return None


def _mapping_key(node: dict[Any, Any], part: str, kind: Any, variable: str) -> str:
    """The key `part` names: an existing key whatever its case (variables are written in capitals, a price key such
    as 'Yi-34B-Chat' is not); else a new entry of a mapping as written, or a field name in lower case."""
    if part in node:
        return part
    same = [k for k in node if isinstance(k, str) and k.lower() == part.lower()]
    if len(same) > 1:
        raise ConfigError(f"env override {variable}: '{part}' matches several keys {same}; write one exactly")
    if same:
        return same[0]
    return part if any(get_origin(t) is dict for t in _alternatives(kind)) else part.lower()


def _env_value(raw: str, kind: Any) -> Any:
    """The value as written where the field takes text: YAML would turn '20240501' into a number, '0123' into 83,
    cut 'a #b' at its comment and refuse '@cf/...'; also where it takes text or another scalar (a metadata value
    matches the text 'true' as it matches true). Elsewhere YAML gives numbers, booleans and lists, unless it fails or
    only yields another string; validation then names the variable."""
    options = _alternatives(kind)
    if options and all(t is str or (get_origin(t) is Literal and all(isinstance(a, str) for a in get_args(t)))
                       for t in options):
        return raw
    if str in options and all(t in (str, bool, int, float) for t in options):
        return raw
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(parsed, str) else parsed


def _format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _blamed_variables(loc: _Location, overridden: dict[_Location, str]) -> str:
    """The env variables an error at `loc` may come from: the one that set `loc` or a value around it, else those
    that set values inside it (a validator of a whole route reports at the route, not at the check field set)."""
    variable = next((v for at, v in overridden.items() if loc[:len(at)] == at), None)
    if variable:
        return f" (from env {variable})"
    if not loc:  # the whole config: every variable is inside it, and naming them all blames the innocent
        return ""
    inside = sorted(v for at, v in overridden.items() if at[:len(loc)] == loc)
    return f" (env sets {', '.join(inside)} inside it)" if inside else ""


def parse_config(data: Any, source: str = "<config>", environ: dict[str, str] | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    overridden = _apply_env_overrides(data, dict(os.environ if environ is None else environ))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid config"]
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_format_location(err['loc'])}: {msg}{_blamed_variables(tuple(err['loc']), overridden)}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    """Read and validate a config file. Relative paths inside it resolve against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # a binary file, or another encoding: bad input like any other config fault
        raise ConfigError(f"{path}: cannot read config: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    config = parse_config(data, str(path), environ)
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    for source in config.sources:
        if source.path and not Path(source.path).is_absolute():
            source.path = str((base / source.path).resolve())
    for route in config.routes:
        if route.gateway.path and not Path(route.gateway.path).is_absolute():
            route.gateway.path = str((base / route.gateway.path).resolve())
        if route.golden_set and not Path(route.golden_set).is_absolute():
            route.golden_set = str((base / route.golden_set).resolve())
    for section in (config.store, config.mlflow):
        attr = "url" if section is config.store else "tracking_uri"
        value = getattr(section, attr)
        if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            rel = value[len("sqlite:///"):]
            if rel and rel != ":memory:":
                setattr(section, attr, "sqlite:///" + str((base / rel).resolve()))
    return config
