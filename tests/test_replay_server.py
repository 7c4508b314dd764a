"""The replay server against real clients (openai SDK, raw httpx) on loopback."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from shadowjudge.shadow.profiles import ProfileError, ProfileSet, load_profiles, plan_request
from shadowjudge.shadow.recordings import Recordings, RecordingsError, prompt_id_for
from shadowjudge.shadow.replay_server import ReplayServer, ReplayServerError, build_app, replay_server_cli
from shadowjudge.shadow.tokens import count_message_tokens, count_tokens, split_tokens

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECORDINGS = ROOT / "shadowjudge" / "demo_data" / "recordings.jsonl.gz"
MODELS = ("claude-instant-1.2", "Yi-34B-Chat")


def tiny_recordings(path: Path, per_model: int = 12, gzipped: bool = True) -> list[dict]:
    """A few real rows of the demo recordings (AlpacaEval outputs), for MODELS only."""
    rows, counts = [], {m: 0 for m in MODELS}
    with gzip.open(DEMO_RECORDINGS, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            if row["model"] in counts and counts[row["model"]] < per_model:
                counts[row["model"]] += 1
                rows.append(row)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gzipped:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return rows


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("rec") / "recordings.jsonl.gz"
    return path, tiny_recordings(path)


@pytest.fixture(scope="module")
def server(recordings):
    with ReplayServer(recordings[0]) as srv:
        yield srv


def recorded_prompt(rows: list[dict], model: str, index: int = 0) -> tuple[str, str]:
    """An instruction whose sha1 prefix is a recorded prompt id, and the recorded output.

    The recordings hold ids, not instructions; the demo request log holds the instructions."""
    wanted = {r["prompt_id"]: r["output"] for r in rows if r["model"] == model}
    found = []
    with gzip.open(DEMO_RECORDINGS.parent / "requests.jsonl.gz", "rt") as fh:
        for line in fh:
            messages = json.loads(line)["request"]["messages"]
            text = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            if prompt_id_for(text) in wanted:
                found.append((text, wanted[prompt_id_for(text)]))
    return found[index]


def test_streamed_answer_is_the_recording_with_consistent_usage(server, recordings):
    prompt, output = recorded_prompt(recordings[1], "claude-instant-1.2")
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    chunks = list(client.chat.completions.create(model="claude-instant-1.2", messages=messages, stream=True,
                                                  stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == output
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage.completion_tokens == count_tokens(output) == len(split_tokens(output))
    assert usage.prompt_tokens == count_message_tokens(messages)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == usage.completion_tokens

    plain = list(client.chat.completions.create(model="claude-instant-1.2", messages=messages, stream=True))
    assert all(c.usage is None for c in plain)


def test_non_streaming_and_max_tokens(server, recordings):
    prompt, output = recorded_prompt(recordings[1], "Yi-34B-Chat")
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    full = client.chat.completions.create(model="Yi-34B-Chat", messages=[{"role": "user", "content": prompt}])
    assert full.choices[0].message.content == output
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens == count_tokens(output)
    cut = client.chat.completions.create(model="Yi-34B-Chat", max_tokens=5,
                                         messages=[{"role": "user", "content": prompt}])
    assert cut.choices[0].message.content == "".join(split_tokens(output)[:5])
    assert (cut.choices[0].finish_reason, cut.usage.completion_tokens) == ("length", 5)


def test_unknown_prompt_gets_a_deterministic_recorded_answer_counted_as_miss(server, recordings):
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    before = server.stats()["models"].get("claude-instant-1.2", {}).get("misses", 0)
    ask = lambda: client.chat.completions.create(  # noqa: E731
        model="claude-instant-1.2", messages=[{"role": "user", "content": "never recorded: what is 2+2?"}])
    first, second = ask(), ask()
    recorded = {r["output"] for r in recordings[1] if r["model"] == "claude-instant-1.2"}
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content in recorded
    assert server.stats()["models"]["claude-instant-1.2"]["misses"] == before + 2


def test_unknown_model_is_a_404_with_an_openai_error_body(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    assert "gpt-nope" in err.value.body["message"]
    assert sorted(m.id for m in client.models.list()) == sorted(MODELS)
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_a_404_with_an_openai_error_body(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    model = client.models.retrieve("Yi-34B-Chat")
    assert (model.id, model.object, model.owned_by) == ("Yi-34B-Chat", "model", "replay:replay")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-nope")
    assert err.value.body["code"] == "model_not_found" and "gpt-nope" in err.value.body["message"]



def test_a_base_url_without_v1_is_a_404_as_providers_answer_it_and_a_wrong_method_a_405(server):
    """A POST to an unknown path was a 405, so a client with a base_url missing /v1 read 'method not allowed'
    instead of the 404 OpenAI and vLLM send (and the teacher's check for a wrong model or path missed it)."""
    client = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="Yi-34B-Chat", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "not_found" and "/chat/completions" in err.value.body["message"]
    assert httpx.post(f"{server.url}/v1/models").status_code == 405
    assert httpx.get(f"{server.base_url}/chat/completions").status_code == 405

@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_stops_at_the_first_stop_sequence_with_usage_of_what_was_kept(server, recordings, stream):
    prompt, output = recorded_prompt(recordings[1], "Yi-34B-Chat")
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    words = output.split()
    late, early = words[12], words[5]
    kept = output[:min(output.find(late), output.find(early))]
    assert 0 < len(kept) < len(output)

    def ask(**params) -> tuple[str, str | None, int]:
        request = dict(model="Yi-34B-Chat", messages=[{"role": "user", "content": prompt}], **params)
        if not stream:
            r = client.chat.completions.create(**request)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens

    assert ask(stop=[late, early]) == (kept, "stop", count_tokens(kept))
    assert ask(stop=late) == (output[:output.find(late)], "stop", count_tokens(output[:output.find(late)]))
    assert ask(stop=early, max_tokens=2) == ("".join(split_tokens(output)[:2]), "length", 2)  # the limit came first
    assert ask(stop=["never in any answer \u2603"]) == (output, "stop", count_tokens(output))


@pytest.mark.parametrize("params, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}}, "response_format"),
])
def test_what_recorded_text_cannot_honour_is_refused_not_answered_in_plain_text(server, params, param):
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="Yi-34B-Chat", messages=[{"role": "user", "content": "x"}], **params)
    assert err.value.body["param"] == param and err.value.body["code"] == "unsupported_value"
    assert err.value.body["message"].startswith(f"the replay server does not support {param}")


def test_optional_tools_and_a_text_format_are_answered_with_the_recording(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    answer = client.chat.completions.create(
        model="Yi-34B-Chat", messages=[{"role": "user", "content": "x"}], response_format={"type": "text"},
        tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto")
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, problem", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"model": "Yi-34B-Chat"}).encode(), "'messages'"),
    (json.dumps({"model": "Yi-34B-Chat", "messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), "n > 1"),
    (json.dumps({"model": "Yi-34B-Chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(),
     "max_tokens"),
    (json.dumps({"model": "Yi-34B-Chat", "messages": [{"role": "user", "content": "x"}],
                 "stop": ["a", "b", "c", "d", "e"]}).encode(), "'stop' must be a string or a list of at most 4"),
])
def test_bad_requests_are_400s_that_say_why(server, body, problem):
    r = httpx.post(f"{server.base_url}/chat/completions", content=body)
    assert r.status_code == 400
    assert problem in r.json()["error"]["message"]


def test_injected_errors_follow_the_seeded_plan_exactly(recordings):
    profiles = ProfileSet(seed=7, models={"Yi-34B-Chat": {"error_rate": 0.2, "error_statuses": {500: 1, 429: 1},
                                                           "retry_after_s": 0.25}})
    prompts = [f"question number {i}" for i in range(40)]
    expected = [plan_request(profiles, "Yi-34B-Chat", prompt_id_for(p), 0) for p in prompts]
    assert {p.status for p in expected} == {200, 429, 500}  # the seed exercises every branch
    with ReplayServer(recordings[0], profiles, mode="thread") as srv, httpx.Client() as client:
        got = []
        for prompt in prompts:
            r = client.post(f"{srv.base_url}/chat/completions", json={
                "model": "Yi-34B-Chat", "messages": [{"role": "user", "content": prompt}]})
            got.append(r.status_code)
            if r.status_code == 429:
                assert (r.headers["retry-after-ms"], r.headers["retry-after"]) == ("250", "1")
                assert r.json()["error"]["type"] == "rate_limit_exceeded"
        # a repeat of a failed request draws afresh: the plan for n=1
        retry = client.post(f"{srv.base_url}/chat/completions", json={
            "model": "Yi-34B-Chat", "messages": [{"role": "user", "content": prompts[got.index(500)]}]})
        stats = srv.stats()["models"]["Yi-34B-Chat"]
    assert got == [p.status for p in expected]
    assert retry.status_code == plan_request(profiles, "Yi-34B-Chat", prompt_id_for(prompts[got.index(500)]), 1).status
    assert stats["errors"] == {"429": got.count(429), "500": got.count(500) + (retry.status_code == 500)}


@pytest.mark.parametrize("wait_s, retry_after, retry_after_ms", [
    (0.2, "1", "200"),  # the demo profile's Yi-34B-Chat
    (0.4, "1", "400"),
    (1.0, "1", "1000"),
    (1.001, "2", "1001"),  # 1.001 * 1000 is 1000.99...: truncating it said 1000
    (1.5, "2", "1500"),
])
def test_retry_after_rounds_up_to_whole_seconds_and_retry_after_ms_is_exact(recordings, wait_s, retry_after,
                                                                           retry_after_ms):
    """A sub-second wait used to be sent as "retry-after: 0", which tells a client to retry at once."""
    app = build_app(recordings[0], {"models": {"Yi-34B-Chat": {"error_rate": 1.0, "error_statuses": {429: 1},
                                                               "retry_after_s": wait_s}}})
    body = json.dumps({"model": "Yi-34B-Chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(app(scope, receive, send))
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 429
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (retry_after.encode(), retry_after_ms.encode())


def test_stalled_stream_stops_midway_and_frees_the_server_on_disconnect(recordings):
    profiles = {"default": {"stall_rate": 1.0, "stall_after_tokens": 3}}
    with ReplayServer(recordings[0], profiles, mode="thread") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0, timeout=0.5)
        seen = []
        with pytest.raises(openai.APITimeoutError):
            for chunk in client.chat.completions.create(model="Yi-34B-Chat", stream=True,
                                                        messages=[{"role": "user", "content": "stall please"}]):
                seen.append(chunk.choices[0].delta.content)
        client.close()
        assert len(seen) == 3
        deadline = time.monotonic() + 5
        while srv.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = srv.stats()
    assert stats["in_flight"] == 0
    assert stats["models"]["Yi-34B-Chat"]["stalled"] == 1


def test_malformed_chunk_breaks_the_sdk_stream(recordings):
    profiles = {"default": {"malformed_rate": 1.0, "malformed_after_tokens": 2}}
    with ReplayServer(recordings[0], profiles, mode="thread") as srv:
        with httpx.stream("POST", f"{srv.base_url}/chat/completions", json={
                "model": "Yi-34B-Chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0)
        with pytest.raises(ValueError):
            list(client.chat.completions.create(model="Yi-34B-Chat", stream=True,
                                                messages=[{"role": "user", "content": "x"}]))
    parsed = []
    for data in events:
        try:
            parsed.append(json.loads(data) if data != "[DONE]" else data)
        except ValueError:
            parsed.append(None)
    assert parsed.index(None) == 2 and parsed.count(None) == 1 and parsed[-1] == "[DONE]"


def test_latency_profile_shapes_ttft_and_token_gaps(recordings):
    profiles = {"models": {"Yi-34B-Chat": {"ttft_ms": 60, "token_ms": 5}}}
    with ReplayServer(recordings[0], profiles) as srv, httpx.Client() as client:
        ttfts, gaps = [], []
        for i in range(5):
            start = time.perf_counter()
            stamps = []
            with client.stream("POST", f"{srv.base_url}/chat/completions", json={
                    "model": "Yi-34B-Chat", "stream": True, "max_tokens": 6,
                    "messages": [{"role": "user", "content": f"q{i}"}]}) as r:
                for line in r.iter_lines():
                    if '"content"' in line:
                        stamps.append(time.perf_counter())
            ttfts.append((stamps[0] - start) * 1000)
            gaps += [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
        realised = srv.stats()["models"]["Yi-34B-Chat"]["ttft_ms_p50"]
    assert 58 <= realised < 75  # uvloop timers have 1 ms resolution: a sleep may end a hair early
    assert 58 <= statistics.median(ttfts) < 85
    assert 4 <= statistics.median(gaps) < 15  # 5 ms apart, give or take the scheduler


def test_api_key_is_checked_and_a_wrong_one_is_echoed_like_some_providers_do(recordings):
    with ReplayServer(recordings[0], api_key="sk-right-key-123456") as srv:
        good = openai.OpenAI(base_url=srv.base_url, api_key="sk-right-key-123456", max_retries=0)
        assert good.chat.completions.create(model="Yi-34B-Chat", messages=[{"role": "user", "content": "x"}])
        bad = openai.OpenAI(base_url=srv.base_url, api_key="sk-wrong-key-654321", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model="Yi-34B-Chat", messages=[{"role": "user", "content": "x"}])
    assert "sk-wrong-key-654321" in err.value.body["message"]


def test_recordings_load_plain_and_gzip_and_reject_bad_rows(tmp_path):
    rows = tiny_recordings(tmp_path / "plain.jsonl", per_model=2, gzipped=False)
    recs = Recordings.load(tmp_path / "plain.jsonl")
    assert recs.models == sorted(MODELS)
    assert recs.answer(rows[0]["model"], rows[0]["prompt_id"]) == (rows[0]["output"], True)
    assert Recordings.load(tmp_path / "plain.jsonl", models=["Yi-34B-Chat"]).models == ["Yi-34B-Chat"]
    with pytest.raises(RecordingsError, match="not in the recordings"):
        Recordings.load(tmp_path / "plain.jsonl", models=["gpt-5"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(RecordingsError, match=r"bad.jsonl:2: not valid JSON"):
        Recordings.load(bad)
    bad.write_text(json.dumps({"prompt_id": "a", "model": "m"}) + "\n")
    with pytest.raises(RecordingsError, match=r"bad.jsonl:1: needs string fields"):
        Recordings.load(bad)
    with pytest.raises(RecordingsError, match="cannot read"):
        Recordings.load(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RecordingsError, match="no recorded outputs"):
        Recordings.load(tmp_path / "empty.jsonl")


def test_profiles_validate_and_load_from_yaml(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text("seed: 3\nmodels:\n  m:\n    ttft_ms: 80\n    error_rate: 0.2\n    error_statuses: {429: 1}\n")
    profiles = load_profiles(path)
    assert profiles.for_model("m").ttft_ms == 80 and profiles.for_model("other").ttft_ms == 0
    path.write_text("models:\n  m:\n    error_rate: 0.7\n    stall_rate: 0.5\n")
    with pytest.raises(ProfileError, match="must not exceed 1"):
        load_profiles(path)
    with pytest.raises(ProfileError, match="4xx/5xx"):
        load_profiles({"default": {"error_statuses": {200: 1}}})
    with pytest.raises(ProfileError, match="bogus"):
        load_profiles({"default": {"bogus": 1}})


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    result = CliRunner().invoke(replay_server_cli, ["--recordings", str(tmp_path / "bad.jsonl")])
    assert result.exit_code == 2
    assert "bad.jsonl:1: not valid JSON" in result.output and "Traceback" not in result.output


def test_cli_names_a_recordings_file_that_is_not_utf8(tmp_path):
    """The UnicodeDecodeError used to escape the reader's error handling as a traceback-worthy crash (exit 1)."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt_id": "a", "model": "m", "output": "caf\u00e9"}, ensure_ascii=False)
                     .encode("latin-1") + b"\n")
    result = CliRunner().invoke(replay_server_cli, ["--recordings", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"error: {path}: not UTF-8 text" in result.output and "Traceback" not in result.output


def test_cli_with_port_0_announces_the_port_it_listens_on(recordings):
    """`--port 0` lets the OS pick a free port; the startup line used to say port 0, which nobody can reach."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    server = subprocess.Popen([sys.executable, "-m", "shadowjudge.shadow.replay_server", "--recordings",
                               str(recordings[0]), "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line, deadline = "", time.monotonic() + 60
        while "serving" not in line and time.monotonic() < deadline and server.poll() is None:
            if select.select([server.stderr], [], [], 1)[0]:
                line = server.stderr.readline()
        assert "serving" in line, f"no startup line (exit status {server.poll()})"
        port = int(re.search(r":(\d+)/v1$", line.strip()).group(1))
        assert port != 0, line
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json() == {"status": "ok"}
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_process_start_failure_is_reported(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ReplayServerError, match="not valid JSON"):
        ReplayServer(tmp_path / "bad.jsonl").start()


@given(st.text())
def test_tokens_join_back_to_the_text(text):
    pieces = split_tokens(text)
    assert "".join(pieces) == text
    assert count_tokens(text) == len(pieces)
    assert all(len(p.strip()) <= 6 for p in pieces)


def test_a_server_process_does_not_outlive_a_killed_parent(recordings, tmp_path):
    """The parent here is a throwaway Python process that starts a ReplayServer and is then SIGKILLed."""
    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
              "from shadowjudge.shadow.replay_server import ReplayServer\n"
              f"srv = ReplayServer({str(recordings[0])!r}); srv.start(); print(srv.pid, flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the replay server outlived its parent")
