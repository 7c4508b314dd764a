"""The shadow replay engine: stored traffic samples replayed against target models, measured and stored.

Each target gets its own pool of `concurrency` workers, its own RPM/TPM token buckets and its own HTTP
client; a spend budget is shared by the run. Every request sent ends as exactly one `shadow_results` row keyed
by (run_id, sample_id, target, attempt): an answer, or an error class after retries. Rows are written while
the run goes (small batches, off the event loop), so an interrupted run that is started again replays only the
keys that are missing.

Spend counts every attempt, as a provider bills it: an answer by its usage, and a failed attempt by what it
received, since a stream that stalled or broke off was generated (and billed) up to there: its prompt plus the
completion tokens that came. An attempt refused with an error status costs nothing; one whose deadline passed
before anything came is charged its prompt, since the provider may have been processing it (a ceiling errs high).
A row's `cost_usd` is what all attempts of its request cost, so a resumed run's budget starts from what was spent.

Once the spend budget is reached no request starts and no failed attempt is retried (those in flight finish), so it
is overshot by in-flight attempts only. Targets may then have answered different numbers of samples; the analysis
compares the samples both sides answered. Requests never sent leave no row (they are not the target's errors): a
later call with budget left sends them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, or_, select

from shadowjudge.config import ConfigError, Price, ShadowConfig, TargetConfig
from shadowjudge.errors import InputError
from shadowjudge.shadow.credentials import resolve_api_key, scrub_secrets
from shadowjudge.shadow.endpoint import AttemptError, ChatEndpoint, Completion, OpenAIEndpoint
from shadowjudge.shadow.eventloop import run_sync
from shadowjudge.shadow.metrics import cost_per_request, latency_percentiles, request_cost, total_spend
from shadowjudge.shadow.ratelimit import TokenBucket
from shadowjudge.shadow.tokens import count_message_tokens, count_tokens
from shadowjudge.shadow.writer import ResultWriter
from shadowjudge.store import ShadowResult, TrafficSample, session_scope

log = logging.getLogger(__name__)

BUDGET_EXHAUSTED = "budget_exhausted"  # the error class earlier versions stored for requests never sent
MAX_BACKOFF_S = 60.0
# Request parameters a replay carries over from the logged request; the rest (user ids, metadata, store,
# n) either identify people, change what is billed, or are meaningless for a shadow call.
FORWARDED_PARAMS = ("temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed",
                    "response_format", "tools", "tool_choice", "parallel_tool_calls", "logit_bias", "logprobs",
                    "top_logprobs", "reasoning_effort")

EndpointFactory = Callable[[TargetConfig, str, ShadowConfig], ChatEndpoint]


class ShadowError(InputError):
    """A shadow run that cannot start as asked (targets, samples, pricing, a key that is not set): bad input, which
    a retry meets again (storage failures are ResultStoreError)."""


@dataclass
class TargetReport:
    target: str
    model: str
    requests: int = 0
    not_sent: int = 0  # left unsent by the spend budget; not counted in `requests`
    not_retried: int = 0  # requests whose failed attempt the spend budget kept from being retried
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    spend_usd: float | None = 0.0  # every attempt of every request sent, failed ones; None: unknown (no price)
    input_tokens: int = 0
    output_tokens: int = 0
    # mean over answered requests of known cost, their failed attempts included; None: no cost known
    cost_per_request_usd: float | None = None
    latency_ms: dict[str, Any] = field(default_factory=dict)
    ttft_ms: dict[str, Any] = field(default_factory=dict)
    tpot_ms: dict[str, Any] = field(default_factory=dict)
    itl_ms: dict[str, Any] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return (self.requests - self.ok) / self.requests if self.requests else 0.0


@dataclass
class ShadowReport:
    """A run's outcome per target, from everything stored for the run (earlier interrupted calls included)."""

    run_id: int
    targets: dict[str, TargetReport]
    replayed: int
    already_stored: int
    spend_usd: float | None  # None when a target's spend is unknown (it has no price)
    budget_usd: float | None
    budget_exhausted: bool
    error_examples: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_request_body(messages: list[Any], params: dict[str, Any], model: str, shadow: ShadowConfig) -> dict[str, Any]:
    """The chat request a target receives: the logged messages and sampling params, our model, our caps."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    for key in FORWARDED_PARAMS:
        if params.get(key) is not None:
            body[key] = params[key]
    limit_key = "max_completion_tokens" if params.get("max_completion_tokens") is not None else "max_tokens"
    limit = params.get(limit_key)
    if shadow.max_tokens is not None:
        limit = min(limit, shadow.max_tokens) if isinstance(limit, int) and limit > 0 else shadow.max_tokens
    if limit is not None:
        body[limit_key] = limit
    if shadow.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def backoff_delay(retry: int, base_s: float, retry_after_s: float | None, rng: random.Random) -> float:
    """Seconds before retry number `retry` (1-based): the server's Retry-After when given, else jittered 2^n."""
    if retry_after_s is not None:
        return min(retry_after_s, MAX_BACKOFF_S)
    return min(MAX_BACKOFF_S, base_s * 2 ** (retry - 1)) * rng.uniform(0.5, 1.5)


@dataclass(frozen=True)
class _Item:
    sample_id: int
    messages: list[Any]
    params: dict[str, Any]
    attempt: int


class SpendBudget:
    """Spend of one run so far; new requests and retries stop once it reaches the limit (in-flight ones finish)."""

    def __init__(self, limit_usd: float | None, spent_usd: float = 0.0):
        self.limit = limit_usd
        self.spent = spent_usd

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.spent >= self.limit

    def add(self, usd: float | None) -> None:
        self.spent += usd or 0.0


class _TargetRun:
    """Replays one target's pending items with its own workers, limits and endpoint."""

    def __init__(self, run_id: int, target: TargetConfig, items: deque[_Item], endpoint: ChatEndpoint,
                 shadow: ShadowConfig, price: Price | None, budget: SpendBudget, writer: ResultWriter,
                 secrets: list[str], on_result: Callable[[str, dict[str, Any]], None] | None):
        self.run_id, self.target, self.items, self.endpoint = run_id, target, items, endpoint
        self.shadow, self.price, self.budget, self.writer = shadow, price, budget, writer
        self.secrets, self.on_result = secrets, on_result
        self.rpm = TokenBucket.per_minute(target.rpm) if target.rpm else None
        self.tpm = TokenBucket.per_minute(target.tpm) if target.tpm else None
        self.rng = random.Random()
        self.error_examples: dict[str, str] = {}
        self.replayed = 0
        self.not_retried = 0

    async def run(self) -> None:
        workers = min(self.target.concurrency, len(self.items))
        await asyncio.gather(*(self._worker() for _ in range(workers)))

    async def _worker(self) -> None:
        while self.items and not self.budget.exhausted:
            item = self.items.popleft()
            row = await self._replay(item)
            self.replayed += 1
            self.writer.add(row)
            if self.on_result is not None:
                self.on_result(self.target.name, row)

    def _row(self, item: _Item, **values: Any) -> dict[str, Any]:
        return {"run_id": self.run_id, "sample_id": item.sample_id, "target": self.target.name,
                "model": self.target.model, "attempt": item.attempt, "retries": 0, **values}

    async def _replay(self, item: _Item) -> dict[str, Any]:
        body = build_request_body(item.messages, item.params, self.target.model, self.shadow)
        prompt_tokens = count_message_tokens(item.messages)
        reserved = prompt_tokens + (body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        retries, spent = 0, 0.0
        while True:
            if self.rpm is not None:
                await self.rpm.acquire(1)
            if self.tpm is not None:
                await self.tpm.acquire(reserved)
            try:
                completion = await self.endpoint.complete(body, stream=self.shadow.stream,
                                                          timeout_s=self.shadow.timeout_s)
            except AttemptError as exc:
                spent += self._charge(exc.received, prompt_tokens, reserved)
                if exc.retryable and retries < self.shadow.max_retries:
                    if not self.budget.exhausted:
                        retries += 1
                        delay = backoff_delay(retries, self.shadow.retry_backoff_s, exc.retry_after_s, self.rng)
                        await asyncio.sleep(delay)
                        continue
                    self.not_retried += 1
                self._note_error(exc.error_class, str(exc))
                return self._row(item, error_class=exc.error_class, retries=retries, cost_usd=self._cost(spent))
            except Exception as exc:  # a bug or an SDK surprise: recorded, never silently dropped
                if "unexpected" not in self.error_examples:  # the traceback once, scrubbed like every message
                    trace = "".join(traceback.format_exception(exc))
                    log.error("target %s: unexpected failure replaying sample %s:\n%s", self.target.name,
                              item.sample_id, scrub_secrets(trace, self.secrets))
                self._note_error("unexpected", f"{type(exc).__name__}: {exc}")
                return self._row(item, error_class="unexpected", retries=retries, cost_usd=self._cost(spent))
            spent += self._charge(completion, prompt_tokens, reserved)
            return self._success_row(item, completion, prompt_tokens, retries, self._cost(spent))

    def _charge(self, received: Completion | None, prompt_tokens: int, reserved: int) -> float:
        """Settle one attempt's TPM reservation and charge the spend budget with what the attempt received, as the
        provider bills it (a stalled or broken stream's part of the answer included); its USD cost, 0 when the
        target has no price. An attempt the provider refused (`received` None: an error status) costs nothing."""
        input_tokens, output_tokens = _billed_tokens(received, prompt_tokens) if received is not None else (0, 0)
        if self.tpm is not None:
            self.tpm.settle(reserved, input_tokens + output_tokens)
        if self.price is None or received is None:
            return 0.0
        cost = request_cost(self.price, input_tokens, output_tokens, received.cached_input_tokens)
        self.budget.add(cost)
        return cost

    def _cost(self, spent: float) -> float | None:
        """A row's `cost_usd`: what all attempts of the request cost; unknown (None) for a target without a price."""
        return spent if self.price is not None else None

    def _success_row(self, item: _Item, c: Completion, prompt_tokens: int, retries: int,
                     cost: float | None) -> dict[str, Any]:
        input_tokens, output_tokens = _billed_tokens(c, prompt_tokens)
        tpot = None
        if c.ttft_ms is not None and output_tokens > 1:
            tpot = (c.latency_ms - c.ttft_ms) / (output_tokens - 1)
        return self._row(item, output_text=c.text, ttft_ms=c.ttft_ms, itl_ms=c.itl_ms, tpot_ms=tpot,
                         latency_ms=c.latency_ms, input_tokens=input_tokens, output_tokens=output_tokens,
                         cost_usd=cost, error_class=None, retries=retries)

    def _note_error(self, error_class: str, message: str) -> None:
        if error_class not in self.error_examples:
            message = scrub_secrets(message, self.secrets)[:500]
            self.error_examples[error_class] = message
            log.warning("target %s: %s: %s", self.target.name, error_class, message)


def _billed_tokens(c: Completion, prompt_tokens: int) -> tuple[int, int]:
    """Input and output tokens of an attempt: the provider's usage, else counted locally like the replay server."""
    input_tokens = c.input_tokens if c.input_tokens is not None else prompt_tokens
    output_tokens = c.output_tokens if c.output_tokens is not None else count_tokens(c.text)
    return input_tokens, output_tokens


def openai_endpoint(target: TargetConfig, api_key: str, shadow: ShadowConfig) -> ChatEndpoint:
    return OpenAIEndpoint(target, api_key, timeout_s=shadow.timeout_s)


def _sent(run_id: int) -> Any:
    """The run's rows of requests that were sent (not the placeholders earlier versions stored for the others)."""
    return (ShadowResult.run_id == run_id) & or_(ShadowResult.error_class.is_(None),
                                                 ShadowResult.error_class != BUDGET_EXHAUSTED)


def _drop_unsent_placeholders(engine: Engine, run_id: int) -> None:
    """Earlier versions stored a `budget_exhausted` row for each request the budget left unsent; drop them so a
    resumed run sends those requests."""
    with session_scope(engine) as s:
        s.execute(delete(ShadowResult).where(ShadowResult.run_id == run_id,
                                             ShadowResult.error_class == BUDGET_EXHAUSTED))


def _stored_keys(engine: Engine, run_id: int) -> tuple[set[tuple[int, str, int]], float, int]:
    """The (sample, target, attempt) keys of the run's sent requests, what those of known cost cost, and how many
    have no known cost (their target had no price when they ran)."""
    with session_scope(engine) as s:
        rows = s.execute(select(ShadowResult.sample_id, ShadowResult.target, ShadowResult.attempt,
                                ShadowResult.cost_usd).where(_sent(run_id))).all()
    known = [r.cost_usd for r in rows if r.cost_usd is not None]
    return {(r.sample_id, r.target, r.attempt) for r in rows}, sum(known), len(rows) - len(known)


def _check_inputs(samples: Sequence[TrafficSample], targets: Sequence[TargetConfig], shadow: ShadowConfig,
                  pricing: dict[str, Price]) -> None:
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ShadowError(f"target names must be unique: {names}")
    for sample in samples:
        if sample.id is None:
            raise ShadowError(f"sample {sample.request_id!r} has no id: store samples before replaying them")
        if not isinstance(sample.messages, list) or not sample.messages:
            raise ShadowError(f"sample {sample.id} has no messages to replay")
    unpriced = sorted({t.model for t in targets if t.model not in pricing})
    if unpriced and shadow.budget_usd is not None:
        raise ShadowError(f"shadow.budget_usd is set but pricing has no entry for {unpriced}; "
                          "add them under `pricing:` so spend can be counted")
    if unpriced:
        log.warning("no price for %s: their cost_usd stays empty", unpriced)


async def replay(engine: Engine, run_id: int, samples: Sequence[TrafficSample], targets: Sequence[TargetConfig],
                 shadow: ShadowConfig, pricing: dict[str, Price], *,
                 on_result: Callable[[str, dict[str, Any]], None] | None = None,
                 endpoint_factory: EndpointFactory = openai_endpoint,
                 writer: ResultWriter | None = None) -> ShadowReport:
    """The async core of `run_shadow`; replays what is not stored yet for `run_id` and reports on the run."""
    _check_inputs(samples, targets, shadow, pricing)
    _drop_unsent_placeholders(engine, run_id)
    stored, spent, unknown_cost = _stored_keys(engine, run_id)
    if unknown_cost and shadow.budget_usd is not None:
        log.warning("run %s: %d stored results have no known cost (their target had no price then); the budget "
                    "starts from the %.4f USD known to be spent", run_id, unknown_cost, spent)
    plans: dict[str, deque[_Item]] = {}
    for target in targets:
        plans[target.name] = deque(
            _Item(s.id, s.messages, s.params or {}, attempt)
            for attempt in range(shadow.consistency_k) for s in samples
            if (s.id, target.name, attempt) not in stored)
    pending = sum(len(q) for q in plans.values())
    budget = SpendBudget(shadow.budget_usd, spent)
    writer = writer or ResultWriter(engine)
    runs: list[_TargetRun] = []
    try:
        for target in targets:
            if not plans[target.name]:
                continue
            try:
                api_key = resolve_api_key(target)
            except ConfigError as exc:
                raise ShadowError(str(exc)) from None
            endpoint = endpoint_factory(target, api_key, shadow)
            runs.append(_TargetRun(run_id, target, plans[target.name], endpoint, shadow, pricing.get(target.model),
                                   budget, writer, [api_key], on_result))
        if runs:
            log.info("run %s: replaying %d requests over %d targets (%d already stored)", run_id, pending,
                     len(runs), len(stored))
        await _run_with_writer(writer, [r.run() for r in runs])
    finally:
        for r in runs:
            await r.endpoint.aclose()
    report = summarize_run(engine, run_id, targets)
    for name, plan in plans.items():
        report[name].not_sent = len(plan)
    for r in runs:
        report[r.target.name].not_retried = r.not_retried
    not_sent, not_retried = sum(len(q) for q in plans.values()), sum(r.not_retried for r in runs)
    if not_sent or not_retried:
        log.warning("run %s: the spend budget (%s USD) is spent; %d requests were not sent and %d failed ones not "
                    "retried", run_id, shadow.budget_usd, not_sent, not_retried)
    return ShadowReport(run_id=run_id, targets=report, replayed=sum(r.replayed for r in runs),
                        already_stored=len(stored), spend_usd=total_spend(t.spend_usd for t in report.values()),
                        budget_usd=shadow.budget_usd, budget_exhausted=bool(not_sent or not_retried),
                        error_examples={r.target.name: r.error_examples for r in runs if r.error_examples})


async def _run_with_writer(writer: ResultWriter, jobs: Iterable[Any]) -> None:
    """Run the target jobs while the writer stores their rows; a storage failure stops the run."""
    async def replay_all() -> None:
        try:
            await asyncio.gather(*jobs)
        finally:
            writer.close()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(writer.run())
            group.create_task(replay_all())
    except ExceptionGroup as eg:  # one failure is the usual case: raise it as itself
        leaves = _leaves(eg)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def run_shadow(engine: Engine, run_id: int, samples: list[TrafficSample], targets: list[TargetConfig],
               shadow: ShadowConfig, pricing: dict[str, Price], progress: bool = False) -> ShadowReport:
    """Replay `samples` against `targets` for run `run_id`, store every result, and report on the run.

    Safe to call again after an interruption: only requests without a stored result are sent.
    """
    if not progress:
        return run_sync(lambda: replay(engine, run_id, samples, targets, shadow, pricing))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    per_target = len(samples) * shadow.consistency_k
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("errors {task.fields[errors]}"), TimeRemainingColumn()) as bar:
        tasks = {t.name: bar.add_task(t.name, total=per_target, errors=0) for t in targets}
        errors: Counter[str] = Counter()
        stored, _, _ = _stored_keys(engine, run_id)
        for key in stored:
            if key[1] in tasks:
                bar.advance(tasks[key[1]])

        def on_result(target: str, row: dict[str, Any]) -> None:
            if row.get("error_class"):
                errors[target] += 1
            bar.update(tasks[target], advance=1, errors=errors[target])

        return run_sync(lambda: replay(engine, run_id, samples, targets, shadow, pricing, on_result=on_result))


def summarize_run(engine: Engine, run_id: int,
                  targets: Sequence[TargetConfig] | None = None) -> dict[str, TargetReport]:
    """Per-target counts, spend and latency percentiles of everything stored for a run."""
    with session_scope(engine) as s:
        rows = s.execute(select(
            ShadowResult.target, ShadowResult.model, ShadowResult.error_class, ShadowResult.retries,
            ShadowResult.cost_usd, ShadowResult.input_tokens, ShadowResult.output_tokens, ShadowResult.latency_ms,
            ShadowResult.ttft_ms, ShadowResult.tpot_ms, ShadowResult.itl_ms,
        ).where(_sent(run_id))).all()
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        grouped.setdefault(row.target, []).append(row)
    models = {t.name: t.model for t in targets or ()}
    reports = {}
    for name in list(models) + sorted(set(grouped) - set(models)):
        group = grouped.get(name, [])
        ok = [r for r in group if r.error_class is None]
        reports[name] = TargetReport(
            target=name, model=models.get(name) or (group[0].model if group else ""), requests=len(group),
            ok=len(ok), errors=dict(sorted(Counter(r.error_class for r in group if r.error_class).items())),
            retries=sum(r.retries for r in group), spend_usd=total_spend(r.cost_usd for r in group),
            input_tokens=sum(r.input_tokens or 0 for r in ok), output_tokens=sum(r.output_tokens or 0 for r in ok),
            cost_per_request_usd=cost_per_request([r.cost_usd for r in ok]),
            latency_ms=latency_percentiles(r.latency_ms for r in ok),
            ttft_ms=latency_percentiles(r.ttft_ms for r in ok),
            tpot_ms=latency_percentiles(r.tpot_ms for r in ok),
            itl_ms=latency_percentiles(r.itl_ms for r in ok))
    return reports
