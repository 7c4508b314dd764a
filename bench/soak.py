"""Soak: back-to-back evaluation cycles for --minutes, with new gateway traffic arriving between cycles.

One process runs the real Prefect flow (`flows.cycle.evaluation_cycle`, Prefect's in-process ephemeral mode with
its own PREFECT_HOME) over and over against the replay server (its own process), as `shadowjudge run` on a schedule
would: before each cycle --new-records records (real AlpacaEval instructions from shadowjudge/demo_data, fresh ids
and timestamps) are appended to a JSONL gateway log, and the cycle ingests them, shadow-tests up to --max-samples
against the incumbent and both candidates, scores them with the model-free `lexical` judge (no training needed),
analyses, logs to a local MLflow store, alerts and steps the route's weights. Store: SQLite by default, or a
dedicated PostgreSQL database (`shadowjudge_soak`, created and dropped) with --pg-url.

Drift windows are set to --drift-window-min minutes (current) and twice that (reference), so they fill within the
first part of the run, as a production week's windows stay full: with the demo's hours-long windows every soak cycle
would read more rows than the one before, and the soak would measure a growing workload instead of a steady one.

After every cycle it samples this process's resident memory (psutil when installed, else /proc/self/status VmRSS)
and, separately, that of its child processes (the replay server, any Prefect subprocess).

Memory is STEADY when both hold over the run's second half (the first half is warm-up: imports, caches, the
SQLAlchemy statement cache, MLflow's and Prefect's clients):
  - the least-squares slope of this process's RSS against time over the second half of cycles is at most
    --max-slope MiB per hour (default 10: under 240 MiB a day, small beside a process of a few hundred MiB), and
  - the largest RSS of the second half is at most 10% above the largest of the first half.
A short run (a few minutes) turns any noise into a large per-hour slope, so only a run of 30 minutes or more says
much; with fewer than 4 cycles `steady` is null (not enough points). Cycles that raise are counted as errors (first messages kept) and the soak goes on.

Prints ONE JSON object: cycles, errors, RSS first/last/max, slope, steady, cycle seconds, store growth, load avg;
with --trace-top N also the N allocation sites (tracebacks) whose live Python memory grew most from the end of the
third cycle to the end (tracemalloc, on from the second cycle; it slows the cycles down). `final_gc_collect_mib` is
the RSS just before and after one gc.collect() at the end; --collect runs the collector after every cycle, which
separates memory held by uncollected reference cycles (e.g. matplotlib figures) from memory still referenced.

    python bench/soak.py [--minutes 30] [--pg-url URL] [--new-records 40] [--max-samples 40] [--trace-top N]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

MIB = 1024 * 1024
PG_DB = "shadowjudge_soak"
FAST_PROFILE = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of one process; 0 when it is gone."""
    try:
        import psutil

        return psutil.Process(os.getpid() if pid == "self" else int(pid)).memory_info().rss
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process ended between listing and reading
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (Linux); empty elsewhere."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def templates() -> list[dict[str, Any]]:
    with gzip.open(ROOT / "shadowjudge" / "demo_data" / "requests.jsonl.gz", "rt") as fh:
        return [json.loads(line) for line in fh]


def append_traffic(log: Path, records: list[dict[str, Any]], cycle: int, count: int) -> None:
    """`count` new gateway records, each a demo record with a fresh id and the current time."""
    now = datetime.now(UTC).isoformat()
    with log.open("a") as fh:
        for j in range(count):
            rec = dict(records[(cycle * count + j) % len(records)])
            rec["id"] = f"soak-{cycle:06d}-{j:04d}-{uuid.uuid4().hex[:6]}"
            rec["timestamp"] = now
            fh.write(json.dumps(rec) + "\n")


def slope_per_hour(times_s: list[float], values_mib: list[float]) -> float | None:
    """Least-squares slope in MiB per hour; None with fewer than 3 points."""
    if len(times_s) < 3:
        return None
    mt, mv = statistics.fmean(times_s), statistics.fmean(values_mib)
    var = sum((t - mt) ** 2 for t in times_s)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in zip(times_s, values_mib, strict=True)) / var * 3600


@contextlib.contextmanager
def store_url(workdir: Path, pg_url: str | None) -> Iterator[str]:
    if not pg_url:
        yield f"sqlite:///{workdir / 'shadowjudge.db'}"
        return
    from tests.pg_databases import pg_database

    with pg_database(pg_url, PG_DB) as url:
        yield url


def soak(workdir: Path, url: str, minutes: float, new_records: int, max_samples: int, max_slope: float,
         max_cycles: int | None, trace_top: int = 0, collect: bool = False,
         drift_window_min: float = 3.0) -> dict[str, Any]:
    import yaml

    from flows.cycle import evaluation_cycle  # here: main() sets PREFECT_HOME first
    from shadowjudge.cycle import count_rows
    from shadowjudge.demo import DEMO_DATA, demo_config
    from shadowjudge.shadow.replay_server import ReplayServer
    from shadowjudge.store import get_engine, upgrade_database

    log = workdir / "gateway.jsonl"
    log.touch()
    records = templates()
    samples: list[dict[str, float]] = []
    errors: list[str] = []
    error_count = 0
    durations: list[float] = []
    decisions: dict[str, int] = {}
    baseline: tracemalloc.Snapshot | None = None
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST_PROFILE) as server:
        cfg = demo_config(workdir, server.base_url)
        cfg["store"]["url"] = url
        cfg["sources"] = [{"name": "gateway-logs", "kind": "jsonl", "path": str(log)}]
        cfg["judge"] = {"evaluator": "lexical"}
        cfg["shadow"]["max_samples"] = max_samples
        cfg["drift"].update(current_window_h=drift_window_min / 60, reference_window_h=2 * drift_window_min / 60)
        config_path = workdir / "shadowjudge.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        upgrade_database(url)

        started = time.monotonic()
        deadline = started + minutes * 60
        cycle = 0
        while time.monotonic() < deadline and (max_cycles is None or cycle < max_cycles):
            append_traffic(log, records, cycle, new_records)
            t0 = time.monotonic()
            try:
                result = evaluation_cycle(config_path=str(config_path), cycle_id=f"soak-{cycle:05d}")
                for outcome in result["routes"].values():
                    decisions[str(outcome.get("decision"))] = decisions.get(str(outcome.get("decision")), 0) + 1
            except Exception as exc:  # noqa: BLE001 - a failed cycle is a finding, not the end of the soak
                error_count += 1
                if len(errors) < 5:
                    errors.append(f"cycle {cycle}: {type(exc).__name__}: {str(exc)[:300]}")
            durations.append(time.monotonic() - t0)
            if collect:
                gc.collect()
            if trace_top and cycle == 1:  # after two warm-up cycles: imports and first-use caches are in
                tracemalloc.start(12)
            elif trace_top and cycle == 2:
                baseline = tracemalloc.take_snapshot()
            children = descendants(os.getpid())
            samples.append({"t_s": time.monotonic() - started, "rss_mib": rss_bytes() / MIB,
                            "children_rss_mib": sum(rss_bytes(p) for p in children) / MIB,
                            "children": len(children)})
            cycle += 1
        elapsed = time.monotonic() - started
        growth = allocation_growth(baseline, tracemalloc.take_snapshot(), trace_top) if baseline else None
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        rss_before_gc = rss_bytes() / MIB
        gc.collect()
        rss_after_gc = rss_bytes() / MIB
        rows = count_rows(get_engine(url))
    db_file = workdir / "shadowjudge.db"
    return summarise(samples, durations, errors, error_count, decisions, elapsed, max_slope) | {
        "rows_at_end": rows, "log_records": new_records * cycle, "allocation_growth": growth,
        "gc_each_cycle": collect,
        "final_gc_collect_mib": {"rss_before": round(rss_before_gc, 1), "rss_after": round(rss_after_gc, 1)},
        "store_mb": round(db_file.stat().st_size / MIB, 1) if db_file.exists() else None,
        "mlflow_db_mb": round((workdir / "mlflow.db").stat().st_size / MIB, 1)
        if (workdir / "mlflow.db").exists() else None}


def allocation_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int) -> list[dict[str, Any]]:
    """Where Python-visible memory grew between the third cycle and the end: the largest sites by traceback."""
    skip = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    stats = after.filter_traces(skip).compare_to(before.filter_traces(skip), "traceback")
    return [{"size_diff_kib": round(st.size_diff / 1024, 1), "count_diff": st.count_diff,
             "traceback": [f"{f.filename.replace(str(ROOT) + '/', '')}:{f.lineno}" for f in st.traceback][-8:]}
            for st in stats[:top]]


def summarise(samples: list[dict[str, float]], durations: list[float], errors: list[str], error_count: int,
              decisions: dict[str, int], elapsed: float, max_slope: float) -> dict[str, Any]:
    rss = [s["rss_mib"] for s in samples]
    half = len(samples) // 2
    first, second = samples[:half], samples[half:]
    slope = slope_per_hour([s["t_s"] for s in second], [s["rss_mib"] for s in second])
    # Per cycle as well: on a loaded machine cycles are slower, which flatters a per-hour slope.
    per_cycle = slope_per_hour([float(i) for i in range(half, len(samples))], [s["rss_mib"] for s in second])
    child_slope = slope_per_hour([s["t_s"] for s in second], [s["children_rss_mib"] for s in second])
    max_first = max((s["rss_mib"] for s in first), default=0.0)
    max_second = max((s["rss_mib"] for s in second), default=0.0)
    steady = None if slope is None or len(first) < 2 else slope <= max_slope and max_second <= 1.10 * max_first
    every = max(1, len(samples) // 40)
    return {
        "cycles": len(samples), "errors": error_count, "first_errors": errors, "decisions": decisions,
        "elapsed_s": round(elapsed, 1),
        "cycle_s": {"first": round(durations[0], 2) if durations else None,
                    "median": round(statistics.median(durations), 2) if durations else None,
                    "last": round(durations[-1], 2) if durations else None,
                    "max": round(max(durations), 2) if durations else None,
                    "median_first_half": round(statistics.median(durations[:half]), 2) if half else None,
                    "median_second_half": round(statistics.median(durations[half:]), 2) if durations else None},
        "rss_mib": {"first": round(rss[0], 1) if rss else None, "last": round(rss[-1], 1) if rss else None,
                    "max": round(max(rss), 1) if rss else None, "max_first_half": round(max_first, 1),
                    "max_second_half": round(max_second, 1)},
        "slope_mib_per_h_second_half": None if slope is None else round(slope, 2),
        "slope_mib_per_100_cycles_second_half": None if per_cycle is None else round(per_cycle / 36, 2),
        "children_rss_mib": {"first": round(samples[0]["children_rss_mib"], 1) if samples else None,
                             "last": round(samples[-1]["children_rss_mib"], 1) if samples else None,
                             "slope_mib_per_h_second_half": None if child_slope is None else round(child_slope, 2)},
        "steady": steady,
        "steady_criterion": f"second-half RSS slope <= {max_slope} MiB/h and second-half max <= 1.1 x first-half max",
        "rss_series": [[round(s["t_s"], 1), round(s["rss_mib"], 1)] for s in samples[::every]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--max-cycles", type=int, default=None, help="stop after this many cycles too")
    parser.add_argument("--new-records", type=int, default=40, help="gateway records appended before each cycle")
    parser.add_argument("--max-samples", type=int, default=40, help="samples shadow-tested per cycle")
    parser.add_argument("--max-slope", type=float, default=10.0, help="MiB per hour still called steady")
    parser.add_argument("--drift-window-min", type=float, default=3.0,
                        help="current drift window in minutes (the reference window is twice as long)")
    parser.add_argument("--pg-url", default=None, help="run on PostgreSQL (a database on this server is created and "
                        "dropped); default: SQLite")
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    parser.add_argument("--collect", action="store_true", help="run the cyclic garbage collector after every cycle "
                        "(tells memory held by reference cycles from memory still referenced)")
    parser.add_argument("--trace-top", type=int, default=0, help="trace allocations from the second cycle on "
                        "(slower) and report the N sites that grew most after the third")
    args = parser.parse_args()
    if args.minutes <= 0 or args.new_records < 1 or args.max_samples < 1:
        parser.error("--minutes, --new-records and --max-samples must be positive")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sj-soak-") as tmp:
        workdir = (args.keep or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
        with store_url(workdir, args.pg_url) as url, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
            result = soak(workdir, url, args.minutes, args.new_records, args.max_samples, args.max_slope,
                          args.max_cycles, args.trace_top, args.collect, args.drift_window_min)
    report = {"benchmark": "soak", "backend": "postgresql" if args.pg_url else "sqlite", "minutes": args.minutes,
              "new_records_per_cycle": args.new_records, "max_samples": args.max_samples,
              "drift_window_min": args.drift_window_min,
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "cpus": os.cpu_count(),
              "rss_source": "psutil" if _has_psutil() else "/proc/self/status", **result}
    print(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 else 1


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
