"""Per-model latency and fault profiles for the replay server, and the seeded plan each request follows.

A request's fate (error status, stalled or malformed stream, its jittered TTFT) is drawn from an RNG seeded
by `(seed, model, prompt_id, n)`, where `n` counts earlier requests for the same model and prompt. So a retry of
a failed request draws afresh, requests for different prompts do not depend on each other's arrival order, and a
test can compute with `plan_request` exactly what the server will do. Identical (model, prompt) requests in
flight at once (a repeated prompt, consistency attempts, their retries) share one counter, which goes to whichever
arrives first: the key's sequence of fates is the same every run, but which request meets which fate depends on
arrival order, so per-request outcomes (and the retries they take, hence how far the sequence is used) are
reproducible only without such concurrent duplicates.

A profile file (YAML or JSON):

    seed: 7
    default: {ttft_ms: 120, ttft_jitter_ms: 20, token_ms: 15}
    models:
      Yi-34B-Chat:
        ttft_ms: 300
        token_ms: 25
        error_rate: 0.2                       # answered with an error status ...
        error_statuses: {500: 1, 429: 1}      # ... drawn with these weights
        retry_after_s: 2                      # sent with 429s (retry-after and retry-after-ms)
        stall_rate: 0.05                      # streams that stop after stall_after_tokens tokens
        stall_after_tokens: 10
        malformed_rate: 0.02                  # streams with one chunk that is not JSON
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shadowjudge.errors import InputError


class ProfileError(InputError):
    """A profile file or argument that cannot be used."""


class ModelProfile(BaseModel):
    """How one recorded model behaves: latency, and how often and how it fails."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float = Field(default=0.0, ge=0, description="Time from request to first content token")
    ttft_jitter_ms: float = Field(default=0.0, ge=0, description="TTFT is uniform in ttft_ms +- this")
    token_ms: float = Field(default=0.0, ge=0, description="Delay between streamed tokens")
    error_rate: float = Field(default=0.0, ge=0, le=1, description="Share of requests answered with an error status")
    error_statuses: dict[int, float] = Field(default_factory=lambda: {500: 1.0}, description="status -> weight")
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After sent with 429s")
    stall_rate: float = Field(default=0.0, ge=0, le=1, description="Share of streams that stop sending midway")
    stall_after_tokens: int = Field(default=1, ge=0)
    stall_s: float = Field(default=3600.0, gt=0, description="A stalled stream ends (without [DONE]) after this")
    malformed_rate: float = Field(default=0.0, ge=0, le=1, description="Share of streams with a chunk that is not JSON")
    malformed_after_tokens: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelProfile":
        if self.error_rate + self.stall_rate + self.malformed_rate > 1 + 1e-9:
            raise ValueError("error_rate + stall_rate + malformed_rate must not exceed 1")
        if not self.error_statuses or any(w < 0 for w in self.error_statuses.values()) \
                or sum(self.error_statuses.values()) <= 0:
            raise ValueError("error_statuses needs at least one status with a positive weight")
        bad = [s for s in self.error_statuses if not 400 <= s <= 599]
        if bad:
            raise ValueError(f"error_statuses must be 4xx/5xx codes, got {bad}")
        return self


class ProfileSet(BaseModel):
    """Profiles by model name; `default` applies to models without their own entry."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    default: ModelProfile = Field(default_factory=ModelProfile)
    models: dict[str, ModelProfile] = Field(default_factory=dict)

    def for_model(self, model: str) -> ModelProfile:
        return self.models.get(model, self.default)


Outcome = Literal["ok", "error", "stall", "malformed"]


@dataclass(frozen=True)
class RequestPlan:
    outcome: Outcome
    status: int = 200
    ttft_ms: float = 0.0


def plan_request(profiles: ProfileSet, model: str, prompt_id: str, n: int) -> RequestPlan:
    """What the server does with the `n`-th request (0-based) for this model and prompt."""
    p = profiles.for_model(model)
    rng = random.Random(f"{profiles.seed}:{model}:{prompt_id}:{n}")
    u = rng.random()
    ttft = max(0.0, p.ttft_ms + (rng.uniform(-p.ttft_jitter_ms, p.ttft_jitter_ms) if p.ttft_jitter_ms else 0.0))
    if u < p.error_rate:
        statuses = sorted(p.error_statuses)
        status = rng.choices(statuses, weights=[p.error_statuses[s] for s in statuses])[0]
        return RequestPlan("error", status, ttft)
    if u < p.error_rate + p.stall_rate:
        return RequestPlan("stall", 200, ttft)
    if u < p.error_rate + p.stall_rate + p.malformed_rate:
        return RequestPlan("malformed", 200, ttft)
    return RequestPlan("ok", 200, ttft)


def load_profiles(source: ProfileSet | dict | str | Path | None) -> ProfileSet:
    """A ProfileSet from an object, a mapping, or a YAML/JSON file; None means no latency and no faults."""
    if source is None:
        return ProfileSet()
    if isinstance(source, ProfileSet):
        return source
    where = "profiles"
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise ProfileError(f"{where}: cannot read profile file: {exc.strerror}") from None
        try:
            source = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ProfileError(f"{where}: not valid YAML/JSON: {exc}") from None
    if not isinstance(source, dict):
        raise ProfileError(f"{where}: the top level must be a mapping with seed/default/models")
    try:
        return ProfileSet.model_validate(source)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise ProfileError(f"{where}: invalid profile: {problems}") from None
