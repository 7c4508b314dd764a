"""Run every benchmark in bench/ with one command and write one JSON report, to compare figures across versions.

Each bench/*.py (except this file) runs as its own subprocess, one after another (they measure throughput, so
never two at once), with the arguments of a default run, or with its smallest sizes under --quick (the soak for
1 minute). A benchmark that needs something missing is skipped with the reason: the AlpacaEval data directory
(drift, judge_quality), a trained judge in the MLflow registry (judge_quality, judge_speed); PostgreSQL figures
of store_queries need SHADOWJUDGE_TEST_PG_URL (or --pg-url). A bench script this file does not know yet runs with
no arguments.

The report holds the machine (CPU count and model, memory, load average before and after, Python, platform, git
commit and whether the tree had changes) and, per benchmark: the command, exit status, seconds, its JSON result
(or the tail of its output when it printed none) and the tail of its stderr when it failed.

    python bench/run_all.py [--quick] [--out bench-report-<timestamp>.json] [--only NAME ...] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpacaeval"
JUDGE_NAME = "shadowjudge-judge"

# name -> (default run arguments, --quick arguments)
PLANS: dict[str, tuple[list[str], list[str]]] = {
    "ingest": ([], ["--records", "4000", "--memory-records", "1000"]),
    "shadow_throughput": ([], ["--requests", "300", "--concurrency", "16"]),
    "loadtest_replay_server": ([], ["--ramp", "4:8:1:12"]),
    "drift": ([], ["--trials", "20", "--repeats", "1"]),
    "judge_quality": ([], ["--prompts", "100"]),
    "judge_speed": ([], ["--pairs", "32"]),
    "store_queries": ([], ["--samples", "20000", "--repeats", "5"]),
    "soak": ([], ["--minutes", "1"]),
}
NEEDS_DATA = {"drift", "judge_quality"}
NEEDS_JUDGE = {"judge_quality", "judge_speed"}


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict[str, Any]:
    cpu_model = None
    mem_total_mib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_mib = int(line.split()[1]) // 1024
    except OSError:
        pass
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model or platform.processor() or None,
            "mem_total_mib": mem_total_mib, "load_avg": os.getloadavg(), "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status), "hostname": platform.node()}


def judge_available(tracking_uri: str | None, model_uri: str | None) -> str | None:
    """None when the registry at the tracking URI has the judge's champion; else why not (checked in a subprocess:
    importing MLflow here would weigh on the benchmarks that follow)."""
    if model_uri:
        return None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///.shadowjudge/mlflow.db"
    if uri.startswith("sqlite:///") and not (ROOT / uri.removeprefix("sqlite:///")).exists():
        return f"no trained judge: the MLflow store {uri} does not exist (train one with `shadowjudge judge train` " \
               "or pass --judge-model-uri)"
    probe = ("import sys; from mlflow.tracking import MlflowClient\n"
             "from evaluators.judge_cli import tracking_uri_default\n"
             f"client = MlflowClient(tracking_uri_default({tracking_uri!r}))\n"
             f"client.get_model_version_by_alias({JUDGE_NAME!r}, 'champion')\n")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    try:
        out = subprocess.run([sys.executable, "-c", probe], check=False, cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return "checking the MLflow registry for the judge timed out"
    if out.returncode == 0:
        return None
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    return f"no trained judge '{JUDGE_NAME}@champion' in the MLflow registry ({last[:200]}); train one with " \
           "`shadowjudge judge train` or pass --judge-model-uri"


def plan(name: str, args: argparse.Namespace, judge_missing: str | None) -> tuple[list[str] | None, str | None]:
    """The arguments for one benchmark, or None and the reason it is skipped."""
    default, quick = PLANS.get(name, ([], []))
    argv = list(quick if args.quick else default)
    if name in NEEDS_DATA:
        if not args.data.is_dir():
            return None, f"AlpacaEval data directory {args.data} is missing (--data)"
        argv += ["--data", str(args.data)]
    if name in NEEDS_JUDGE:
        if judge_missing:
            return None, judge_missing
        if args.judge_model_uri:
            argv += ["--model-uri", args.judge_model_uri]
        if args.tracking_uri:
            argv += ["--tracking-uri", args.tracking_uri]
    if name == "judge_quality":
        argv.append("--no-progress")
    if name == "store_queries" and args.pg_url:
        argv += ["--pg-url", args.pg_url]
    return argv, None


def tail(text: str, chars: int = 2000) -> str:
    return text[-chars:] if len(text) > chars else text


def run_one(name: str, argv: list[str], timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, str(BENCH / f"{name}.py"), *argv]
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        out = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {"status": "timeout", "exit_code": None, "seconds": round(time.monotonic() - started, 1),
                "command": command[1:], "stderr_tail": tail((exc.stderr or b"").decode(errors="replace")
                                                            if isinstance(exc.stderr, bytes) else exc.stderr or "")}
    seconds = round(time.monotonic() - started, 1)
    entry: dict[str, Any] = {"status": "ok" if out.returncode == 0 else "failed", "exit_code": out.returncode,
                             "seconds": seconds, "command": command[1:], "load_avg_before": load_before,
                             "load_avg_after": os.getloadavg()}
    try:
        entry["result"] = json.loads(out.stdout)
    except json.JSONDecodeError:
        entry["result"] = None
        entry["stdout_tail"] = tail(out.stdout)
        if out.returncode == 0:
            entry["status"] = "no_json"
    if out.returncode != 0:
        entry["stderr_tail"] = tail(out.stderr)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes; the soak runs 1 minute")
    parser.add_argument("--out", type=Path, default=None, help="report path (default bench-report-<timestamp>.json)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help="run only this benchmark "
                        "(repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave this benchmark out")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark (the soak gets its "
                        "minutes on top)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AlpacaEval-format data directory")
    parser.add_argument("--judge-model-uri", default=None, help="the judge for judge_quality and judge_speed")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI holding the judge's registry")
    parser.add_argument("--pg-url", default=None, help="PostgreSQL server for store_queries (default: "
                        "$SHADOWJUDGE_TEST_PG_URL)")
    args = parser.parse_args()

    found = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ("run_all", "__init__"))
    unknown = sorted(set(args.only or []) - set(found)) + sorted(set(args.skip) - set(found))
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; there are: {', '.join(found)}")
    names = [n for n in found if (not args.only or n in args.only) and n not in args.skip]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or ROOT / f"bench-report-{stamp}.json"

    report: dict[str, Any] = {"report": "shadowjudge-bench", "started_at": stamp, "quick": args.quick,
                              "machine": machine(), "benchmarks": {}}
    judge_missing = judge_available(args.tracking_uri, args.judge_model_uri) if NEEDS_JUDGE & set(names) else None
    for name in names:
        argv, skipped = plan(name, args, judge_missing)
        if argv is None:
            report["benchmarks"][name] = {"status": "skipped", "reason": skipped}
            print(f"{name}: skipped ({skipped})", file=sys.stderr)
            continue
        timeout = args.timeout
        if name == "soak":
            timeout += 60 * float(argv[argv.index("--minutes") + 1] if "--minutes" in argv else 30)
        print(f"{name}: running {' '.join(argv) or '(defaults)'}", file=sys.stderr, flush=True)
        entry = run_one(name, argv, timeout)
        report["benchmarks"][name] = entry
        print(f"{name}: {entry['status']} in {entry['seconds']} s", file=sys.stderr, flush=True)
    report["machine"]["load_avg_after"] = os.getloadavg()
    report["finished_at"] = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    counts: dict[str, int] = {}
    for entry in report["benchmarks"].values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    report["summary"] = counts
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"report": str(out_path), "summary": counts}))
    return 0 if all(e["status"] in ("ok", "skipped") for e in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
