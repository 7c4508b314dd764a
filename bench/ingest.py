"""Benchmark traffic ingestion: JSONL parse + sample + redact, and end to end into a SQLite store.

Generates OpenAI-style gateway logs of ~2 KB records in a temp dir (real AlpacaEval instructions and answers
from shadowjudge/demo_data, CC BY-NC 4.0; one record in 25 carries seeded PII), then measures, in this one
process (pinned to one CPU where the OS allows):

- parse+sample+redact records/s (no store) at sampling rate 1.0 (every record redacted) and at 0.1;
- end-to-end records/s (read, sample, redact, batched INSERT into a fresh SQLite store) at the same rates;
- peak traced memory (tracemalloc) of end-to-end ingestion for two file sizes, to show it stays flat;
- seconds to find rotated files in a folder of hourly logs, each with a checksum beside it, for a backfill and
  for a live run after a rotation, at two folder sizes (4x apart): the time must grow about 4x, not 16x.

Rates are given per wall-clock second and per CPU second of this process (the second is the one-core figure
when other jobs share the machine; SQLite's fsyncs count in the first only).

Prints ONE JSON object. Usage: python bench/ingest.py [--records 40000] [--memory-records 5000]
[--folder-logs 8000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

from shadowjudge.config import parse_config  # noqa: E402
from shadowjudge.store import dispose_engines, get_engine, upgrade_database  # noqa: E402
from shadowjudge.traffic import TimeWindow, TrafficRecord, ingest_sources  # noqa: E402
from shadowjudge.traffic.ingest import sample_row  # noqa: E402
from shadowjudge.traffic.lines import read_lines  # noqa: E402
from shadowjudge.traffic.redaction import Redactor  # noqa: E402
from shadowjudge.traffic.sampling import Sampler  # noqa: E402
from shadowjudge.traffic.sources.jsonl import SUFFIXES, JsonlSource  # noqa: E402

DEMO = ROOT / "shadowjudge" / "demo_data"
ROUTE = {"name": "chat-default", "incumbent": {"name": "inc", "model": "m1", "base_url": "http://127.0.0.1:9/v1"},
         "candidates": [{"name": "cand", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}]}
TARGET_BYTES = 2048


def templates() -> list[dict]:
    with gzip.open(DEMO / "requests.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    with gzip.open(DEMO / "alpacaeval-mini" / "outputs.jsonl.gz", "rt") as fh:
        answers = [json.loads(line)["output"] for line in fh]
    rng = random.Random(3)
    for row in rows:  # pad each answer with more real text to reach ~2 KB per record
        base = len(json.dumps(row))
        answer = row["response"]["choices"][0]["message"]["content"]
        while base + len(answer) - len(row["response"]["choices"][0]["message"]["content"]) < TARGET_BYTES:
            answer += "\n\n" + rng.choice(answers)
        row["response"]["choices"][0]["message"]["content"] = answer[: max(0, TARGET_BYTES - base + len(
            row["response"]["choices"][0]["message"]["content"]))]
    return rows


def write_log(path: Path, n: int, rows: list[dict]) -> int:
    start = datetime(2026, 11, 22, tzinfo=timezone.utc)
    size = 0
    with open(path, "w") as fh:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            row["id"] = f"req-{i:09d}"
            row["timestamp"] = (start + timedelta(milliseconds=37 * i)).isoformat()
            line = json.dumps(row) + "\n"
            size += len(line.encode())
            fh.write(line)
    return size


def config_for(store_url: str, path: Path, rate: float):
    return parse_config({"store": {"url": store_url}, "routes": [ROUTE],
                         "sources": [{"name": "bench", "kind": "jsonl", "path": str(path), "batch_size": 1000,
                                      "max_record_bytes": 1_000_000}],
                         "sampling": {"rate": rate, "stratify_by": "task", "min_per_stratum": 5}}, environ={})


def parse_sample_redact(path: Path, rate: float) -> dict:
    """The in-process pipeline without the store: what the ingest loop does before its INSERT."""
    config = config_for("sqlite://", path, rate)
    redactor = Redactor.from_config(config.redaction)
    sampler = Sampler(config.sampling, redactor)
    window = TimeWindow()
    source = JsonlSource("bench", str(path), 1_000_000)
    now = datetime.now(timezone.utc)
    read = kept = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for step in source.read(None, window):
        record = step.item
        if not isinstance(record, TrafficRecord):
            continue
        read += 1
        if sampler.screen(record, window) is None and sampler.hash_in(record):
            sample_row(record, sampler.stratum(record), "bench", redactor, now)
            kept += 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"records": read, "sampled": kept, "seconds": round(seconds, 3), "records_per_s": round(read / seconds),
            "records_per_cpu_s": round(read / cpu)}


def end_to_end(path: Path, rate: float, workdir: Path, trace_memory: bool = False) -> dict:
    url = f"sqlite:///{workdir}/store-{rate}-{time.monotonic_ns()}.db"
    upgrade_database(url)
    engine = get_engine(url)
    config = config_for(url, path, rate)
    if trace_memory:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    report = ingest_sources(engine, config)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"records": report.totals["read"], "stored": report.totals["stored"], "seconds": round(seconds, 3),
           "records_per_s": round(report.totals["read"] / seconds),
           "records_per_cpu_s": round(report.totals["read"] / cpu),
           "redactions": report.totals["redactions"]}
    if trace_memory:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["peak_traced_mib"] = round(peak / 2**20, 2)
    dispose_engines()
    return out


def folder_listing(workdir: Path, logs: int) -> dict:
    """Seconds a backfill, and a live run after the newest log was rotated, take to find rotated files among
    `logs` hourly logs with a `.md5` beside each (a backfill used to match every name against every log)."""
    folder = workdir / f"hourly-{logs}"
    folder.mkdir()
    for hour in range(logs):
        (folder / f"gw-{hour:05d}.jsonl").write_bytes(b'{"x": 1}\n')
        (folder / f"gw-{hour:05d}.jsonl.md5").write_bytes(b"0" * 32)
    start = time.perf_counter()
    read = sum(1 for line in read_lines(folder, None, 10_000, SUFFIXES, backfill=True) if line.data)
    backfill_s = time.perf_counter() - start
    cursor = list(read_lines(folder, None, 10_000, SUFFIXES))[-1].cursor
    newest = folder / f"gw-{logs - 1:05d}.jsonl"
    newest.rename(folder / f"{newest.name}.1")
    newest.write_bytes(b'{"x": 2}\n')
    start = time.perf_counter()
    list(read_lines(folder, cursor, 10_000, SUFFIXES))
    live_s = time.perf_counter() - start
    return {"lines_read": read, "backfill_s": round(backfill_s, 3), "live_after_rotation_s": round(live_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--memory-records", type=int, default=5_000, help="small file; the large one is 8x")
    parser.add_argument("--folder-logs", type=int, default=8_000, help="large folder; the small one is 1/4")
    args = parser.parse_args()
    pinned = None
    if hasattr(os, "sched_setaffinity"):
        pinned = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {pinned})

    rows = templates()
    with tempfile.TemporaryDirectory(prefix="sj-bench-") as tmp:
        work = Path(tmp)
        log = work / "gateway.jsonl"
        size = write_log(log, args.records, rows)
        result: dict = {
            "benchmark": "traffic_ingest_jsonl",
            "records": args.records,
            "mean_record_bytes": round(size / args.records),
            "file_mib": round(size / 2**20, 1),
            "parse_sample_redact": {f"rate_{r}": parse_sample_redact(log, r) for r in (1.0, 0.1)},
            "end_to_end_sqlite": {f"rate_{r}": end_to_end(log, r, work) for r in (1.0, 0.1)},
        }
        memory = {}
        for n in (args.memory_records, args.memory_records * 8):
            path = work / f"memory-{n}.jsonl"
            file_size = write_log(path, n, rows)
            run = end_to_end(path, 1.0, work, trace_memory=True)
            memory[f"{n}_records"] = {"file_mib": round(file_size / 2**20, 1),
                                      "peak_traced_mib": run["peak_traced_mib"]}
            path.unlink()
        result["memory_end_to_end_rate_1.0"] = memory
        result["folder_of_hourly_logs"] = {f"{n}_logs": folder_listing(work, n)
                                           for n in (args.folder_logs // 4, args.folder_logs)}
    result["target_records_per_s"] = 20_000
    result["machine"] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                         "pinned_cpu": pinned, "platform": platform.platform(),
                         "note": "single process; numbers are noisy when other jobs share the CPU"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
