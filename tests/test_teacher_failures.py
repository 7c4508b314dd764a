"""How the LLM teacher meets a failing endpoint, against real HTTP servers on loopback: the project's replay server
(which answers an unknown model with OpenAI's 404 `model_not_found`) and a small http.server that answers each
request as the test says and notes when it arrived.

A 404 is a configuration error every request meets (the model or path does not exist), not a refusal of one prompt;
400/413/422 are refusals of one request and leave that pair unusable. Every attempt, the retries after a 429
included, goes through the teacher's rpm limiter, waits the server's Retry-After, and there are as many attempts as
the client was configured with."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from openai import OpenAI

from evaluators.calibration import TeacherTask, judge_and_store, readable_preference
from evaluators.llm_judge import LlmJudge, LlmJudgeConfigError, LlmJudgeError
from shadowjudge.config import TargetConfig
from shadowjudge.errors import InputError
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, get_engine, session_scope

API_KEY = "sk-teacher-test-5c4b3a"
MODEL = "judge-large"


@dataclass(frozen=True)
class Reply:
    """What the loopback endpoint does with one request: answer `status` with `body` and `headers` after
    `delay_s`, or close the connection without a response (`disconnect`)."""

    status: int = 200
    body: dict = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    disconnect: bool = False


def verdict(winner: str = "A") -> Reply:
    return Reply(200, {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": MODEL,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": json.dumps({"winner": winner})}}]})


def judged(user: str) -> Reply:
    """The verdict of a teacher that always prefers the candidate's answer, in either order."""
    answer_a = user.split("## Answer A", 1)[1].split("## Answer B", 1)[0]
    return verdict("A" if "candidate" in answer_a else "B")


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                    "code": code}}, headers or {})


RATE_LIMITED = error(429, "rate_limit_exceeded", "Rate limit reached, retry later.", {"retry-after-ms": "10"})
MODEL_GONE = error(404, "model_not_found", f"The model '{MODEL}' does not exist or you do not have access to it.")


class LoopbackEndpoint:
    """A chat-completions endpoint on 127.0.0.1 whose reply to the n-th request (0-based) is `reply(n, user)`,
    `user` being the request's last message; `arrivals` holds when each request arrived (time.monotonic)."""

    def __init__(self, reply: Callable[[int, str], Reply]) -> None:
        self.reply = reply
        self.arrivals: list[float] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # a client that timed out and hung up
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive requests."""
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with endpoint._lock:
                    n = len(endpoint.arrivals)
                    endpoint.arrivals.append(time.monotonic())
                reply = endpoint.reply(n, body["messages"][-1]["content"])
                time.sleep(reply.delay_s)
                if reply.disconnect:
                    self.close_connection = True
                    return
                payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> "LoopbackEndpoint":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture
def teacher_for(monkeypatch) -> Callable[..., LlmJudge]:
    """A teacher as the config builds it (LlmJudge.from_target) for an endpoint's base_url."""
    monkeypatch.setenv("TEACHER_KEY", API_KEY)

    def build(base_url: str, *, model: str = MODEL, max_retries: int = 3, timeout_s: float = 60.0,
              **limits: int) -> LlmJudge:
        target = TargetConfig(name="teacher", model=model, base_url=base_url, api_key_env="TEACHER_KEY",
                              concurrency=1, **limits)
        return LlmJudge.from_target(target, max_retries=max_retries, timeout_s=timeout_s)

    return build


@contextmanager
def replay_teacher(tmp_path: Path) -> Iterator[ReplayServer]:
    """The replay server serving one model, MODEL, whose every answer is a readable verdict."""
    recordings = tmp_path / "teacher.jsonl"
    recordings.write_text(json.dumps({"prompt_id": "p0", "model": MODEL,
                                      "output": json.dumps({"reason": "r", "winner": "A"})}) + "\n")
    with ReplayServer(recordings, mode="thread") as server:
        yield server


def seed_tasks(engine, n: int, run_key: str = "r1", route: str = "chat") -> list[TeacherTask]:
    """n stored pairs (a run, its samples and their shadow answers) for the teacher to judge."""
    with session_scope(engine) as s:
        run = ShadowRun(run_key=run_key, route=route, config_hash="h")
        s.add(run)
        s.flush()
        tasks = []
        for i in range(n):
            sample = TrafficSample(request_id=f"{run_key}-{i}", source="logs", source_position=f"{run_key}-{i}",
                                   route=route,
                                   incumbent_model="inc", messages=[{"role": "user", "content": f"question {i}"}],
                                   response_text=f"incumbent {i}", request_ts=datetime.now(timezone.utc))
            s.add(sample)
            s.flush()
            s.add(ShadowResult(run_id=run.id, sample_id=sample.id, target="cand", model="cand-model",
                               output_text=f"candidate {i}"))
            tasks.append(TeacherTask(run.id, sample.id, "cand", f"question {i}", f"incumbent {i}", f"candidate {i}"))
    return tasks


def stored_verdicts(engine, teacher: LlmJudge) -> list[float | None]:
    with session_scope(engine) as s:
        return [readable_preference(r.preference, r.details)
                for r in s.query(Judgment).filter(Judgment.evaluator == teacher.version).order_by(Judgment.id)]


# -- 404: the model (or path) does not exist ---------------------------------------------------------------------

def test_a_model_the_endpoint_does_not_serve_fails_naming_it_and_stores_nothing(store_url, tmp_path, teacher_for):
    """A teacher whose model name was misspelt: the endpoint's 404 made the batch's one pair 'unusable', stored as
    such, and the cycle went on as if the teacher had refused the content, every cycle again."""
    engine = get_engine(store_url)
    tasks = seed_tasks(engine, 1)
    with replay_teacher(tmp_path) as server:
        misspelt = teacher_for(server.base_url, model="judge-larg")
        with pytest.raises(LlmJudgeConfigError) as info:
            judge_and_store(engine, misspelt, tasks, {"role": "teacher"})
        assert server.app.counters["unknown_model"] == 1  # neither retried nor asked in the other order
        assert stored_verdicts(engine, misspelt) == []
        [pair] = teacher_for(server.base_url).judge_pairs(["q"], ["a"], ["b"])  # the right name is answered
        assert (pair.candidate_first, pair.incumbent_first) == (1.0, 0.0)
    message = str(info.value)
    assert "'judge-larg'" in message and server.base_url in message and "404" in message
    assert API_KEY not in message
    assert isinstance(info.value, InputError) and isinstance(info.value, LlmJudgeError)


def test_as_the_cycles_scorer_a_model_the_endpoint_does_not_serve_fails_the_same_way(tmp_path, teacher_for):
    with replay_teacher(tmp_path) as server:
        misspelt = teacher_for(server.base_url, model="judge-larg")
        with pytest.raises(LlmJudgeConfigError, match=f"'judge-larg' was not found at {server.base_url} "):
            misspelt.score(["q"], ["a"])
        with pytest.raises(LlmJudgeConfigError, match="'judge-larg'"):
            misspelt.compare(["q1", "q2"], ["a", "b"], ["c", "d"])


def test_label_traffic_with_a_misspelt_teacher_model_says_so_and_writes_nothing(tmp_path, monkeypatch):
    """`shadowjudge judge label-traffic` as a user runs it, on a route with one stored pair: it wrote a training
    directory with that pair unlabelled (the 404 an 'unusable verdict') and exited 0."""
    import os
    import subprocess
    import sys

    import yaml

    from shadowjudge.demo import demo_config
    from shadowjudge.store import upgrade_database

    url = f"sqlite:///{tmp_path}/store.db"
    upgrade_database(url)
    seed_tasks(get_engine(url), 1, route="chat-default")
    monkeypatch.setenv("TEACHER_KEY", API_KEY)
    with replay_teacher(tmp_path) as server:
        config = demo_config(tmp_path, "http://127.0.0.1:9/v1")
        config["store"] = {"url": url}
        config["judge"] = {"evaluator": "lexical", "teacher": {
            "name": "teacher", "model": "judge-larg", "base_url": server.base_url, "api_key_env": "TEACHER_KEY"}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "judge", "label-traffic", "-c",
                               str(tmp_path / "c.yaml"), "--out", str(tmp_path / "labels"), "--no-progress"],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        asked = server.app.counters["unknown_model"]
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    assert f"judge model 'judge-larg' was not found at {server.base_url}" in output and "Traceback" not in output
    assert asked == 1  # neither retried nor asked in the other order
    assert list((tmp_path / "labels").glob("*")) == []


def test_a_model_removed_mid_batch_keeps_the_verdicts_already_paid_for(store_url, teacher_for):
    """The deployment goes away after two pairs: those two verdicts are stored, the other pairs are not stored as
    unusable (a rerun asks for them), and the failure names the model."""
    engine = get_engine(store_url)
    tasks = seed_tasks(engine, 4)
    with LoopbackEndpoint(lambda n, user: judged(user) if n < 4 else MODEL_GONE) as endpoint:
        teacher = teacher_for(endpoint.base_url)
        with pytest.raises(LlmJudgeConfigError, match=f"'{MODEL}'"):
            judge_and_store(engine, teacher, tasks, {"role": "teacher"})
    assert len(endpoint.arrivals) in (5, 6)  # the 4th pair may have started before the failure cancelled it
    assert stored_verdicts(engine, teacher) == [1.0, 1.0]


# -- 400/413/422: this request is refused -------------------------------------------------------------------------

@pytest.mark.parametrize("refusal", [
    error(400, "context_length_exceeded", "This model's maximum context length is 8192 tokens"),
    error(400, "content_filter", "The response was filtered due to the prompt triggering the content policy."),
    error(413, "request_too_large", "Request too large"),
    error(422, "unprocessable_entity", "Input could not be processed"),
], ids=["400-context-length", "400-content-filter", "413", "422"])
def test_a_request_refused_for_its_content_leaves_that_pair_unusable(store_url, teacher_for, refusal):
    engine = get_engine(store_url)
    tasks = seed_tasks(engine, 3)
    with LoopbackEndpoint(lambda n, user: refusal if "question 1" in user else judged(user)) as endpoint:
        teacher = teacher_for(endpoint.base_url)
        judge_and_store(engine, teacher, tasks, {"role": "teacher"})
        single = seed_tasks(engine, 2, run_key="r2")[1:]  # a batch of one refused pair is that pair's refusal too
        judge_and_store(engine, teacher, single, {"role": "teacher"})
    assert stored_verdicts(engine, teacher) == [1.0, None, 1.0, None]
    assert len(endpoint.arrivals) == 8 and teacher.refused == 4  # a refusal is neither retried nor re-asked


# -- retries: through the rate limiter, after Retry-After, as many as configured ----------------------------------

def test_retries_after_429_keep_to_the_teachers_rpm(teacher_for):
    """The SDK retried a 429 behind the limiter's back, as soon as Retry-After said (10 ms here): a teacher limited
    to 60 requests a minute (one a second, bursts of one) got its retries within milliseconds. Every attempt now
    waits for the limiter: two 429s, then the verdicts, four requests at least about a second apart."""
    with LoopbackEndpoint(lambda n, user: RATE_LIMITED if n < 2 else verdict("A")) as endpoint:
        teacher = teacher_for(endpoint.base_url, rpm=60)
        [pair] = teacher.judge_pairs(["q"], ["a"], ["b"])
    assert (pair.candidate_first, pair.incumbent_first) == (1.0, 0.0)
    assert len(endpoint.arrivals) == 4
    # the first request's arrival also carries the client's cold start (up to ~0.15 s when run alone), which the
    # limiter does not see: its gap is the shorter one
    assert min(endpoint.gaps) >= 0.75 and min(endpoint.gaps[1:]) >= 0.9, endpoint.gaps


def test_a_retry_waits_the_servers_retry_after(teacher_for):
    """Retry-After: 1 (seconds) is waited out, though the backoff alone would retry within 0.5 s."""
    rate_limited = error(429, "rate_limit_exceeded", "Rate limit reached", {"retry-after": "1"})
    with LoopbackEndpoint(lambda n, user: rate_limited if n == 0 else verdict("A")) as endpoint:
        teacher_for(endpoint.base_url).judge_pairs(["q"], ["a"], ["b"])
    assert len(endpoint.arrivals) == 3 and endpoint.gaps[0] >= 0.95, endpoint.gaps



def test_a_retry_after_holds_the_judges_other_requests_too(monkeypatch):
    """Each thread waited out only its own Retry-After: with four at once, the other three kept sending requests
    into the server's back-off (the next ones 0.3 s after the 429 asked for 1 s)."""
    monkeypatch.setenv("TEACHER_KEY", API_KEY)
    slow_ok = Reply(**{**verdict("A").__dict__, "delay_s": 0.3})
    rate_limited = error(429, "rate_limit_exceeded", "Rate limit reached", {"retry-after": "1"})
    with LoopbackEndpoint(lambda n, user: rate_limited if n == 0 else slow_ok) as endpoint:
        target = TargetConfig(name="teacher", model=MODEL, base_url=endpoint.base_url, api_key_env="TEACHER_KEY",
                              concurrency=4)
        LlmJudge.from_target(target).judge_pairs(["q"] * 4, ["a"] * 4, ["b"] * 4)
    later = endpoint.arrivals[4:]  # sent after the first four, each once a thread was free again
    assert later and min(later) >= endpoint.arrivals[0] + 0.95, [t - endpoint.arrivals[0] for t in later]

def test_a_wait_longer_than_two_minutes_is_not_waited_out(teacher_for):
    """As the SDK did: a Retry-After over two minutes fails now instead of holding the batch."""
    quota = error(429, "insufficient_quota", "You exceeded your current quota", {"retry-after": "3600"})
    with LoopbackEndpoint(lambda n, user: quota) as endpoint:
        with pytest.raises(LlmJudgeError, match=r"RateLimitError \(HTTP 429\); the server asked to retry after 3600 s, "
                           r"longer than the 120 s a judge request waits, so it was not retried"):
            teacher_for(endpoint.base_url).judge_pairs(["q"], ["a"], ["b"])
    assert len(endpoint.arrivals) == 1


@pytest.mark.parametrize("failure", [
    RATE_LIMITED,
    error(500, "server_error", "The server had an error.", {"retry-after-ms": "10"}),
    error(409, "conflict", "Lock timeout", {"retry-after-ms": "10"}),
    Reply(disconnect=True),
    Reply(body=verdict().body, delay_s=1.0),  # slower than the client's timeout
], ids=["429", "500", "409", "disconnect", "timeout"])
@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_failing_request_gets_as_many_attempts_as_configured(teacher_for, failure, max_retries):
    with LoopbackEndpoint(lambda n, user: failure) as endpoint:
        teacher = teacher_for(endpoint.base_url, max_retries=max_retries, timeout_s=0.3)
        with pytest.raises(LlmJudgeError, match=f"'{MODEL}' failed") as info:
            teacher.judge_pairs(["q"], ["a"], ["b"])
    assert len(endpoint.arrivals) == max_retries + 1
    assert ("after 3 attempts" in str(info.value)) == (max_retries == 2)


def test_a_client_built_by_hand_keeps_its_retry_count_and_timeout():
    """LlmJudge over a client the caller made: its max_retries (here 1) is the number of retries, and each attempt
    runs with its timeout."""
    with LoopbackEndpoint(lambda n, user: RATE_LIMITED if n < 1 else verdict("B")) as endpoint:
        client = OpenAI(api_key=API_KEY, base_url=endpoint.base_url, max_retries=1, timeout=7.5)
        teacher = LlmJudge(client, MODEL, concurrency=1)
        [pair] = teacher.judge_pairs(["q"], ["a"], ["b"])
    assert (pair.candidate_first, pair.incumbent_first) == (0.0, 1.0) and len(endpoint.arrivals) == 3
    assert teacher.max_retries == 1 and teacher.client.max_retries == 1
    with LoopbackEndpoint(lambda n, user: RATE_LIMITED) as endpoint:
        client = OpenAI(api_key=API_KEY, base_url=endpoint.base_url, max_retries=1, timeout=0.3)
        with pytest.raises(LlmJudgeError, match="after 2 attempts"):
            LlmJudge(client, MODEL, concurrency=1).judge_pairs(["q"], ["a"], ["b"])
    assert len(endpoint.arrivals) == 2
    with LoopbackEndpoint(lambda n, user: Reply(delay_s=1.0, body=verdict().body)) as endpoint:
        client = OpenAI(api_key=API_KEY, base_url=endpoint.base_url, max_retries=0, timeout=0.3)
        with pytest.raises(LlmJudgeError, match="APITimeoutError"):
            LlmJudge(client, MODEL, concurrency=1).judge_pairs(["q"], ["a"], ["b"])
