"""An OpenAI-compatible server that answers from recorded model outputs, with injected latency and faults.

It stands in for real providers in tests, the demo and the load benchmarks: a client using the `openai` SDK
sees streamed SSE chunks, usage, error bodies and Retry-After headers as from a real endpoint. It is a raw ASGI
app (no routing framework) on uvicorn, because it is also the target of a >= 500 streamed req/s benchmark.

Endpoints: `POST /v1/chat/completions` (streaming and not), `GET /v1/models`, `GET /v1/models/{id}`,
`GET /healthz`, `GET /stats`. An answer stops at the request's first `stop` sequence, as a provider's would; what
recorded text answers cannot honour (a required or named tool call, a JSON response format) is refused with a 400
saying so, rather than answered with plain text the caller would take for it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import typer

from shadowjudge.errors import ShadowJudgeError
from shadowjudge.shadow.eventloop import loop_factory
from shadowjudge.shadow.profiles import ProfileSet, RequestPlan, load_profiles, plan_request
from shadowjudge.shadow.recordings import Recordings, prompt_id_for
from shadowjudge.shadow.tokens import count_message_tokens, message_text, split_tokens

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEFAULT_PORT = 8400
API_KEY_ENV = "SHADOWJUDGE_REPLAY_API_KEY"
MAX_STOP_SEQUENCES = 4  # as OpenAI's API allows
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                429: "rate_limit_exceeded", 503: "service_unavailable"}


class ReplayServerError(ShadowJudgeError):
    """The replay server could not start or answer; the message says why."""


@lru_cache(maxsize=4096)
def _tokens(text: str) -> tuple[str, ...]:
    return tuple(split_tokens(text))


def _error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


class ModelStats:
    """Counters for one model, served by /stats."""

    def __init__(self) -> None:
        self.requests = 0
        self.streamed = 0
        self.hits = 0
        self.misses = 0
        self.ok = 0
        self.errors: Counter[int] = Counter()
        self.stalled = 0
        self.malformed = 0
        self.output_tokens = 0
        self.ttft_ms: deque[float] = deque(maxlen=1000)  # as realised: request arrival to first token written

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "streamed": self.streamed, "hits": self.hits, "misses": self.misses,
                "ok": self.ok, "errors": {str(k): v for k, v in sorted(self.errors.items())},
                "stalled": self.stalled, "malformed": self.malformed, "output_tokens": self.output_tokens,
                "ttft_ms_p50": statistics.median(self.ttft_ms) if self.ttft_ms else None}


class ReplayApp:
    """The ASGI app. One event loop owns it, so its counters need no lock."""

    def __init__(self, recordings: Recordings, profiles: ProfileSet | None = None, *, name: str = "replay",
                 api_key: str | None = None):
        self.recordings = recordings
        self.profiles = profiles or ProfileSet()
        self.name = name
        self._api_key = api_key
        self._seen: Counter[tuple[str, str]] = Counter()
        self._ids = itertools.count(1)
        self.models = defaultdict(ModelStats)
        self.counters: Counter[str] = Counter()
        self.in_flight = 0
        self._name_header = (b"x-replay-server", name.encode())
        self._model_bodies = {m: orjson.dumps({"id": m, "object": "model", "created": 0, "owned_by": f"replay:{name}"})
                              for m in recordings.models}
        self._models_body = b'{"object":"list","data":[' + b",".join(self._model_bodies.values()) + b"]}"

    def stats(self) -> dict[str, Any]:
        per_model = {m: s.as_dict() for m, s in sorted(self.models.items())}
        return {"name": self.name, "in_flight": self.in_flight, **dict(self.counters),
                "hits": sum(s.hits for s in self.models.values()),
                "misses": sum(s.misses for s in self.models.values()), "models": per_model}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        self.counters["http_requests"] += 1
        if path == "/v1/chat/completions":
            if method != "POST":
                return await self._json(send, 405, _error_body(405, "use POST for /v1/chat/completions"))
            self.in_flight += 1
            try:
                await self._chat(scope, receive, send)
            finally:
                self.in_flight -= 1
        elif not (path in ("/healthz", "/stats", "/v1/models") or path.startswith("/v1/models/")):
            # as OpenAI and vLLM answer a base_url without /v1: 404, whatever the method
            self.counters["not_found"] += 1
            await self._json(send, 404, _error_body(404, f"no route {method} {path}", "not_found"))
        elif method != "GET":
            await self._json(send, 405, _error_body(405, f"use GET for {path}"))
        elif path == "/healthz":
            await self._json(send, 200, b'{"status":"ok"}')
        elif path == "/stats":
            await self._json(send, 200, orjson.dumps(self.stats()))
        elif path == "/v1/models":
            await self._json(send, 200, self._models_body)
        else:
            await self._model(send, path.removeprefix("/v1/models/"))

    async def _model(self, send: Send, model: str) -> None:
        """`models.retrieve`: the model object, or the 404 a provider sends for a model it does not serve."""
        body = self._model_bodies.get(model)
        if body is None:
            self.counters["unknown_model"] += 1
            return await self._json(send, 404, _unknown_model_body(model))
        await self._json(send, 200, body)

    async def _json(self, send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), self._name_header, *headers]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: Scope) -> str | None:
        """None when the request may pass; otherwise the key it presented (echoed as some providers do)."""
        if self._api_key is None:
            return None
        for key, value in scope["headers"]:
            if key == b"authorization":
                presented = value.decode("latin-1").removeprefix("Bearer ").strip()
                return None if presented == self._api_key else presented
        return ""

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        presented = self._authorized(scope)
        if presented is not None:
            self.counters["unauthorized"] += 1
            return await self._json(send, 401, _error_body(401, f"Incorrect API key provided: {presented}.",
                                                           "invalid_api_key"))
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.counters["bad_request"] += 1
            return await self._json(send, 400, _error_body(400, "request body is not valid JSON"))
        problem = _request_problem(request)
        if problem:
            self.counters["bad_request"] += 1
            return await self._json(send, 400, _error_body(400, problem))
        unsupported = _unsupported_feature(request)
        if unsupported:
            self.counters["unsupported"] += 1
            return await self._json(send, 400, _error_body(400, unsupported[1], "unsupported_value", unsupported[0]))
        model = request["model"]
        if model not in self.recordings:
            self.counters["unknown_model"] += 1
            return await self._json(send, 404, _unknown_model_body(model))

        messages = request["messages"]
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        prompt_id = prompt_id_for(message_text(last_user.get("content")) if last_user else "")
        n = self._seen[(model, prompt_id)]
        self._seen[(model, prompt_id)] = n + 1
        plan = plan_request(self.profiles, model, prompt_id, n)
        stats = self.models[model]
        stats.requests += 1
        stream = bool(request.get("stream"))
        stats.streamed += stream

        if plan.outcome == "error":
            stats.errors[plan.status] += 1
            headers: list[tuple[bytes, bytes]] = []
            if plan.status == 429:
                wait = self.profiles.for_model(model).retry_after_s  # >= 0, validated
                # whole seconds, rounded up: a 0.2 s wait sent as "0" would invite an immediate retry
                headers = [(b"retry-after", str(math.ceil(wait)).encode()),
                           (b"retry-after-ms", str(round(wait * 1000)).encode())]
            message = "Rate limit reached, retry later." if plan.status == 429 else "The server had an error."
            return await self._json(send, plan.status, _error_body(plan.status, message), headers)

        text, hit = self.recordings.answer(model, prompt_id)
        if hit:
            stats.hits += 1
        else:
            stats.misses += 1
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        tokens, finish = _generated_tokens(text, _stop_sequences(request.get("stop")), limit)
        usage = {"prompt_tokens": count_message_tokens(messages), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion_id = f"chatcmpl-{self.name}-{next(self._ids)}"
        if plan.outcome == "stall":
            stats.stalled += 1
        elif plan.outcome == "malformed":
            stats.malformed += 1
        first_token_at = arrived + plan.ttft_ms / 1000  # parsing this request counts towards its TTFT
        if stream:
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            await self._stream(receive, send, plan, first_token_at, model, completion_id, tokens, finish,
                               usage if include_usage else None)
        else:
            await self._complete(receive, send, plan, first_token_at, model, completion_id, "".join(tokens), finish,
                                 usage)
        if plan.outcome == "ok":
            stats.ok += 1
            stats.output_tokens += len(tokens)

    async def _stream(self, receive: Receive, send: Send, plan: RequestPlan, first_token_at: float, model: str,
                      completion_id: str, tokens: tuple[str, ...], finish: str, usage: dict[str, int] | None) -> None:
        profile = self.profiles.for_model(model)
        stats = self.models[model]
        created = int(time.time())
        head = (b'data: {"id":"' + completion_id.encode() + b'","object":"chat.completion.chunk","created":'
                + str(created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":[')
        first = head + b'{"index":0,"delta":{"role":"assistant","content":'
        middle = head + b'{"index":0,"delta":{"content":'
        tail = b'},"finish_reason":null}]}\n\n'
        chunks = [(first if i == 0 else middle) + orjson.dumps(token) + tail for i, token in enumerate(tokens or ("",))]
        stall = plan.outcome == "stall"
        if stall:
            chunks = chunks[: profile.stall_after_tokens]
        else:
            if plan.outcome == "malformed":
                chunks.insert(min(profile.malformed_after_tokens, len(chunks)), middle + b'"\n\n')
            chunks[-1] += head + b'{"index":0,"delta":{},"finish_reason":"' + finish.encode() + b'"}]}\n\n'
            if usage is not None:
                chunks[-1] += (b'data: {"id":"' + completion_id.encode() + b'","object":"chat.completion.chunk",'
                               b'"created":' + str(created).encode() + b',"model":' + orjson.dumps(model)
                               + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
            chunks[-1] += b"data: [DONE]\n\n"
        delay = profile.token_ms / 1000
        if not delay:
            chunks = [b"".join(chunks)]
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), self._name_header]})
        await _sleep_until(first_token_at)
        for i, chunk in enumerate(chunks):
            if i:  # on an absolute schedule, so timer overshoot does not accumulate over a long answer
                await _sleep_until(first_token_at + i * delay)
            last = i == len(chunks) - 1 and not stall
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if i == 0 and plan.outcome == "ok":
                stats.ttft_ms.append((time.perf_counter() - first_token_at) * 1000 + plan.ttft_ms)
        if stall:
            await _until_disconnect(receive, profile.stall_s)
            await send({"type": "http.response.body", "body": b""})

    async def _complete(self, receive: Receive, send: Send, plan: RequestPlan, first_token_at: float, model: str,
                        completion_id: str, text: str, finish: str, usage: dict[str, int]) -> None:
        profile = self.profiles.for_model(model)
        await _sleep_until(first_token_at + profile.token_ms * max(0, usage["completion_tokens"] - 1) / 1000)
        if plan.outcome == "stall":
            await _until_disconnect(receive, profile.stall_s)
        body = orjson.dumps({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage})
        if plan.outcome == "malformed":
            body = body[: len(body) // 2]
        await self._json(send, 200, body)


def _unknown_model_body(model: str) -> bytes:
    return _error_body(404, f"The model '{model}' does not exist or you do not have access to it.", "model_not_found")


def _stop_sequences(stop: str | list[str] | None) -> list[str]:
    """The request's stop sequences (validated by `_request_problem`); an empty one stops nothing."""
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


def _generated_tokens(text: str, stops: list[str], limit: int | None) -> tuple[tuple[str, ...], str]:
    """The tokens a provider would generate and its finish_reason: the answer up to its first stop sequence (which
    is not sent), cut at `limit` tokens ("length") when that comes first."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    tokens = _tokens(text[:min(cuts)] if cuts else text)
    if limit is not None and len(tokens) > limit:
        return tokens[:limit], "length"
    return tokens, "stop"


def _unsupported_feature(request: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) for what a replay of recorded text cannot honour: a tool call the request requires, a JSON
    response format. Refused, as a provider refuses what it does not support, rather than answered with plain text
    that the caller would take for a tool call or JSON; `tool_choice` "auto"/"none" may be answered in text."""
    why = "the replay server does not support {}: it replays recorded text answers, {}"
    choice = request.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        return "tool_choice", why.format(f"tool_choice {orjson.dumps(choice).decode()}", "never tool calls")
    response_format = request.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in ("json_object", "json_schema"):
        return "response_format", why.format(f"response_format {kind!r}", "which need not be JSON")
    return None


def _request_problem(request: Any) -> str | None:
    if not isinstance(request, dict):
        return "request body must be a JSON object"
    if not isinstance(request.get("model"), str):
        return "'model' is required and must be a string"
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "'messages' must be a non-empty list of message objects"
    if request.get("n") not in (None, 1):
        return "n > 1 is not supported by the replay server"
    for key in ("max_tokens", "max_completion_tokens"):
        value = request.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"'{key}' must be a positive integer"
    stop = request.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= MAX_STOP_SEQUENCES and all(isinstance(s, str) for s in stop)):
        return f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} strings"
    return None


async def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _until_disconnect(receive: Receive, limit_s: float) -> None:
    """A stalled stream sends nothing until the client gives up (or `limit_s` passes)."""
    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(wait(), limit_s)
    except asyncio.TimeoutError:
        pass


def build_app(recordings: Path | str | Iterable[Path | str], profiles: ProfileSet | dict | str | Path | None = None,
              *, name: str = "replay", api_key: str | None = None, models: Iterable[str] | None = None) -> ReplayApp:
    return ReplayApp(Recordings.load(recordings, models), load_profiles(profiles), name=name, api_key=api_key)


def _http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's fastest HTTP/1.1 protocol with TCP_NODELAY forced on.

    A socket inherited from another process (or served by plain asyncio) may keep Nagle's algorithm on; then
    every response written in two parts waits ~40 ms for the client's delayed ACK, which wrecks TTFT.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class NoDelayHttpProtocol(Base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().connection_made(transport)

    return NoDelayHttpProtocol


def _uvicorn_server(app: ReplayApp, **kwargs: Any):  # -> uvicorn.Server
    import uvicorn

    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", backlog=4096,
                            http=_http_protocol(), timeout_graceful_shutdown=2, timeout_keep_alive=30, **kwargs)
    return uvicorn.Server(config)


def serve_forever(app: ReplayApp, sock: socket.socket) -> None:
    """Serve `app` on a bound, listening socket until SIGINT/SIGTERM (or `should_exit`)."""
    server = _uvicorn_server(app)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(server.serve(sockets=[sock]))


class ReplayServer:
    """Run a replay server on 127.0.0.1 for the duration of a `with` block; `base_url` ends in /v1.

    mode="process" (default) serves from a child process, so the client under test shares no GIL with it;
    mode="thread" starts faster and lets a test read `app` directly.
    """

    def __init__(self, recordings: Path | str | Iterable[Path | str],
                 profiles: ProfileSet | dict | str | Path | None = None, *, port: int = 0,
                 host: str = "127.0.0.1", name: str = "replay", api_key: str | None = None,
                 models: Iterable[str] | None = None, mode: Literal["process", "thread"] = "process",
                 startup_timeout_s: float = 30.0):
        self._recordings = [recordings] if isinstance(recordings, (str, Path)) else list(recordings)
        self._profiles = load_profiles(profiles)
        self._models = list(models) if models else None
        self.host, self.port, self.name, self.mode = host, port, name, mode
        self._api_key = api_key
        self._timeout = startup_timeout_s
        self._socket: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.app: ReplayApp | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        """The server process (mode="process"), e.g. to read its CPU time; None in thread mode."""
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> "ReplayServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ReplayServerError(f"replay server cannot bind {self.host}:{self.port}: {exc.strerror}") from None
        sock.listen(4096)
        self._socket = sock
        self.port = sock.getsockname()[1]
        try:
            if self.mode == "thread":
                self._start_thread(sock)
            else:
                self._start_process(sock)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _start_thread(self, sock: socket.socket) -> None:
        self.app = ReplayApp(Recordings.load(self._recordings, self._models), self._profiles, name=self.name,
                             api_key=self._api_key)
        self._server = server = _uvicorn_server(self.app)

        def serve() -> None:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(server.serve(sockets=[sock]))

        self._thread = threading.Thread(target=serve, name=f"replay-server-{self.port}", daemon=True)
        self._thread.start()

    def _start_process(self, sock: socket.socket) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="replay-server-")
        profiles_path = Path(self._tmp.name) / "profiles.json"
        profiles_path.write_text(self._profiles.model_dump_json())
        args = [sys.executable, "-m", "shadowjudge.shadow.replay_server", "--fd", str(sock.fileno()),
                "--profiles", str(profiles_path), "--name", self.name, "--exit-with-parent"]
        for path in self._recordings:
            args += ["--recordings", str(path)]
        for model in self._models or []:
            args += ["--model", model]
        env = dict(os.environ)
        env.pop(API_KEY_ENV, None)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        if self._api_key is not None:
            env[API_KEY_ENV] = self._api_key
            args += ["--api-key-env", API_KEY_ENV]
        self._stderr = open(Path(self._tmp.name) / "stderr.log", "w+b")
        self._proc = subprocess.Popen(args, pass_fds=[sock.fileno()], env=env, stdout=subprocess.DEVNULL,
                                      stderr=self._stderr)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    self._stderr.seek(0)
                    tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-5:]
                    raise ReplayServerError(f"replay server exited with status {self._proc.returncode}: "
                                            + " | ".join(tail))
                if self._thread is not None and not self._thread.is_alive():
                    raise ReplayServerError("replay server thread stopped during startup")
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise ReplayServerError(f"replay server on {self.url} not healthy after {self._timeout:.0f}s")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/stats", timeout=5.0).json()

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
            self._stderr.close()
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


replay_server_cli = typer.Typer(help="Serve recorded model outputs as an OpenAI-compatible endpoint.",
                                add_completion=False)


@replay_server_cli.callback(invoke_without_command=True)
def serve(
    recordings: list[Path] = typer.Option(..., "--recordings",
                                          help="AlpacaEval-format outputs (JSON lines, .gz ok); repeatable"),
    profiles: Path | None = typer.Option(None, "--profiles", help="YAML/JSON latency and fault profiles"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65535, help="0: any free port"),
    name: str = typer.Option("replay", "--name", help="Sent as x-replay-server and in /stats"),
    model: list[str] = typer.Option([], "--model", help="Serve only these recorded models; repeatable"),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Require the key held by this env var"),
    fd: int | None = typer.Option(None, "--fd", hidden=True, help="Serve on an already bound socket"),
    exit_with_parent: bool = typer.Option(False, "--exit-with-parent", hidden=True,
                                          help="Stop when the process that started this one is gone"),
) -> None:
    """Serve until interrupted."""
    try:
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ReplayServerError(f"--api-key-env: env var {api_key_env} is not set")
        app = build_app(recordings, profiles, name=name, api_key=api_key, models=model or None)
    except ShadowJudgeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None
    if fd is not None:
        sock = socket.socket(fileno=fd)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            typer.echo(f"error: cannot bind {host}:{port}: {exc.strerror}", err=True)
            raise typer.Exit(2) from None
        sock.listen(4096)
        bound_port = sock.getsockname()[1]  # the one the OS picked for --port 0
        typer.echo(f"replay server '{name}' serving {len(app.recordings.models)} models on "
                   f"http://{host}:{bound_port}/v1", err=True)
    if exit_with_parent:
        _exit_when_orphaned()
    serve_forever(app, sock)


def _exit_when_orphaned() -> None:
    """A server started by ReplayServer must not outlive it, even if its parent is killed without cleanup."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    replay_server_cli()
