"""LLM-as-judge through any OpenAI-compatible endpoint: the teacher whose verdicts the small judge learns from.

Pairwise verdicts are asked in both orders and averaged, which cancels the position bias big judges have;
pointwise scores come from a 1-10 rubric. Requests run concurrently, paced by the endpoint's `rpm`/`tpm` when it has
them, every attempt included: the client's retries (its `max_retries`; 408/409/429/5xx, connection errors and
timeouts, after the server's Retry-After or an exponential backoff) are made here, through the limiter, not by the SDK
behind its back. An unusable verdict is re-asked once and is then counted in `unparsed`: within a pair it counts as a
tie, a pair neither order was usable for has no preference (NaN from `compare`; stored by the teacher as a 0.5
placeholder, which evaluators.calibration.readable_preference tells apart from a tie the teacher gave), and an
unusable rating has no score (NaN). To the teacher (calibration, training labels) a request the endpoint refuses as
such (HTTP 400/413/422: a prompt over the context length or caught by a content filter, say) is an unusable verdict
too, not asked again: one long answer must not fail a batch whose other verdicts were paid for; as the cycle's scorer
(`score`, `compare`) it fails. A 404 is no refusal of one prompt: the endpoint serves no such model (or path), every
request would get it, and it fails as `LlmJudgeConfigError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from evaluators.base import bounded_version
from shadowjudge.errors import InputError, ShadowJudgeError
from shadowjudge.shadow.ratelimit import TokenBucket
from shadowjudge.shadow.tokens import count_message_tokens

if TYPE_CHECKING:
    from openai import OpenAI

    from shadowjudge.config import TargetConfig

PAIRWISE_SYSTEM = (
    "You are an impartial expert judge of AI assistant answers. Compare two answers to the same instruction. "
    "Judge helpfulness, correctness, completeness, following the instruction, clarity and harmlessness. "
    "Do not prefer an answer for being longer or for its position. "
    'Reply with JSON only: {"reason": "<one sentence>", "winner": "A" | "B" | "tie"}.'
)
PAIRWISE_USER = "## Instruction\n{prompt}\n\n## Answer A\n{a}\n\n## Answer B\n{b}\n\nWhich answer is better?"
POINTWISE_SYSTEM = (
    "You are an impartial expert judge of AI assistant answers. Rate how well the answer serves the instruction: "
    "correctness, helpfulness, completeness, following the instruction, clarity. 1 = useless or wrong, "
    "10 = excellent. Do not reward length for its own sake. "
    'Reply with JSON only: {"reason": "<one sentence>", "score": <integer 1-10>}.'
)
POINTWISE_USER = "## Instruction\n{prompt}\n\n## Answer\n{answer}\n\nRate the answer."

# A "winner" value in text that is not JSON as a whole: quoted and closed, or one bare word; either followed by what
# may follow a JSON value (or the end of the line), so a value cut off ("Answ), one word of several or `"A" | "B"`
# is not read.
_WINNER = re.compile(r'"winner"\s*:\s*(?:"([^"\n]*)"|([A-Za-z]+))(?=[ \t]*(?:[,}\]\r\n]|$))')
_LABEL_WORD = re.compile(r"^(?:answer|assistant|response|model|option)\s+")  # "Answer B" names answer B
_TIE_WORDS = frozenset({"tie", "a tie", "both", "neither", "equal"})
_SCORE = re.compile(r'"score"\s*:\s*"?(\d+(?:\.\d+)?)"?')
# The endpoint refuses this request itself (too long, filtered, unprocessable): asking again gets the same answer.
# Not 404: an OpenAI-compatible endpoint sends it for a model (or path) it does not serve, for every request alike.
REFUSED_STATUSES = frozenset({400, 413, 422})
NOT_FOUND_STATUS = 404
# What the openai SDK retries, and how, now that the judge retries instead (through its rate limiter): a request
# timeout, a lock, a rate limit and any 5xx; a Retry-After up to two minutes, else 0.5 s doubling up to 8 s.
RETRIED_STATUSES = frozenset({408, 409, 429})
MAX_RETRY_AFTER_S = 120.0
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0


class LlmJudgeError(ShadowJudgeError):
    """The judge endpoint failed after the client's retries; the message names model and error class only.

    `completed` holds the results of the items that finished before the failure (None for the others), so a caller
    can keep the verdicts it paid for."""

    completed: Sequence[Any] = ()


class LlmJudgeConfigError(LlmJudgeError, InputError):
    """The endpoint does not serve the judge's model or path (HTTP 404): a configuration error every request meets,
    not a refusal of one prompt. Like any LlmJudgeError it carries the verdicts finished before it (`completed`)."""


@dataclass(frozen=True)
class PairVerdict:
    """Both orders' verdicts (1 = candidate better, 0 = incumbent better, 0.5 = tie; None = unreadable)."""

    candidate_first: float | None
    incumbent_first: float | None

    @property
    def preference(self) -> float:
        """The mean of both orders, an unreadable one counting as a tie: one order alone would carry the teacher's
        position bias uncancelled. 0.5 when neither was readable, a placeholder rather than a verdict."""
        orders = (self.candidate_first, self.incumbent_first)
        return sum(0.5 if v is None else v for v in orders) / 2

    @property
    def position_consistent(self) -> bool | None:
        """Whether both orders gave the same verdict; None unless both were readable."""
        if self.candidate_first is None or self.incumbent_first is None:
            return None
        return self.candidate_first == self.incumbent_first


def parse_winner(text: str) -> str | None:
    """'A', 'B' or 'tie' from a JSON verdict, tolerating code fences and chatter around it; None when the reply
    names no winner that reads as one of them (or names different ones), never a guess."""
    try:
        verdict = json.loads(_strip_fence(text))
    except ValueError:
        verdict = None
    if isinstance(verdict, dict) and "winner" in verdict:
        return _winner(verdict["winner"])
    named = {_winner(quoted or bare) for quoted, bare in _WINNER.findall(text or "")} - {None}
    return named.pop() if len(named) == 1 else None


def _winner(value: Any) -> str | None:
    """A winner value read whole: "A", "answer b", "Assistant B.", "**b**", "tie", "both", "neither"."""
    if not isinstance(value, str):
        return None
    words = " ".join(value.replace("_", " ").split()).strip("\"'`*.,:;!()[] ").lower()
    words = _LABEL_WORD.sub("", words)
    if words in ("a", "b"):
        return words.upper()
    return "tie" if words in _TIE_WORDS else None


def parse_score(text: str) -> float | None:
    """The 1-10 rating mapped to [0, 1], or None if there is no usable rating."""
    value: Any = None
    try:
        value = json.loads(_strip_fence(text)).get("score")
    except (ValueError, AttributeError):
        m = _SCORE.search(text or "")
        value = m.group(1) if m else None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    if not 1 <= score <= 10:
        return None
    return (score - 1) / 9


def _strip_fence(text: str) -> str:
    t = (text or "").strip()
    if t.startswith("```"):
        t = t.strip("`")
        t = t[4:] if t.lower().startswith("json") else t
    return t.strip()


class LlmJudge:
    """An `Evaluator` backed by a chat model; also the teacher for calibration and for labelling stored traffic."""

    def __init__(self, client: "OpenAI", model: str, *, concurrency: int = 8, max_tokens: int = 200,
                 temperature: float = 0.0, name: str | None = None, rpm: int | None = None,
                 tpm: int | None = None) -> None:
        self.client = client
        # Retries go through the rate limiter (`_ask`), not the SDK: as many as the client was built with, each
        # attempt on a copy of it (same connection pool, timeout and key) that does not retry by itself.
        self.max_retries: int = getattr(client, "max_retries", 0)
        self._single_attempt_client = client.with_options(max_retries=0) if client is not None else None
        self.model = model
        self.concurrency = max(1, concurrency)
        self.max_tokens = max_tokens
        self.temperature = temperature
        # The version keys stored verdicts, which later cycles reuse instead of asking again: it changes with
        # whatever changes a verdict (the model behind a name, the rubric, the sampling temperature).
        verdict_inputs = "\x00".join((PAIRWISE_SYSTEM, PAIRWISE_USER, POINTWISE_SYSTEM, POINTWISE_USER, model,
                                      repr(float(temperature))))
        digest = hashlib.sha1(verdict_inputs.encode()).hexdigest()[:8]
        self.version = bounded_version(f"llm-judge:{name or model}:{digest}")
        self.unparsed = 0
        self.answered = 0
        self.refused = 0  # requests the endpoint refused as such (REFUSED_STATUSES), each an unusable verdict
        self.last_refusal: str | None = None
        self._lock = threading.Lock()
        # The shadow engine's buckets, so a teacher's rpm/tpm mean what a target's do.
        self.rpm = TokenBucket.per_minute(rpm) if rpm else None
        self.tpm = TokenBucket.per_minute(tpm) if tpm else None
        self._pacing = threading.Lock()
        # A server's Retry-After holds every request of this judge, not only the one it answered: the other threads'
        # next attempts wait too (time.monotonic() before which none starts).
        self._held_until = 0.0

    @classmethod
    def from_target(cls, target: "TargetConfig", *, timeout_s: float = 60.0, max_retries: int = 3,
                    load_secret: Callable[[str], str] | None = None) -> "LlmJudge":
        """A judge for the endpoint `target` names, with its key as the shadow engine resolves it (a Prefect Secret
        block when the target names one, else its env var); `load_secret` stands in for Prefect in tests."""
        from openai import OpenAI

        from shadowjudge.shadow.credentials import load_prefect_secret, resolve_api_key

        api_key = resolve_api_key(target, load_secret or load_prefect_secret)
        client = OpenAI(base_url=target.base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        return cls(client, target.model, concurrency=target.concurrency, name=target.name, rpm=target.rpm,
                   tpm=target.tpm)

    # -- one call ------------------------------------------------------------------------------------------------
    def _pace(self, reserved: int) -> None:
        """Wait for the endpoint's rpm and tpm. The buckets are asyncio's and the calls run on threads: one thread at
        a time waits in an event loop of its own (the bucket's asyncio lock is then never contended, so it binds to
        no loop), and the others queue in arrival order, as the bucket serves its waiters. Every attempt of a request
        waits here, retries included."""
        if self.rpm is None and self.tpm is None:
            return
        with self._pacing:
            if self.rpm is not None:
                asyncio.run(self.rpm.acquire(1))
            if self.tpm is not None:
                asyncio.run(self.tpm.acquire(reserved))

    def _settle(self, reserved: int, used: int) -> None:
        if self.tpm is not None:
            with self._pacing:
                self.tpm.settle(reserved, used)

    def _ask(self, system: str, user: str, refused_unusable: bool) -> str | None:
        """The reply's text; None when the endpoint refused the request itself (REFUSED_STATUSES), which asking
        again would not change, and the caller takes that as an unusable verdict (`refused_unusable`): else it
        fails like any other error. A failure a retry can help is retried up to `max_retries` times, each attempt
        paced by rpm/tpm like the first."""
        from openai import OpenAIError

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        reserved = count_message_tokens(messages) + self.max_tokens
        for retries_done in range(self.max_retries + 1):
            self._wait_if_held()
            self._pace(reserved)
            try:
                response = self._single_attempt_client.chat.completions.create(
                    model=self.model, temperature=self.temperature, max_tokens=self.max_tokens, messages=messages)
                break
            except OpenAIError as exc:
                self._settle(reserved, 0)
                delay = retry_delay(exc, retries_done)
                if delay is None or retries_done == self.max_retries:
                    return self._failed(exc, retries_done + 1, refused_unusable)
                if server_retry_after(exc):  # the server named the wait: it holds every request
                    with self._lock:
                        self._held_until = max(self._held_until, time.monotonic() + delay)
                time.sleep(delay)
        usage = getattr(response, "usage", None)
        self._settle(reserved, usage.total_tokens if usage is not None and usage.total_tokens else reserved)
        with self._lock:
            self.answered += 1
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def _wait_if_held(self) -> None:
        """Wait out a Retry-After the server gave any request of this judge."""
        with self._lock:
            wait_s = self._held_until - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)

    def _failed(self, exc: Exception, attempts: int, refused_unusable: bool) -> None:
        """Count a refused request (None: an unusable verdict) or raise the failure, naming model and error class
        only (an endpoint's message may echo the request)."""
        status = getattr(exc, "status_code", None)
        failure = f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "")
        if status == NOT_FOUND_STATUS:
            raise LlmJudgeConfigError(
                f"judge model '{self.model}' was not found at {self._endpoint()} (HTTP 404): the endpoint serves no "
                "such model or path; check the teacher's model and base_url (judge.teacher)") from None
        if status in REFUSED_STATUSES and refused_unusable:
            with self._lock:
                self.refused += 1
                self.last_refusal = failure
            return None
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        raise LlmJudgeError(f"judge model '{self.model}' failed{tries}: {failure}{_long_wait(exc)}") from None

    def _endpoint(self) -> str:
        """The client's base URL without credentials or query, fit for a message."""
        parts = urlsplit(str(getattr(self.client, "base_url", "")))
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"

    def _verdict(self, prompt: str, a: str, b: str, refused_unusable: bool) -> str | None:
        user = PAIRWISE_USER.format(prompt=prompt, a=a, b=b)
        for _ in range(2):
            reply = self._ask(PAIRWISE_SYSTEM, user, refused_unusable)
            winner = None if reply is None else parse_winner(reply)
            if winner is not None:
                return winner
            if reply is None:
                break
        with self._lock:
            self.unparsed += 1
        return None

    def judge_pair(self, prompt: str, incumbent: str, candidate: str, refused_unusable: bool = True) -> PairVerdict:
        """Ask both orders; each verdict becomes P(candidate better) in {0, 0.5, 1} or None if unusable."""
        first = self._verdict(prompt, candidate, incumbent, refused_unusable)   # candidate is A
        second = self._verdict(prompt, incumbent, candidate, refused_unusable)  # candidate is B
        to_p = {"A": 1.0, "B": 0.0, "tie": 0.5}
        return PairVerdict(
            candidate_first=None if first is None else to_p[first],
            incumbent_first=None if second is None else 1.0 - to_p[second],
        )

    def _rate(self, prompt: str, answer: str) -> float:
        user = POINTWISE_USER.format(prompt=prompt, answer=answer)
        for _ in range(2):
            reply = self._ask(POINTWISE_SYSTEM, user, False)
            score = None if reply is None else parse_score(reply)
            if score is not None:
                return score
            if reply is None:
                break
        with self._lock:
            self.unparsed += 1
        return math.nan

    # -- Evaluator ------------------------------------------------------------------------------------------------
    def judge_pairs(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str],
                    refused_unusable: bool = True) -> list[PairVerdict]:
        """Both orders' verdicts per pair. As the teacher (calibration, training labels: `refused_unusable`), a
        request the endpoint refuses is an unusable verdict, stored as such; as the cycle's scorer it fails the call,
        since a placeholder 0.5 would count as a real score (a tie, a golden case below its floor)."""
        _same_length(prompts, incumbent, candidate)
        return self._map(partial(self.judge_pair, refused_unusable=refused_unusable), prompts, incumbent, candidate)

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        """P(candidate better) per pair; NaN where neither order gave a usable verdict (no preference, not a tie)."""
        return [v.preference if v.candidate_first is not None or v.incumbent_first is not None else math.nan
                for v in self.judge_pairs(prompts, incumbent, candidate, refused_unusable=False)]

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        _same_length(prompts, answers)
        return self._map(self._rate, prompts, answers)

    def _map(self, fn: Callable[..., Any], *items: Sequence[str]) -> list[Any]:
        """`fn` over the items on the judge's threads. The first failure cancels the items not started (no more paid
        calls) and is raised with the finished ones as its `completed`. An endpoint that answered none of several
        items' requests and refused them is refusing this judge (its model name or request parameters), not one
        long prompt: that fails too, rather than leaving a placeholder for every item."""
        answered, refused = self.answered, self.refused
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(fn, *args) for args in zip(*items)]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                future.cancel()
        failure = next((f.exception() for f in futures if not f.cancelled() and f.exception() is not None), None)
        if failure is None and len(futures) > 1 and self.answered == answered and self.refused > refused:
            failure = LlmJudgeError(f"judge model '{self.model}' refused every request of {len(futures)} items "
                                    f"({self.last_refusal}): check its model name and parameters")
        elif isinstance(failure, LlmJudgeError):
            failure.completed = [None if f.cancelled() or f.exception() is not None else f.result() for f in futures]
        if failure is not None:
            raise failure
        return [f.result() for f in futures]


def server_retry_after(exc: Exception) -> float | None:
    """Seconds the server asked to wait before a retry (Retry-After, retry-after-ms), read as the shadow engine
    reads them; None when the failure is no HTTP response or names no wait."""
    from openai import APIStatusError

    from shadowjudge.shadow.endpoint import parse_retry_after

    return parse_retry_after(exc.response.headers) if isinstance(exc, APIStatusError) else None


def retry_delay(exc: Exception, retries_done: int) -> float | None:
    """Seconds to wait before retrying a failed attempt, as the openai SDK decides it; None when a retry cannot help
    (or the server asks for a wait over MAX_RETRY_AFTER_S). The server's `x-should-retry` overrides the status."""
    from openai import APIConnectionError, APIStatusError

    if isinstance(exc, APIConnectionError):  # timeouts included
        return _backoff(retries_done)
    if not isinstance(exc, APIStatusError):
        return None
    retry_after = server_retry_after(exc)
    if retry_after is not None and retry_after > MAX_RETRY_AFTER_S:
        return None
    should_retry = exc.response.headers.get("x-should-retry")
    if should_retry == "false":
        return None
    if should_retry != "true" and exc.status_code not in RETRIED_STATUSES and exc.status_code < 500:
        return None
    return retry_after if retry_after else _backoff(retries_done)


def _long_wait(exc: Exception) -> str:
    """Why a request the server asked to retry was not: the wait it asked for is over MAX_RETRY_AFTER_S."""
    wait_s = server_retry_after(exc)
    if wait_s is None or wait_s <= MAX_RETRY_AFTER_S:
        return ""
    return (f"; the server asked to retry after {wait_s:.0f} s, longer than the {MAX_RETRY_AFTER_S:.0f} s a judge "
            "request waits, so it was not retried")


def _backoff(retries_done: int) -> float:
    return min(INITIAL_BACKOFF_S * 2.0 ** retries_done, MAX_BACKOFF_S) * (1 - 0.25 * random.random())


def _same_length(*seqs: Sequence[str]) -> None:
    if len({len(s) for s in seqs}) > 1:
        raise ValueError(f"prompts and answers must have the same length, got {[len(s) for s in seqs]}")
