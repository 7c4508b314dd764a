"""Concurrency ramp of the load test against the replay server (own process, zero injected latency).

Prints ONE JSON object: per step the concurrency, achieved streamed req/s (the load test's achieved_rps:
successes over the whole step), p50/p99 latency (null for a step without a success) and error rate, plus the
peak and the knee (the first step whose throughput gains less than 10% over the previous one).
Measured through the load test's own client (the openai SDK), so it shows what one Python client process
gets out of the server, not the server's ceiling (bench/shadow_throughput.py reports that as raw_rps).

Usage: python bench/loadtest_replay_server.py [--ramp 4:8:3:36] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

from shadowjudge.config import ShadowConfig, TargetConfig  # noqa: E402
from shadowjudge.shadow.loadtest import Ramp, prompts_from_jsonl, run_loadtest  # noqa: E402
from shadowjudge.shadow.replay_server import ReplayServer  # noqa: E402

DEMO = ROOT / "shadowjudge" / "demo_data"
MODEL = "claude-instant-1.2"


def _round_ms(value: float | None) -> float | None:
    """None stays None: a step without a single success has no latency percentiles."""
    return None if value is None else round(value, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ramp", default="4:8:3:36", help="start:step:hold_s:max")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    prompts = prompts_from_jsonl(DEMO / "requests.jsonl.gz")
    shadow = ShadowConfig(max_retries=0, timeout_s=30, max_tokens=args.max_tokens)
    with ReplayServer(DEMO / "recordings.jsonl.gz", models=[MODEL]) as srv:
        target = TargetConfig(name="loadtest", model=MODEL, base_url=srv.base_url)
        report = run_loadtest(target, prompts, ramp=Ramp.parse(args.ramp), max_requests=200_000, shadow=shadow)
    steps = [{"concurrency": s.concurrency, "rps": round(s.achieved_rps, 1), "error_rate": round(s.error_rate, 4),
              "latency_p50_ms": _round_ms(s.latency_ms["p50"]), "latency_p99_ms": _round_ms(s.latency_ms["p99"])}
             for s in report.steps]
    knee = next((b["concurrency"] for a, b in zip(steps, steps[1:]) if b["rps"] < a["rps"] * 1.1), None)
    print(json.dumps({"benchmark": "loadtest_replay_server", "tokens_per_answer": args.max_tokens,
                      "peak_rps": max(s["rps"] for s in steps), "knee_concurrency": knee, "steps": steps,
                      "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
