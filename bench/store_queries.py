"""Store read paths at scale: `shadowjudge status`, `routes history` and `alerts list` over 1,000,000 samples.

Fills a fresh store per backend (a SQLite file in a temp dir; PostgreSQL in a dedicated database `shadowjudge_bench`
created and dropped on the server at --pg-url, default $SHADOWJUDGE_TEST_PG_URL) through the Alembic migrations,
with --samples traffic samples (real AlpacaEval instructions and answers from shadowjudge/demo_data, CC BY-NC 4.0,
spread over 8 routes and 60 days) and, in proportion, what the cycles that sampled them would have left: one shadow
run per 500 samples with 50 samples x 3 targets of results and 50 x 2 candidates of judgments, weight changes,
alerts (mostly resolved) and quarantined records. Rows go in as batched executemany through SQLAlchemy Core
(SQLite) or COPY (PostgreSQL).

Then it times the real functions behind the commands (median and p95 of --repeats calls, warm cache):
  status             shadowjudge.cli.status, the whole command with its tables rendered to a string
  status_row_counts  shadowjudge.cli.status_row_counts, the row counts `status` prints (PostgreSQL: the planner's
                     estimate for tables of 100,000 rows or more)
  count_rows_exact   shadowjudge.cycle.count_rows, exact count(*) per table (what status printed before; tests use it)
  routes_history     shadowjudge.routing.step.route_history, what `routes history` prints (limit 50)
  weight_history     shadowjudge.cycle.weight_history, the applied weights over time (MLflow's plot)
  alerts_list        shadowjudge.alerts.records.list_alerts, `alerts list` (unresolved, and --status all)
  ingest_daily_budget  shadowjudge.traffic.sampling.DailyBudget.day, the per-day sample count ingestion reads
                     (not a command; reported, not held to the budget)
  drift_window_ids   shadowjudge.analysis.drift_data.window_sample_ids over the hot route's last 7 days, the ids a
                     drift check's input window reads (not a command; reported, not held)
  drift_window_incumbent  the same window keeping only the samples the incumbent served (`incumbent_of`), what the
                     incumbent's output-drift window reads: the logged model comes from the table, not the index
and captures every SQL statement each one sends (a cursor hook), then EXPLAINs those exact statements with their
parameters (SQLite `EXPLAIN QUERY PLAN`, PostgreSQL `EXPLAIN`, after ANALYZE). A plan step counts as a full scan
when it reads a whole table of more than --scan-rows rows without an index (SQLite `SCAN t` with no index; PG
`Seq Scan`); a full scan of an index (`SCAN t USING COVERING INDEX`, `Index Only Scan` with no condition) is
reported as `index_scan_full`, still linear in the table; a scan of a table at or below --scan-rows is
`small_table_scan`. Budget: every median under 200 ms (count_rows_exact is reported, not held to it).

On a shared machine read `client_cpu_median_ms` beside the wall-clock figures: a loaded CPU stretches the latter.
Prints ONE JSON object; exits 1 when a held command is over budget or fully scans a large table. Usage:
    python bench/store_queries.py [--samples 1000000] [--repeats 20] [--pg-url URL | --no-pg] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

import orjson
import yaml
from sqlalchemy import (
    Engine,
    String,
    bindparam,
    event,
    text,
    type_coerce,
)

from shadowjudge.demo import DEMO_DATA, demo_config
from shadowjudge.store import (
    Alert,
    Judgment,
    QuarantinedRecord,
    RouteState,
    RouteWeightChange,
    ShadowResult,
    ShadowRun,
    TrafficSample,
    dispose_engines,
    get_engine,
    upgrade_database,
)
from tests.pg_databases import pg_database

BUDGET_MS = 200.0
ROUTES = ["chat-default", "support-bot", "code-assist", "summarise", "search-answers", "translate", "sql-helper",
          "onboarding"]
FILL_END = datetime(2026, 11, 22, tzinfo=UTC)  # the newest request's time
HOT_ROUTE = "chat-default"  # the route the timed history commands ask for: it has the most rows
TARGETS = ["incumbent", "cand-a", "cand-b"]
EVALUATOR = "small-judge:v7"
BATCH = 5000
PG_DB = "shadowjudge_bench"
# Measured for comparison, not commands an operator waits on:
NOT_HELD = {"count_rows_exact", "ingest_daily_budget", "drift_window_ids", "drift_window_incumbent"}


def demo_texts(limit: int = 800) -> list[tuple[str, str]]:
    """(instruction, answer) pairs from the demo recordings, cut to the lengths stored samples usually have."""
    pairs = []
    with gzip.open(DEMO_DATA / "requests.jsonl.gz", "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            prompt = rec["request"]["messages"][-1]["content"][:600]
            answer = rec["response"]["choices"][0]["message"]["content"][:700]
            pairs.append((prompt, answer))
            if len(pairs) >= limit:
                break
    return pairs


def json_insert(model: type, json_columns: tuple[str, ...]):  # -> an executemany-able INSERT
    """JSON columns bound as orjson text, as the ingest hot path does (both backends store it as is)."""
    table = model.__table__  # type: ignore[attr-defined]
    return table.insert().values({c: type_coerce(bindparam(c), String) for c in json_columns})


def encode(rows: list[dict[str, Any]], json_columns: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{**row, **{c: orjson.dumps(row[c]).decode() for c in json_columns}} for row in rows]


def bulk_insert(conn: Any, model: type, rows: list[dict[str, Any]], json_columns: tuple[str, ...] = ()) -> None:
    """PostgreSQL: COPY FROM STDIN in CSV (an order of magnitude faster than INSERTs); SQLite: one executemany."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(json_insert(model, json_columns) if json_columns else model.__table__.insert(),  # type: ignore[attr-defined]
                     encode(rows, json_columns) if json_columns else rows)
        return
    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.writer(buf)
    for row in encode(rows, json_columns):
        writer.writerow(["" if row[c] is None else row[c].isoformat() if isinstance(row[c], datetime)
                         else ("t" if row[c] else "f") if isinstance(row[c], bool) else row[c] for c in columns])
    buf.seek(0)
    cursor = conn.connection.dbapi_connection.cursor()
    cursor.copy_expert(f'COPY {model.__tablename__} ({", ".join(chr(34) + c + chr(34) for c in columns)}) '  # type: ignore[attr-defined]
                       "FROM STDIN WITH (FORMAT csv)", buf)
    cursor.close()


def fill(engine: Engine, samples: int, seed: int = 0) -> dict[str, Any]:
    """Insert `samples` traffic samples and the rows the cycles over them would have written; returns counts and
    seconds per table."""
    rng = random.Random(seed)
    texts = demo_texts()
    end = FILL_END
    start = end - timedelta(days=60)
    span_s = (end - start).total_seconds()
    weights_by_route = [6 if r == HOT_ROUTE else 1 for r in ROUTES]
    timings: dict[str, float] = {}

    sample_cols = ("messages", "params", "meta", "redactions")
    t0 = time.perf_counter()
    with engine.begin() as conn:
        for first in range(0, samples, BATCH):
            rows = []
            for i in range(first, min(first + BATCH, samples)):
                prompt, answer = texts[i % len(texts)]
                ts = start + timedelta(seconds=span_s * i / samples)
                route = rng.choices(ROUTES, weights_by_route)[0]
                task = ("writing", "qa", "coding", "math", "chitchat")[i % 5]
                rows.append({
                    "request_id": f"req-{i:09d}", "source": "gateway-logs", "source_position": f"logs/{i // 100000}"
                    f".jsonl:{i % 100000}", "route": route, "incumbent_model": "claude-instant-1.2",
                    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                 {"role": "user", "content": prompt}],
                    "params": {"temperature": 0.7, "max_tokens": 1024},
                    "response_text": answer, "input_tokens": 20 + len(prompt) // 4, "output_tokens": len(answer) // 4,
                    "latency_ms": rng.uniform(300, 4000), "ttft_ms": rng.uniform(80, 600),
                    "cost_usd": rng.uniform(1e-5, 3e-3), "cache_hit": i % 17 == 0,
                    "meta": {"task": task, "user_tier": ("free", "pro")[i % 2], "region": ("eu", "us")[i % 3 == 0]},
                    "stratum": f"task={task}", "redactions": {"email": 1} if i % 25 == 0 else {},
                    "request_ts": ts, "ingested_at": ts + timedelta(minutes=5),
                })
            bulk_insert(conn, TrafficSample, rows, sample_cols)
    timings["traffic_samples"] = time.perf_counter() - t0

    runs = max(samples // 500, 8)
    per_run = min(50, samples)
    run_rows, result_rows, judgment_rows = [], [], []
    for r in range(runs):
        route = ROUTES[r % len(ROUTES)] if r % 3 else HOT_ROUTE
        started = start + timedelta(seconds=span_s * r / runs)
        first = rng.randrange(0, max(samples - per_run, 1))
        ids = list(range(first + 1, first + per_run + 1))
        run_rows.append({
            "id": r + 1, "run_key": f"{route}:cycle-{r:06d}", "route": route, "kind": "cycle",
            "status": "failed" if r % 40 == 0 else "finished", "config_hash": f"{r % 7:064x}",
            "judge_version": EVALUATOR, "sample_ids": ids, "mlflow_run_id": f"{r:032x}",
            "decision": ("hold", "promote", "rollback")[r % 3],
            "summary": {"samples": per_run, "win_rate": {"cand-a": 0.55, "cand-b": 0.41}, "p99_ms": 2100.0},
            "started_at": started, "finished_at": started + timedelta(minutes=4),
        })
        for sid in ids:
            _, answer = texts[sid % len(texts)]
            for target in TARGETS:
                result_rows.append({
                    "run_id": r + 1, "sample_id": sid, "target": target, "model": f"{target}-model", "attempt": 0,
                    "output_text": answer[:400], "ttft_ms": rng.uniform(80, 600), "itl_ms": rng.uniform(5, 40),
                    "tpot_ms": rng.uniform(5, 40), "latency_ms": rng.uniform(300, 4000), "input_tokens": 120,
                    "output_tokens": 100, "cost_usd": 1e-4, "error_class": None, "retries": 0, "created_at": started,
                })
            for target in TARGETS[1:]:
                judgment_rows.append({
                    "run_id": r + 1, "sample_id": sid, "target": target, "evaluator": EVALUATOR,
                    "candidate_score": rng.random(), "incumbent_score": rng.random(), "preference": rng.random(),
                    "details": {"features": "head+tail"}, "created_at": started,
                })
    t0 = time.perf_counter()
    with engine.begin() as conn:
        bulk_insert(conn, ShadowRun, run_rows, ("sample_ids", "summary"))
        for first in range(0, len(result_rows), BATCH):
            bulk_insert(conn, ShadowResult, result_rows[first:first + BATCH])
        for first in range(0, len(judgment_rows), BATCH):
            bulk_insert(conn, Judgment, judgment_rows[first:first + BATCH], ("details",))
    timings["runs_results_judgments"] = time.perf_counter() - t0

    changes, revisions = [], dict.fromkeys(ROUTES, 0)
    ladder = [0, 5, 25, 50, 100]
    for r, run in enumerate(run_rows):
        if r % 2:
            continue
        route = run["route"]
        revisions[route] += 1
        step = revisions[route] % len(ladder)
        before = {"incumbent": 100 - ladder[step - 1], "cand-a": ladder[step - 1]}
        after = {"incumbent": 100 - ladder[step], "cand-a": ladder[step]}
        changes.append({
            "route": route, "revision": revisions[route], "before": before, "after": after,
            "reason": "cand-a passed every criterion at this step", "status": "failed" if r % 50 == 0 else "applied",
            "decision": "promote", "error": None, "gateway": "truefoundry", "analysis_link": f"http://mlflow/{r}",
            "run_id": run["id"], "created_at": run["finished_at"],
        })
    alerts = []
    n_alerts = max(runs * 2, 20)
    for a in range(n_alerts):
        run = run_rows[a % runs]
        is_open = a >= n_alerts - 25
        fingerprint = f"{run['route']}:regression:win_rate:{a}"
        alerts.append({
            "fingerprint": fingerprint, "open_key": fingerprint if is_open else None,
            "status": "open" if is_open else "resolved", "severity": ("warning", "critical")[a % 2],
            "kind": "regression", "route": run["route"], "target": "cand-b", "metric": "win_rate",
            "slice": "task=coding", "effect_size": -0.08, "ci_low": -0.12, "ci_high": -0.03,
            "action": "rollback", "message": "cand-b loses to the incumbent on task=coding", "bundle": {"examples": []},
            "run_id": run["id"], "occurrences": 1, "delivered": {"webhook": "sent"},
            "created_at": run["finished_at"], "updated_at": run["finished_at"],
        })
    quarantined = [{"source": "gateway-logs", "position": f"logs/q.jsonl:{q}", "reason": "not JSON",
                    "created_at": start + timedelta(seconds=q)} for q in range(max(samples // 500, 10))]
    states = [{"route": route, "weights": {"incumbent": 75, "cand-a": 25}, "candidate": "cand-a", "step_index": 1,
               "phase": "rolling", "frozen": False, "revision": revisions[route], "serving": "incumbent",
               "samples_in_step": 120, "policy_state": {}, "last_outcome": {}, "updated_at": end} for route in ROUTES]
    t0 = time.perf_counter()
    with engine.begin() as conn:
        bulk_insert(conn, RouteWeightChange, changes, ("before", "after"))
        bulk_insert(conn, Alert, alerts, ("bundle", "delivered"))
        bulk_insert(conn, QuarantinedRecord, quarantined)
        bulk_insert(conn, RouteState, states, ("weights", "policy_state", "last_outcome"))
    timings["history_alerts_state"] = time.perf_counter() - t0
    if engine.dialect.name == "postgresql":  # explicit ids above: move the sequence past them
        with engine.begin() as conn:
            conn.execute(text("SELECT setval('shadow_runs_id_seq', (SELECT max(id) FROM shadow_runs))"))
    t0 = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"))
    timings["analyze"] = time.perf_counter() - t0
    return {"rows": {"traffic_samples": samples, "shadow_runs": runs, "shadow_results": len(result_rows),
                     "judgments": len(judgment_rows), "route_weight_history": len(changes), "alerts": n_alerts,
                     "open_alerts": 25, "quarantined_records": len(quarantined)},
            "fill_seconds": {k: round(v, 2) for k, v in timings.items()}}


@contextlib.contextmanager
def captured_sql(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every (statement, parameters) the engine sends while the block runs."""
    seen: list[tuple[str, Any]] = []

    def hook(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool) -> None:
        if not executemany:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def is_query(statement: str) -> bool:
    """SELECTs on the store's tables; not the inspector's catalogue look-ups (has_schema)."""
    s = statement.lstrip().upper()
    return s.startswith("SELECT") and "SQLITE_MASTER" not in s and "PG_CATALOG" not in s and "PRAGMA" not in s \
        and "INFORMATION_SCHEMA" not in s


def explain(engine: Engine, statement: str, parameters: Any, table_rows: dict[str, int],
            scan_rows: int) -> dict[str, Any]:
    """The plan of one statement and its verdict: `index`, `index_scan_full` (a whole index read) or `full_scan`."""
    big = {t for t, n in table_rows.items() if n > scan_rows}
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "sqlite":
            cur.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plan = [row[3] for row in cur.fetchall()]
            full = [p for p in plan if re.match(r"SCAN (\w+)$", p) and p.split()[1] in big]
            whole_index = [p for p in plan if re.match(r"SCAN (\w+) USING (COVERING )?INDEX", p)
                           and p.split()[1] in big]
        else:
            cur.execute("EXPLAIN " + statement, parameters)
            plan = [row[0] for row in cur.fetchall()]
            full = [p for p in plan if (m := re.search(r"Seq Scan on (\w+)", p)) and m.group(1) in big]
            whole_index = []
            for i, p in enumerate(plan):
                m = re.search(r"Index (Only )?Scan(?: Backward)? using \w+ on (\w+)", p)
                if m and m.group(2) in big:
                    detail = " ".join(plan[i + 1:i + 3])
                    if "Index Cond" not in detail and "Limit" not in " ".join(plan[:i]):
                        whole_index.append(p)
        cur.close()
    finally:
        raw.close()
    small = [p for p in plan if re.match(r"SCAN \w+", p.strip()) or "Seq Scan" in p] if not (full or whole_index) \
        else []
    verdict = "full_scan" if full else "index_scan_full" if whole_index else "small_table_scan" if small else "index"
    return {"sql": " ".join(statement.split())[:240], "plan": [p.strip() for p in plan], "verdict": verdict}


def time_calls(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Wall-clock median/p95/max, and the median CPU time of this process (the figure to read when other jobs
    share the machine; database server CPU is not in it)."""
    fn()  # warm: first-call imports, statement cache, pages into memory
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], 2),
            "max_ms": round(times[-1], 2), "client_cpu_median_ms": round(statistics.median(cpu), 2)}


def daily_budget(engine: Engine) -> None:
    """What ingestion reads once per UTC day it sees (samples per stratum that day), for the newest day."""
    from shadowjudge.store import session_scope
    from shadowjudge.traffic.sampling import DailyBudget

    with session_scope(engine) as s:
        DailyBudget().day(s, datetime(2026, 11, 21, tzinfo=UTC).date())


def write_config(workdir: Path, url: str) -> Path:
    cfg = demo_config(workdir, "http://127.0.0.1:9")
    cfg["store"]["url"] = url
    cfg["routes"][0]["name"] = HOT_ROUTE
    path = workdir / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def measure(url: str, workdir: Path, samples: int, repeats: int, scan_rows: int) -> dict[str, Any]:
    """Migrate, fill, then time and explain each command's queries on the store at `url`."""
    from rich.console import Console

    from shadowjudge import cli
    from shadowjudge.alerts.records import list_alerts
    from shadowjudge.cycle import count_rows, weight_history
    from shadowjudge.routing.step import route_history

    from shadowjudge.analysis.drift_data import TimeWindow, window_sample_ids
    from shadowjudge.config import load_config

    revision = upgrade_database(url)
    engine = get_engine(url)
    filled = fill(engine, samples)
    config_path = write_config(workdir, url)
    hot_route = load_config(config_path).route(HOT_ROUTE)
    week = TimeWindow(FILL_END - timedelta(days=7), FILL_END)

    def status() -> None:
        cli.console = Console(file=io.StringIO(), width=160)  # the command prints through this module global
        cli.status(config=config_path, limit=10)

    commands: dict[str, Callable[[], Any]] = {
        "status": status,
        "status_row_counts": lambda: cli.status_row_counts(engine),
        "count_rows_exact": lambda: count_rows(engine),
        "routes_history": lambda: route_history(engine, HOT_ROUTE, limit=50),
        "weight_history": lambda: weight_history(engine, HOT_ROUTE),
        "alerts_list": lambda: list_alerts(engine),
        "alerts_list_all": lambda: list_alerts(engine, status="all", route=HOT_ROUTE),
        "ingest_daily_budget": lambda: daily_budget(engine),
        "drift_window_ids": lambda: window_sample_ids(engine, HOT_ROUTE, week),
        "drift_window_incumbent": lambda: window_sample_ids(engine, HOT_ROUTE, week, incumbent_of=hot_route),
    }
    table_rows = {k: v for k, v in filled["rows"].items() if k != "open_alerts"}
    table_rows["route_state"] = len(ROUTES)
    out: dict[str, Any] = {"revision": revision, **filled, "commands": {}}
    for name, fn in commands.items():
        with captured_sql(engine) as seen:
            fn()
        figures = time_calls(fn, repeats)
        plans = [explain(engine, st, params, table_rows, scan_rows) for st, params in seen if is_query(st)]
        order = ["index", "small_table_scan", "index_scan_full", "full_scan"]
        worst = max((p["verdict"] for p in plans), key=order.index, default="index")
        out["commands"][name] = {**figures, "under_budget": figures["median_ms"] < BUDGET_MS or name in NOT_HELD,
                                 "plan_verdict": worst,
                                 "statements": plans}
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            out["database_mb"] = round(conn.scalar(text("SELECT pg_database_size(current_database())")) / 2**20)
    else:
        out["database_mb"] = round(Path(url.split("///", 1)[1]).stat().st_size / 2**20)
    dispose_engines()
    return out


def summary(backend: dict[str, Any]) -> dict[str, Any]:
    cmds = backend["commands"]
    return {"all_under_budget": all(c["under_budget"] for c in cmds.values()),
            "full_scans": sorted(n for n, c in cmds.items() if c["plan_verdict"] == "full_scan" and n not in NOT_HELD),
            "whole_index_reads": sorted(n for n, c in cmds.items() if c["plan_verdict"] == "index_scan_full"),
            "slowest": max(cmds, key=lambda n: cmds[n]["median_ms"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scan-rows", type=int, default=10_000,
                        help="a table larger than this read without an index is a full scan")
    parser.add_argument("--pg-url", default=os.environ.get("SHADOWJUDGE_TEST_PG_URL"),
                        help="PostgreSQL server URL (a database on it is created and dropped)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--keep", type=Path, default=None, help="keep the SQLite store in this directory")
    args = parser.parse_args()
    if args.samples < 100 or args.repeats < 1:
        parser.error("--samples must be at least 100 and --repeats at least 1")
    result: dict[str, Any] = {"benchmark": "store_queries", "samples": args.samples, "repeats": args.repeats,
                              "budget_ms": BUDGET_MS, "load_avg_before": os.getloadavg(), "backends": {}}
    t_start = time.perf_counter()
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory(prefix="sj-bench-store-") as tmp:
            workdir = args.keep or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            db = workdir / "bench-store.db"
            db.unlink(missing_ok=True)
            sqlite = measure(f"sqlite:///{db}", workdir, args.samples, args.repeats, args.scan_rows)
            result["backends"]["sqlite"] = {**summary(sqlite), **sqlite}
    if args.pg_url and not args.no_pg:
        try:
            with pg_database(args.pg_url, PG_DB) as url, tempfile.TemporaryDirectory(prefix="sj-bench-pg-") as tmp:
                pg = measure(url, Path(tmp), args.samples, args.repeats, args.scan_rows)
                result["backends"]["postgresql"] = {**summary(pg), **pg}
        except Exception as exc:  # noqa: BLE001 - the server may be down: say so in the report
            result["backends"]["postgresql"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    elif not args.no_pg:
        result["backends"]["postgresql"] = {"skipped": "no --pg-url and SHADOWJUDGE_TEST_PG_URL is not set"}
    result["load_avg_after"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=2))
    ok = all(b.get("all_under_budget", True) and not b.get("full_scans") and "error" not in b
             for b in result["backends"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
