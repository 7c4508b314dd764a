"""The LLM judge against a real OpenAI-compatible endpoint on loopback (a tiny starlette app)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from evaluators.llm_judge import LlmJudge, LlmJudgeError, parse_score, parse_winner
from shadowjudge.config import TargetConfig

API_KEY = "sk-test-secret-9f8e7d"


class FakeJudgeModel:
    """Chat completions that judge by a visible rule: an answer containing GOOD wins; `mode` adds failure modes."""

    def __init__(self, mode: str = "fair") -> None:
        self.mode = mode
        self.requests: list[dict] = []
        self.stamps: list[float] = []  # when each request arrived (time.monotonic)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        self.requests.append(body)
        self.stamps.append(time.monotonic())
        if self.mode == "down":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        user = body["messages"][-1]["content"]
        if self.mode == "refuse_all" or (self.mode == "refuse_long" and "LONG" in user):
            return JSONResponse({"error": {"message": "This model's maximum context length is 8192 tokens",
                                           "type": "invalid_request_error", "code": "context_length_exceeded"}},
                                status_code=400)
        if self.mode == "garbage":
            content = "I think both are fine."
        elif self.mode == "always_a_or_chatter" and "GOOD" not in user.split("## Answer B", 1)[0]:
            content = "I prefer the first one."  # a verdict on position alone, readable only when GOOD is A
        elif "## Answer A" in user:
            a = user.split("## Answer A", 1)[1].split("## Answer B", 1)[0]
            b = user.split("## Answer B", 1)[1]
            if self.mode in ("always_a", "always_a_or_chatter"):
                winner = "A"
            else:
                winner = "A" if "GOOD" in a and "GOOD" not in b else "B" if "GOOD" in b and "GOOD" not in a else "tie"
            content = "```json\n" + json.dumps({"reason": "rule", "winner": winner}) + "\n```"
        else:
            content = json.dumps({"reason": "rule", "score": 9 if "GOOD" in user else 3})
        usage = {} if self.mode == "no_usage" else {
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        return JSONResponse({
            "id": "cmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            **usage,
        })


@contextmanager
def serve(app) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", API_KEY)

    @contextmanager
    def start(mode: str = "fair"):
        model = FakeJudgeModel(mode)
        with serve(model.app()) as url:
            target = TargetConfig(name="teacher", model="judge-large", base_url=url, api_key_env="JUDGE_KEY",
                                  concurrency=4)
            yield LlmJudge.from_target(target, max_retries=0), model

    return start


def test_pairwise_asks_both_orders_and_finds_the_better_answer(endpoint):
    with endpoint() as (judge, model):
        prefs = judge.compare(["q1", "q2", "q3"], ["GOOD answer", "meh", "meh"], ["meh", "GOOD answer", "also meh"])
    assert prefs == [0.0, 1.0, 0.5]
    assert len(model.requests) == 6
    assert all(r["model"] == "judge-large" and r["temperature"] == 0 for r in model.requests)


def test_position_bias_cancels_out(endpoint):
    with endpoint("always_a") as (judge, _):
        verdicts = judge.judge_pairs(["q"], ["GOOD"], ["meh"])
    assert verdicts[0].preference == 0.5 and not verdicts[0].position_consistent


def test_an_unreadable_order_counts_as_a_tie_so_position_bias_stays_halved(endpoint):
    """An always-A teacher readable in one order only: the readable order is pure position bias and must not
    decide the pair alone (the other order counts as a tie, as an unusable verdict does)."""
    with endpoint("always_a_or_chatter") as (judge, model):
        verdict = judge.judge_pairs(["q"], ["GOOD"], ["meh"])[0]
    assert (verdict.candidate_first, verdict.incumbent_first) == (None, 0.0)
    assert verdict.preference == 0.25 and verdict.position_consistent is None
    assert judge.unparsed == 1 and len(model.requests) == 3


def test_pointwise_rubric_maps_to_unit_interval(endpoint):
    with endpoint() as (judge, _):
        assert judge.score(["q", "q"], ["GOOD", "bad"]) == pytest.approx([8 / 9, 2 / 9])
    assert judge.version.startswith("llm-judge:teacher:")


def test_an_unusable_verdict_is_reasked_then_gives_no_preference_and_no_score(endpoint):
    """Unreadable verdicts came back as 0.5, which the cycle's llm-judge stored as real scores: a candidate the
    teacher said in prose lost every pair read as equal to the incumbent."""
    import math

    with endpoint("garbage") as (judge, model):
        [preference] = judge.compare(["q"], ["a"], ["b"])
        verdict = judge.judge_pairs(["q"], ["a"], ["b"])[0]
        [score] = judge.score(["q"], ["a"])
    assert math.isnan(preference) and math.isnan(score)
    assert judge.unparsed == 5 and len(model.requests) == 10
    assert verdict.preference == 0.5 and verdict.position_consistent is None  # the teacher's stored placeholder


def test_endpoint_failure_is_a_clear_error_without_the_key(endpoint):
    with endpoint("down") as (judge, _):
        with pytest.raises(LlmJudgeError) as info:
            judge.compare(["q"], ["a"], ["b"])
    assert "judge-large" in str(info.value) and "500" in str(info.value)
    assert API_KEY not in str(info.value)


def test_a_request_the_endpoint_refuses_is_an_unreadable_order_not_a_failed_batch(endpoint):
    """One answer over the teacher's context length (HTTP 400) failed the whole batch, and with it every verdict
    already paid for. Now that pair's orders are unreadable (not asked again); an endpoint that refuses every
    request of a batch is refusing the judge itself (model, parameters) and still fails."""
    with endpoint("refuse_long") as (judge, model):
        verdicts = judge.judge_pairs(["q1", "q2", "q3"], ["GOOD", "LONG answer", "meh"], ["meh", "meh", "GOOD"])
    assert [(v.candidate_first, v.incumbent_first) for v in verdicts] == [(0.0, 0.0), (None, None), (1.0, 1.0)]
    assert len(model.requests) == 6 and judge.refused == 2 and judge.unparsed == 2
    with endpoint("refuse_all") as (judge, _), pytest.raises(LlmJudgeError, match="refused every request.*HTTP 400"):
        judge.judge_pairs(["q1", "q2"], ["a", "b"], ["c", "d"])


def test_as_the_cycles_scorer_a_refused_request_fails_instead_of_scoring_a_placeholder(endpoint):
    """The teacher's tolerance of a refused request leaked into score and compare: the cycle's llm-judge stored a
    0.5 for the refused pair as a real score, and a golden case scored so failed below its floor."""
    with endpoint("refuse_long") as (judge, _):
        with pytest.raises(LlmJudgeError, match="HTTP 400"):
            judge.score(["q"], ["LONG answer"])
        with pytest.raises(LlmJudgeError, match="HTTP 400"):
            judge.compare(["q1", "q2"], ["GOOD", "LONG answer"], ["meh", "meh"])
        assert judge.score(["q"], ["GOOD"]) != [0.5]


@pytest.mark.parametrize("limit", ["rpm", "tpm"])
def test_the_teacher_keeps_to_its_rpm_and_tpm(monkeypatch, limit):
    """judge.teacher's rpm/tpm were ignored (only its concurrency was used): a teacher limited to 6 requests a
    minute was sent 20 in a tenth of a second. Here 1 request (or its tokens) a second, a burst of one: at most 2
    of the 6 requests may arrive in the first 1.5 s, however slow the machine (a slow one only sends later)."""
    from evaluators.llm_judge import PAIRWISE_SYSTEM, PAIRWISE_USER
    from shadowjudge.shadow.tokens import count_message_tokens

    monkeypatch.setenv("JUDGE_KEY", API_KEY)
    messages = [{"role": "system", "content": PAIRWISE_SYSTEM},
                {"role": "user", "content": PAIRWISE_USER.format(prompt="q", a="GOOD", b="meh")}]
    per_request = count_message_tokens(messages) + 200  # the prompt and max_tokens: what a request reserves
    model = FakeJudgeModel("no_usage")  # no usage in the reply: the reservation is what it is charged
    with serve(model.app()) as url:
        target = TargetConfig(name="teacher", model="judge-large", base_url=url, api_key_env="JUDGE_KEY",
                              concurrency=4, **{limit: 60 if limit == "rpm" else 60 * per_request})
        judge = LlmJudge.from_target(target, max_retries=0)
        start = time.monotonic()
        judge.judge_pairs(["q"] * 3, ["GOOD"] * 3, ["meh"] * 3)
    assert len(model.stamps) == 6
    assert sum(t - start < 1.5 for t in model.stamps) <= 2


def test_parsers_tolerate_fences_and_reject_nonsense():
    assert parse_winner('```json\n{"winner": "b"}\n```') == "B"
    assert parse_winner('Verdict: {"reason": "x", "winner": "tie"} done') == "tie"
    assert parse_winner("no idea") is None
    assert parse_score('{"score": 10}') == 1.0 and parse_score('{"score": 1}') == 0.0
    assert parse_score('{"score": 11}') is None and parse_score("nothing") is None


@pytest.mark.parametrize(("reply", "winner"), [
    ('{"reason": "x", "winner": "Answer B"}', "B"),
    ('{"winner": "Assistant B"}', "B"),
    ('{"winner": "Response A."}', "A"),
    ('{"winner": "**b**"}', "B"),
    ('{"winner": "a tie"}', "tie"),
    ('{"winner": "Both"}', "tie"),
    ('{"winner": "Neither"}', "tie"),
    ('Verdict: {"reason": "B is better", "winner": "B"', "B"),  # cut off: the fallback reads the closed value
    ('Verdict: {"reason": "x", "winner": "Answer B", "confidence": high}', "B"),
    ('Verdict: {"winner": tie}', "tie"),
    ('{"winner": "Answer C"}', None),
    ('{"winner": "A or B"}', None),
    ('{"winner": "Alpha"}', None),
    ('{"winner": 1}', None),
    ('Verdict: {"reason": "x", "winner": "Answ', None),  # cut off inside the value
    ('Verdict: {"winner": Both answers}', None),
    ('Format {"winner": "A" | "B" | "tie"} noted. {"reason": "x", "winner": "B"', "B"),  # the rubric echoed
    ('First {"winner": "A"}, on reflection {"winner": "B"}', None),  # two different verdicts: no guess
])
def test_winner_is_read_from_its_value_never_from_a_prefix(reply, winner):
    assert parse_winner(reply) == winner


def test_the_version_changes_with_the_model_behind_a_teacher_name():
    """Stored verdicts are reused by version: a teacher name moved to another model kept its version, so the new
    model's calibration was the old model's verdicts."""
    from evaluators.llm_judge import LlmJudge

    def version(model: str, temperature: float = 0.0) -> str:
        return LlmJudge(None, model, name="teacher", temperature=temperature).version  # type: ignore[arg-type]

    assert version("gpt-4-turbo") == version("gpt-4-turbo")
    assert version("gpt-4-turbo").startswith("llm-judge:teacher:")
    assert len({version("gpt-4-turbo"), version("gpt-4o"), version("gpt-4-turbo", 0.7)}) == 3


def test_a_teacher_takes_its_key_from_its_prefect_secret_block(monkeypatch):
    """The teacher read only api_key_env: one whose key sits in a Prefect Secret block (as a target's may) was
    called with the keyless placeholder and every verdict failed authentication."""
    from evaluators.llm_judge import LlmJudge
    from shadowjudge.config import TargetConfig

    monkeypatch.delenv("TEACHER_KEY", raising=False)
    target = TargetConfig(name="teacher", model="gpt-4-turbo", base_url="http://127.0.0.1:9/v1",
                          api_key_secret="teacher-key")
    judge = LlmJudge.from_target(target, load_secret={"teacher-key": "from-block"}.__getitem__)
    assert judge.client.api_key == "from-block"



def test_a_version_too_long_for_the_store_keeps_its_start_and_stays_unique():
    """A registered judge name may take MLflow's 256 characters and the version adds to it: PostgreSQL refused such
    judgments (varchar(256)) while SQLite stored them."""
    from evaluators.base import MAX_VERSION_CHARS, bounded_version

    long_name = "team-" + "x" * 300
    one, other = (LlmJudge(None, "m", name=long_name + end).version for end in "ab")  # type: ignore[arg-type]
    assert len(one) == len(other) == MAX_VERSION_CHARS and one != other
    assert one.startswith("llm-judge:team-xxx")
    assert LlmJudge(None, "m", name="teacher").version.startswith("llm-judge:teacher:")  # type: ignore[arg-type]
    exact = "v" * MAX_VERSION_CHARS
    assert bounded_version(exact) == exact and bounded_version(exact + "w") != exact
