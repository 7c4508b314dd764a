"""Streamed requests per second through the shadow engine, against the replay server in its own process.

Prints ONE JSON object:
- `engine_rps`: requests/s replayed by `run_shadow` (openai SDK, parsing, metrics, rows stored in SQLite);
- `raw_rps`: what the same server serves the same streamed requests to a minimal asyncio HTTP/1.1 client;
- `ratio`: engine_rps / raw_rps;
- `engine_cpu_ms_per_request` (the engine's own CPU per request, the overhead that limits it on 2 cores),
  `engine_cpu_share` (how much of a core it got) and `engine_wall_overhead_ms_per_request`
  (1000/engine_rps - 1000/raw_rps);
- `raw_client_cpu_ms_per_request` (the minimal client's CPU per request) and `cpu_ratio`
  (engine CPU / minimal client CPU for the same requests), with the server's CPU per request in both runs;
- `ttft_bias_ms`: median measured TTFT minus the injected TTFT (50 ms), at low concurrency;
- the machine's load average before and after, since the box is shared.

Usage: python bench/shadow_throughput.py [--requests 3000] [--concurrency 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

import orjson
from sqlalchemy import select

from shadowjudge.config import Price, ShadowConfig, TargetConfig
from shadowjudge.shadow.engine import build_request_body, run_shadow
from shadowjudge.shadow.eventloop import loop_factory
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import (
    ShadowResult,
    ShadowRun,
    TrafficSample,
    get_engine,
    session_scope,
    upgrade_database,
)
from shadowjudge.store.models import utcnow

DEMO = ROOT / "shadowjudge" / "demo_data"
MODEL = "claude-instant-1.2"


def store_samples(engine, n: int) -> list[TrafficSample]:
    """n samples cycling over the demo log's real requests (distinct request ids)."""
    with gzip.open(DEMO / "requests.jsonl.gz", "rt") as fh:
        requests = [json.loads(line) for line in fh]
    with session_scope(engine) as s:
        for i in range(n):
            r = requests[i % len(requests)]
            s.add(TrafficSample(request_id=f"{r['id']}-{i}", source="bench", source_position=str(i), route="bench",
                                incumbent_model=MODEL, messages=r["request"]["messages"], params={},
                                request_ts=utcnow()))
    with session_scope(engine) as s:
        samples = list(s.scalars(select(TrafficSample).order_by(TrafficSample.id)))
        s.expunge_all()
    return samples


def new_run(engine, key: str) -> int:
    with session_scope(engine) as s:
        run = ShadowRun(run_key=key, route="bench", config_hash="bench")
        s.add(run)
        s.flush()
        return run.id


async def raw_client(port: int, bodies: list[bytes], concurrency: int) -> float:
    """Requests/s of keep-alive connections that write a request and read its chunked SSE body to the end."""
    queue = list(reversed(bodies))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            body = queue.pop()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            buf = b""
            while not buf.endswith(b"\r\n0\r\n\r\n"):  # the chunked-encoding terminator ends the response
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError("server closed the connection")
                buf += data
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return len(bodies) / (time.perf_counter() - start)


def child_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens streamed per answer (one SSE chunk each)")
    args = parser.parse_args()
    for name in ("requests", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="shadow-bench-") as tmp:
        url = f"sqlite:///{tmp}/store.db"
        upgrade_database(url)
        engine = get_engine(url)
        samples = store_samples(engine, args.requests)
        shadow = ShadowConfig(max_tokens=args.max_tokens, timeout_s=30, max_retries=0)
        pricing = {MODEL: Price(input_per_mtok=0.8, output_per_mtok=2.4)}
        bodies = [orjson.dumps(build_request_body(s.messages, s.params, MODEL, shadow)) for s in samples]

        with ReplayServer(DEMO / "recordings.jsonl.gz", models=[MODEL]) as srv:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(raw_client(srv.port, bodies[:200], args.concurrency))  # warm-up
                raw_cpu, raw_server_cpu = time.process_time(), child_cpu_s(srv.pid)
                raw_rps = runner.run(raw_client(srv.port, bodies, args.concurrency))
                raw_cpu, raw_server_cpu = time.process_time() - raw_cpu, child_cpu_s(srv.pid) - raw_server_cpu

            target = TargetConfig(name="bench", model=MODEL, base_url=srv.base_url, concurrency=args.concurrency)
            run_shadow(engine, new_run(engine, "warmup"), samples[:200], [target], shadow, pricing)
            run_id = new_run(engine, "bench")
            server_cpu = child_cpu_s(srv.pid)
            cpu, wall = time.process_time(), time.perf_counter()
            report = run_shadow(engine, run_id, samples, [target], shadow, pricing)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            server_cpu = child_cpu_s(srv.pid) - server_cpu
            with session_scope(engine) as s:
                stored = s.query(ShadowResult).filter(ShadowResult.run_id == run_id).count()

        profile = {"models": {MODEL: {"ttft_ms": 50}}}
        with ReplayServer(DEMO / "recordings.jsonl.gz", profile, models=[MODEL]) as srv:
            target = TargetConfig(name="ttft", model=MODEL, base_url=srv.base_url, concurrency=2)
            ttft_run = new_run(engine, "ttft")
            run_shadow(engine, ttft_run, samples[:60], [target], shadow, pricing)
            with session_scope(engine) as s:
                ttfts = list(s.scalars(select(ShadowResult.ttft_ms).where(ShadowResult.run_id == ttft_run)))

    n = args.requests
    engine_rps = n / wall
    result = {
        "benchmark": "shadow_throughput",
        "requests": n,
        "concurrency": args.concurrency,
        "tokens_per_answer": args.max_tokens,
        "engine_rps": round(engine_rps, 1),
        "raw_rps": round(raw_rps, 1),
        "ratio": round(engine_rps / raw_rps, 3),
        "engine_cpu_ms_per_request": round(cpu * 1000 / n, 3),
        # the share of one core the engine process got: below ~0.9 it waited for CPU, not for the server
        "engine_cpu_share": round(cpu / wall, 2),
        # what its CPU cost per request allows with a whole core (derived, not measured)
        "engine_rps_if_one_core": round(n / cpu, 1),
        "engine_wall_overhead_ms_per_request": round(1000 / engine_rps - 1000 / raw_rps, 3),
        "server_cpu_ms_per_request": round(server_cpu * 1000 / n, 3),
        # the same two numbers for the minimal client: what any client must spend per request on this box
        "raw_client_cpu_ms_per_request": round(raw_cpu * 1000 / n, 3),
        "raw_server_cpu_ms_per_request": round(raw_server_cpu * 1000 / n, 3),
        "cpu_ratio": round(cpu / raw_cpu, 2) if raw_cpu > 0 else None,
        "ok": report.targets["bench"].ok,
        "stored_rows": stored,
        "latency_ms_p50": round(report.targets["bench"].latency_ms["p50"], 2),
        "latency_ms_p99": round(report.targets["bench"].latency_ms["p99"], 2),
        "ttft_bias_ms": round(statistics.median(ttfts) - 50, 2),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
