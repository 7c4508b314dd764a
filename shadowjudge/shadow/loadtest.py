"""Load test an OpenAI-compatible endpoint with sampled traffic: a fixed arrival rate or a concurrency ramp.

Each step reports the throughput it achieved, latency and TTFT percentiles and the error rate, so the knee
of a provider (or the replay server, or a gateway) shows up as the step where throughput stops growing and
latency or errors climb. Requests are not retried and nothing is written to the store: this measures the
endpoint, not a shadow run. Always bounded: a request cap, a duration per step and a cap on requests in flight.

At a fixed rate, a request that leaves later than its scheduled arrival (every in-flight slot taken, or the
client's event loop fell behind) would hide that wait from its latency (coordinated omission); so each step also
reports how late the sends were (`send_lag_ms`) and the latency from the scheduled arrival (`response_ms`). The
client gets one connection per in-flight slot, sized for every request the rate can have in flight within the
timeout, so a request never queues inside the HTTP client, where the wait would read as the endpoint's latency.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from shadowjudge.config import ConfigError, ShadowConfig, TargetConfig
from shadowjudge.errors import InputError, ShadowJudgeError
from shadowjudge.shadow.credentials import resolve_api_key
from shadowjudge.shadow.endpoint import DONE_GRACE_S, AttemptError, ChatEndpoint
from shadowjudge.shadow.engine import EndpointFactory, build_request_body, openai_endpoint
from shadowjudge.shadow.eventloop import run_sync
from shadowjudge.shadow.metrics import latency_percentiles
from shadowjudge.shadow.recordings import read_json_lines
from shadowjudge.tracking.mlflow_tracking import TrackingError, ensure_experiment, redact_uri
from shadowjudge.tracking.reachability import check_tracking_reachable

MAX_IN_FLIGHT = 1024
SEND_LAG_WARN_MS = 50.0  # a send lag p99 above this means the client could not keep the schedule


class LoadTestError(InputError):
    """A load test that cannot run as asked."""


@dataclass(frozen=True)
class Ramp:
    """Closed-loop concurrency ramp: `start` workers, `step` more every `hold_s` seconds, up to `max`."""

    start: int
    step: int
    hold_s: float
    max: int

    @classmethod
    def parse(cls, text: str) -> "Ramp":
        """From 'start:step:hold_s:max', e.g. '4:4:10:64'."""
        try:
            start, step, hold, top = text.split(":")
            ramp = cls(int(start), int(step), float(hold), int(top))
        except ValueError:
            raise LoadTestError(f"--ramp must be start:step:hold_s:max (e.g. 4:4:10:64), got {text!r}") from None
        if ramp.start < 1 or ramp.step < 1 or ramp.hold_s <= 0 or ramp.max < ramp.start:
            raise LoadTestError(f"--ramp {text!r}: need start >= 1, step >= 1, hold_s > 0 and max >= start")
        return ramp

    def levels(self) -> list[int]:
        return list(range(self.start, self.max + 1, self.step))


@dataclass
class LoadStep:
    """One step of the plan.

    `achieved_rps` is the throughput as vegeta reports it: successes / `duration_s`, and a step lasts until its last
    answer, so `drain_s` (last send to last answer) is in it: at rate R for D seconds with latency L it reads about
    R*D/(D+L). `send_rps` is the arrival rate really achieved: sends per second between the first and the last send
    (n sends span n-1 intervals, so a client that kept its schedule reads target_rps); None below 2 sends.
    `latency_ms` is the endpoint's service time, from the actual send. `response_ms` (successes, like latency_ms)
    is what a user arriving at the scheduled moment waits: from the scheduled arrival at a fixed rate; a closed loop
    has no schedule (a worker sends when it is free), so there it equals `latency_ms` and `send_lag_ms` (every send
    of a fixed rate) is empty. `in_flight_capped` counts arrivals that waited for one of the `max_in_flight` slots
    (a fixed rate's cap on requests outstanding, one connection each; None in a closed loop, whose workers are it).
    """

    index: int
    concurrency: int | None
    target_rps: float | None
    duration_s: float
    sent: int
    ok: int
    errors: dict[str, int]
    achieved_rps: float
    error_rate: float
    latency_ms: dict[str, Any] = field(default_factory=dict)
    ttft_ms: dict[str, Any] = field(default_factory=dict)
    send_rps: float | None = None
    drain_s: float = 0.0
    send_lag_ms: dict[str, Any] = field(default_factory=dict)
    response_ms: dict[str, Any] = field(default_factory=dict)
    in_flight_capped: int = 0
    max_in_flight: int | None = None


@dataclass
class LoadTestReport:
    model: str
    base_url: str
    mode: str
    steps: list[LoadStep]
    capped: bool = False  # stopped by max_requests before the plan ended

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StepRecorder:
    def __init__(self) -> None:
        self.latency: list[float] = []
        self.ttft: list[float | None] = []
        self.response: list[float] = []
        self.send_lag: list[float] = []
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.in_flight_capped = 0
        self.first_send = self.last_send = self.last_answer = 0.0

    async def send(self, endpoint: ChatEndpoint, body: dict[str, Any], stream: bool, timeout_s: float,
                   due: float | None = None) -> None:
        """Send one request; `due` is its scheduled arrival (perf_counter) at a fixed rate, None in a closed loop."""
        sent_at = time.perf_counter()
        if not self.sent:
            self.first_send = sent_at
        self.last_send = sent_at
        self.sent += 1
        if due is not None:  # asyncio may wake a hair before `due`: a send is never early
            self.send_lag.append(max(0.0, sent_at - due) * 1000)
        try:
            done = await endpoint.complete(body, stream=stream, timeout_s=timeout_s)
        except AttemptError as exc:
            self.errors[exc.error_class] += 1
            return
        except Exception as exc:  # counted, never lost: a load test must account for every request
            self.errors[f"unexpected:{type(exc).__name__}"] += 1
            return
        finally:
            answered = self.last_answer = time.perf_counter()
        self.latency.append(done.latency_ms)
        self.ttft.append(done.ttft_ms)
        self.response.append(done.latency_ms if due is None else (answered - min(due, sent_at)) * 1000)

    def step(self, index: int, elapsed: float, concurrency: int | None, target_rps: float | None,
             max_in_flight: int | None = None) -> LoadStep:
        ok = len(self.latency)
        send_span = self.last_send - self.first_send
        return LoadStep(index=index, concurrency=concurrency, target_rps=target_rps, duration_s=round(elapsed, 3),
                        sent=self.sent, ok=ok, errors=dict(sorted(self.errors.items())),
                        achieved_rps=ok / elapsed if elapsed > 0 else 0.0,
                        error_rate=(self.sent - ok) / self.sent if self.sent else 0.0,
                        latency_ms=latency_percentiles(self.latency), ttft_ms=latency_percentiles(self.ttft),
                        send_rps=(self.sent - 1) / send_span if self.sent > 1 and send_span > 0 else None,
                        drain_s=round(self.last_answer - self.last_send, 3),
                        send_lag_ms=latency_percentiles(self.send_lag) if self.send_lag else {},
                        response_ms=latency_percentiles(self.response), in_flight_capped=self.in_flight_capped,
                        max_in_flight=max_in_flight)


class _Budget:
    """The request cap shared by all steps; `refused` once it stopped a request the plan still had."""

    def __init__(self, max_requests: int):
        self.left = max_requests
        self.refused = False

    def take(self) -> bool:
        if self.left <= 0:
            self.refused = True
            return False
        self.left -= 1
        return True


async def _closed_loop_step(endpoint: ChatEndpoint, bodies: Sequence[dict[str, Any]], cursor: list[int],
                            concurrency: int, hold_s: float, budget: _Budget,
                            shadow: ShadowConfig) -> tuple[_StepRecorder, float]:
    recorder = _StepRecorder()
    start = time.perf_counter()
    deadline = start + hold_s

    async def worker() -> None:
        while time.perf_counter() < deadline and budget.take():
            body = bodies[cursor[0] % len(bodies)]
            cursor[0] += 1
            await recorder.send(endpoint, body, shadow.stream, shadow.timeout_s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return recorder, time.perf_counter() - start


def open_loop_slots(rate: float, timeout_s: float) -> int:
    """Requests a fixed rate can have outstanding: arrivals within the longest a request holds its connection (the
    timeout, plus the grace for a stream's end), one more for a late timer, at most MAX_IN_FLIGHT."""
    return min(MAX_IN_FLIGHT, math.ceil(rate * (timeout_s + DONE_GRACE_S)) + 1)


async def _open_loop_step(endpoint: ChatEndpoint, bodies: Sequence[dict[str, Any]], rate: float, duration_s: float,
                          budget: _Budget, shadow: ShadowConfig, max_in_flight: int) -> tuple[_StepRecorder, float]:
    """Arrivals every 1/rate seconds regardless of completions, until `max_in_flight` (the client's connections)
    are outstanding: a later arrival waits here, counted and in its send lag, not in the client's pool."""
    recorder = _StepRecorder()
    slots = asyncio.Semaphore(max_in_flight)
    tasks: list[asyncio.Task] = []
    start = time.perf_counter()
    i = 0

    async def one(body: dict[str, Any], due: float) -> None:
        try:
            await recorder.send(endpoint, body, shadow.stream, shadow.timeout_s, due)
        finally:
            slots.release()

    while True:
        due = start + i / rate
        if due >= start + duration_s or not budget.take():
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots.locked():
            recorder.in_flight_capped += 1
        await slots.acquire()
        tasks.append(asyncio.create_task(one(bodies[i % len(bodies)], due)))
        i += 1
    await asyncio.gather(*tasks)
    return recorder, time.perf_counter() - start


async def run_loadtest_async(target: TargetConfig, prompts: Sequence[list[dict[str, Any]]], *,
                             rate: float | None = None, duration_s: float = 10.0, ramp: Ramp | None = None,
                             max_requests: int = 10_000, shadow: ShadowConfig | None = None,
                             endpoint_factory: EndpointFactory = openai_endpoint) -> LoadTestReport:
    if (rate is None) == (ramp is None):
        raise LoadTestError("give either a target rate or a concurrency ramp")
    if rate is not None and (rate <= 0 or duration_s <= 0):
        raise LoadTestError("rate and duration must be positive")
    if not prompts:
        raise LoadTestError("no prompts to send")
    if max_requests < 1:
        raise LoadTestError("max_requests must be at least 1")
    shadow = shadow or ShadowConfig(max_retries=0, timeout_s=30.0, max_tokens=256)
    bodies = [build_request_body(list(m), {}, target.model, shadow) for m in prompts]
    top = ramp.max if ramp else open_loop_slots(rate, shadow.timeout_s)
    sized = target.model_copy(update={"concurrency": top})
    try:
        api_key = resolve_api_key(target)
    except ConfigError as exc:
        raise LoadTestError(str(exc)) from None
    endpoint = endpoint_factory(sized, api_key, shadow)
    budget = _Budget(max_requests)
    steps: list[LoadStep] = []
    try:
        if ramp is not None:
            cursor = [0]
            for index, level in enumerate(ramp.levels()):
                if budget.left <= 0:
                    budget.refused = True  # levels of the ramp are left
                    break
                recorder, elapsed = await _closed_loop_step(endpoint, bodies, cursor, level, ramp.hold_s, budget,
                                                            shadow)
                steps.append(recorder.step(index, elapsed, level, None))
        else:
            recorder, elapsed = await _open_loop_step(endpoint, bodies, rate, duration_s, budget, shadow, top)
            steps.append(recorder.step(0, elapsed, None, rate, top))
    finally:
        await endpoint.aclose()
    return LoadTestReport(model=target.model, base_url=target.base_url, mode="ramp" if ramp else "rate", steps=steps,
                          capped=budget.refused)


def run_loadtest(target: TargetConfig, prompts: Sequence[list[dict[str, Any]]], **kwargs: Any) -> LoadTestReport:
    """Sync wrapper of `run_loadtest_async` (same arguments)."""
    return run_sync(lambda: run_loadtest_async(target, prompts, **kwargs))


def loadtest_figure(report: LoadTestReport):
    """Throughput and latency percentiles per step: the curve whose knee is the endpoint's capacity."""
    from shadowjudge.tracking.mlflow_tracking import new_figure

    xs = [s.concurrency if s.concurrency is not None else s.target_rps for s in report.steps]
    fig, (ax_rps, ax_lat) = new_figure(11, 4, ncols=2)
    ax_rps.plot(xs, [s.achieved_rps for s in report.steps], marker="o", label="achieved req/s")
    ax_rps.plot(xs, [100 * s.error_rate for s in report.steps], marker="x", linestyle="--", label="error %")
    for key in ("p50", "p95", "p99"):
        ax_lat.plot(xs, [s.latency_ms.get(key) for s in report.steps], marker="o", label=f"latency {key}")
    ax_lat.plot(xs, [s.ttft_ms.get("p50") for s in report.steps], marker="s", linestyle=":", label="TTFT p50")
    xlabel = "concurrency" if report.mode == "ramp" else "target req/s"
    for ax, ylabel in ((ax_rps, "req/s | error %"), (ax_lat, "ms")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"load test: {report.model} ({report.mode})")
    fig.tight_layout()
    return fig


def log_loadtest(report: LoadTestReport, tracking_uri: str, experiment: str = "shadowjudge/loadtest") -> str:
    """One MLflow run: per-step metrics (step = ramp level index), the plot and the full report as JSON."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, tracking_uri, experiment)
        run = client.create_run(experiment_id, run_name=f"loadtest {report.model}",
                                tags={"shadowjudge.kind": "loadtest"})
        run_id = run.info.run_id
        for key, value in (("model", report.model), ("mode", report.mode), ("steps", len(report.steps))):
            client.log_param(run_id, key, value)
        now = int(time.time() * 1000)
        for s in report.steps:
            values = {"achieved_rps": s.achieved_rps, "send_rps": s.send_rps, "drain_s": s.drain_s,
                      "error_rate": s.error_rate, "sent": s.sent, "in_flight_capped": s.in_flight_capped,
                      "max_in_flight": s.max_in_flight, "concurrency": s.concurrency, "target_rps": s.target_rps}
            for name, percentiles in (("latency", s.latency_ms), ("ttft", s.ttft_ms), ("send_lag", s.send_lag_ms),
                                      ("response", s.response_ms)):
                values.update({f"{name}_{k}_ms": v for k, v in percentiles.items() if k.startswith("p")})
            for key, value in values.items():
                if value is not None:
                    client.log_metric(run_id, key, float(value), timestamp=now, step=s.index)
        figure = loadtest_figure(report)
        client.log_figure(run_id, figure, "loadtest.png")
        client.log_dict(run_id, report.as_dict(), "loadtest.json")
        client.set_terminated(run_id)
    except Exception as exc:
        raise TrackingError(f"MLflow at {redact_uri(tracking_uri)} failed: {type(exc).__name__}: {exc}") from exc
    return run_id


def prompts_from_jsonl(path: Path, limit: int = 10_000) -> list[list[dict[str, Any]]]:
    """Messages of a request log in JSON lines (plain or gzipped): `request.messages` or top-level `messages`."""
    prompts: list[list[dict[str, Any]]] = []
    for lineno, record in read_json_lines(path, LoadTestError):
        if not isinstance(record, dict):
            raise LoadTestError(f"{path}:{lineno}: not a JSON object (with `messages` or `request.messages`)")
        request = record.get("request") if isinstance(record.get("request"), dict) else record
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise LoadTestError(f"{path}:{lineno}: no `messages` list (nor `request.messages`)")
        prompts.append(messages)
        if len(prompts) >= limit:
            break
    return prompts


def prompts_from_store(config_path: Path, route: str, limit: int = 10_000) -> list[list[dict[str, Any]]]:
    """Messages of the route's stored (sampled, redacted) traffic, newest first."""
    from sqlalchemy import select

    from shadowjudge.config import load_config
    from shadowjudge.store import TrafficSample, get_engine, session_scope

    config = load_config(config_path)
    config.route(route)
    with session_scope(get_engine(config.store.url)) as s:
        rows = s.scalars(select(TrafficSample.messages).where(TrafficSample.route == route)
                         .order_by(TrafficSample.id.desc()).limit(limit))
        return [list(m) for m in rows]


loadtest_cli = typer.Typer(help="Load test an OpenAI-compatible endpoint with sampled traffic.", add_completion=False)


@loadtest_cli.callback(invoke_without_command=True)
def loadtest(
    base_url: str = typer.Option(..., "--base-url", help="Endpoint base URL, e.g. http://127.0.0.1:8400/v1"),
    model: str = typer.Option(..., "--model"),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="Env var holding the endpoint's key"),
    requests_file: Path | None = typer.Option(None, "--requests", help="Request log (JSON lines, .gz ok)"),
    config: Path | None = typer.Option(None, "--config", help="Use the stored samples of --route instead"),
    route: str | None = typer.Option(None, "--route"),
    rate: float | None = typer.Option(None, "--rate", help="Open-loop arrivals per second"),
    duration: float = typer.Option(10.0, "--duration", help="Seconds at --rate"),
    ramp: str | None = typer.Option(None, "--ramp", help="Concurrency ramp start:step:hold_s:max"),
    max_requests: int = typer.Option(10_000, "--max-requests", min=1),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1),
    stream: bool = typer.Option(True, "--stream/--no-stream"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Log metrics and the plot to MLflow"),
    experiment: str = typer.Option("shadowjudge/loadtest", "--experiment"),
    plot: Path | None = typer.Option(None, "--plot", help="Also save the plot as this PNG"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object"),
) -> None:
    """Replay sampled traffic at a rate or up a concurrency ramp and report each step."""
    try:
        if requests_file is not None:
            prompts = prompts_from_jsonl(requests_file, max_requests)
        elif config is not None and route:
            prompts = prompts_from_store(config, route, max_requests)
        else:
            raise LoadTestError("give --requests FILE, or --config FILE with --route NAME")
        target = TargetConfig(name="loadtest", model=model, base_url=base_url, api_key_env=api_key_env)
        shadow = ShadowConfig(stream=stream, timeout_s=timeout, max_retries=0, max_tokens=max_tokens)
        if tracking_uri:  # a tracking server that is down fails now, not after the load test
            check_tracking_reachable(tracking_uri)
        report = run_loadtest(target, prompts, rate=rate, duration_s=duration,
                              ramp=Ramp.parse(ramp) if ramp else None, max_requests=max_requests, shadow=shadow)
        run_id = log_loadtest(report, tracking_uri, experiment) if tracking_uri else None
        if plot is not None:
            loadtest_figure(report).savefig(plot, dpi=100)
    except (ShadowJudgeError, ConfigError, TrackingError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None
    if as_json:
        typer.echo(json.dumps({**report.as_dict(), "mlflow_run_id": run_id}))
    else:
        _print_report(report, run_id)
    if (failure := _nothing_answered(report)) is not None:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(1)


def _nothing_answered(report: LoadTestReport) -> str | None:
    """Why a load test in which every request failed is no measurement (a wrong model, an endpoint that is down):
    its latencies describe errors, and a script reading the exit status must see it failed."""
    sent = sum(s.sent for s in report.steps)
    if sent == 0 or any(s.ok for s in report.steps):
        return None
    errors: Counter[str] = Counter()
    for s in report.steps:
        errors.update(s.errors)
    found = ", ".join(f"{kind} {n}" for kind, n in errors.most_common()) or "none recorded"
    return f"none of the {sent} requests to {report.model} succeeded (errors: {found})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _schedule_warnings(report: LoadTestReport) -> list[str]:
    """Steps whose sends left late: their `latency_ms` leaves out that wait, so the reader must look elsewhere."""
    warnings = []
    for s in report.steps:
        lag_p99 = s.send_lag_ms.get("p99")
        if lag_p99 is not None and lag_p99 > SEND_LAG_WARN_MS:
            warnings.append(f"warning: step {s.index}: the client fell behind its schedule (send lag p99 "
                            f"{_ms(lag_p99)} ms); latency from the scheduled arrival is in response_ms "
                            f"(p99 {_ms(s.response_ms.get('p99'))} ms)")
        if s.in_flight_capped:
            warnings.append(f"warning: step {s.index}: {s.in_flight_capped} arrivals waited for a free slot: "
                            f"all {s.max_in_flight} in-flight slots (one connection each) were taken")
    return warnings


def _print_report(report: LoadTestReport, run_id: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"load test {report.model} ({report.mode})")
    columns = ("step", "concurrency/rate", "sent", "ok", "req/s", "errors", "p50 ms", "p95 ms", "p99 ms", "TTFT p50",
               "send lag p99")
    for column in columns:
        table.add_column(column, justify="right")
    for s in report.steps:
        table.add_row(str(s.index), str(s.concurrency or s.target_rps), str(s.sent), str(s.ok),
                      f"{s.achieved_rps:.1f}", ", ".join(f"{k} {v}" for k, v in s.errors.items()) or "0",
                      _ms(s.latency_ms.get("p50")), _ms(s.latency_ms.get("p95")), _ms(s.latency_ms.get("p99")),
                      _ms(s.ttft_ms.get("p50")), _ms(s.send_lag_ms.get("p99")))
    console = Console()
    console.print(table)
    for warning in _schedule_warnings(report):
        console.print(warning, soft_wrap=True)  # one line each, whatever the terminal width
    if report.capped:
        console.print("stopped early: --max-requests reached")
    if run_id:
        console.print(f"MLflow run {run_id}")
