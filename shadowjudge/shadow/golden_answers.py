"""Ask a candidate the golden regression cases: one request per case, through the same endpoint as shadow tests.

Golden cases are not production traffic, so their answers are not stored as shadow results; the golden report
(which cases passed, and why not) is what the cycle keeps. A case the candidate could not answer after the
shadow config's retries gets a NoAnswer naming the error's class; so does a case whose request raised anything
else (a reply or a bug the endpoint did not classify), logged and scrubbed, while the other cases are still asked.
Such a case is unanswered, not failed: with the providers out of reach (an outage on the evaluator's side as much
as the candidate's) no answer was checked, so nothing may fail or roll back on it; nor does it pass.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from shadowjudge.analysis.golden import NOT_ASKED, GoldenCase, NoAnswer
from shadowjudge.config import ConfigError, ShadowConfig, TargetConfig
from shadowjudge.shadow.credentials import resolve_api_key, scrub_secrets
from shadowjudge.shadow.endpoint import AttemptError, ChatEndpoint
from shadowjudge.shadow.engine import EndpointFactory, ShadowError, backoff_delay, build_request_body, openai_endpoint
from shadowjudge.shadow.eventloop import run_sync

log = logging.getLogger(__name__)


async def _answer(endpoint: ChatEndpoint, case: GoldenCase, target: TargetConfig, shadow: ShadowConfig,
                  rng: random.Random, secrets: list[str]) -> str | NoAnswer:
    body = build_request_body([{"role": "user", "content": case.prompt}], {}, target.model, shadow)
    for retry in range(shadow.max_retries + 1):
        try:
            completion = await endpoint.complete(body, stream=shadow.stream, timeout_s=shadow.timeout_s)
            return completion.text
        except AttemptError as exc:
            if not exc.retryable or retry == shadow.max_retries:
                return _no_answer(case, target, exc.error_class, str(exc), secrets)
            await asyncio.sleep(backoff_delay(retry + 1, shadow.retry_backoff_s, exc.retry_after_s, rng))
        except Exception as exc:  # not an attempt that failed but a surprise: no retry, only this case is unanswered
            return _no_answer(case, target, "unexpected", f"{type(exc).__name__}: {exc}", secrets)
    return NOT_ASKED  # not reached (max_retries >= 0, and the last attempt returns): for the type checker


def _no_answer(case: GoldenCase, target: TargetConfig, error_class: str, message: str,
               secrets: list[str]) -> NoAnswer:
    log.warning("golden case %s on %s unanswered: %s: %s", case.id, target.name, error_class,
                scrub_secrets(message, secrets)[:300])
    return NoAnswer(error_class)


async def _answer_all(target: TargetConfig, cases: Sequence[GoldenCase], shadow: ShadowConfig,
                      endpoint_factory: EndpointFactory) -> dict[str, str | NoAnswer]:
    try:
        api_key = resolve_api_key(target)
    except ConfigError as exc:
        raise ShadowError(str(exc)) from None
    endpoint = endpoint_factory(target, api_key, shadow)
    gate = asyncio.Semaphore(target.concurrency)
    rng = random.Random(f"golden:{target.name}")

    async def one(case: GoldenCase) -> str | NoAnswer:
        async with gate:
            return await _answer(endpoint, case, target, shadow, rng, [api_key])

    try:
        answers = await asyncio.gather(*(one(c) for c in cases))
    finally:
        await endpoint.aclose()
    return {c.id: a for c, a in zip(cases, answers, strict=True)}


def ask_golden_cases(target: TargetConfig, cases: Sequence[GoldenCase], shadow: ShadowConfig,
                     endpoint_factory: EndpointFactory = openai_endpoint) -> dict[str, str | NoAnswer]:
    """The candidate's answer to each case by case id (a NoAnswer, naming the error, where it gave none)."""
    return run_sync(lambda: _answer_all(target, cases, shadow, endpoint_factory))
