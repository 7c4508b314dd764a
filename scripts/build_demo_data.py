"""Build the demo data shipped in shadowjudge/demo_data/ from ../shared/data/alpacaeval (CC BY-NC 4.0).

Run once by maintainers (`python scripts/build_demo_data.py`); the demo itself never needs ../shared.
Writes:
  requests.jsonl.gz        an OpenAI-style gateway request log: the incumbent's real answers to real instructions
  recordings.jsonl.gz      the recorded outputs the replay server answers with (AlpacaEval outputs format)
  alpacaeval-mini/         a small AlpacaEval-format set (other models) the demo trains its quick judge on
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTE = "chat-default"
INCUMBENT = "claude-instant-1.2"
CANDIDATES = ["Yi-34B-Chat", "llama-2-7b-chat-hf"]
JUDGE_TRAIN_MODELS = [
    "gpt4_1106_preview",  # the AlpacaEval 2.0 reference every label compares against
    # models with GPT-4 Turbo labels against that reference, spread over the leaderboard
    "FuseChat-Gemma-2-9B-Instruct", "FuseChat-Qwen-2.5-7B-Instruct", "claude-2", "Mixtral-8x7B-Instruct-v0.1_concise",
    "OpenHermes-2.5-Mistral-7B", "gpt-3.5-turbo-0301", "gemma-7b-it", "vicuna-13b-v1.5-togetherai",
    "nous-hermes-13b", "falcon-40b-instruct", "alpaca-farm-ppo-sim-gpt4-20k",
]
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
TOKEN = re.compile(r"\S+\s*")


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the archive byte-identical across rebuilds
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def count_tokens(text: str) -> int:
    return max(1, len(TOKEN.findall(text)))


def build(src: Path, out: Path, n_prompts: int, seed: int) -> None:
    rng = random.Random(seed)
    prompts = read_jsonl_gz(src / "prompts.jsonl.gz")
    chosen = sorted(rng.sample(prompts, n_prompts), key=lambda p: p["id"])
    ids = {p["id"] for p in chosen}
    wanted = set(JUDGE_TRAIN_MODELS) | {INCUMBENT, *CANDIDATES}
    outputs = [o for o in read_jsonl_gz(src / "outputs.jsonl.gz") if o["prompt_id"] in ids and o["model"] in wanted]
    by_key = {(o["model"], o["prompt_id"]): o["output"] for o in outputs}

    # The replay server's recordings: every served model, the incumbent too.
    served = [INCUMBENT, *CANDIDATES]
    write_jsonl_gz(out / "recordings.jsonl.gz",
                   [{"prompt_id": p["id"], "model": m, "output": by_key[(m, p["id"])]} for m in served for p in chosen])

    # The gateway's request log, as an OpenAI-compatible proxy would write it.
    start = datetime(2026, 11, 22, 0, 0, tzinfo=timezone.utc)
    log = []
    for i, p in enumerate(chosen):
        answer = by_key[(INCUMBENT, p["id"])]
        in_tok, out_tok = count_tokens(p["instruction"]) + 8, count_tokens(answer)
        ttft = round(rng.gauss(320, 40), 1)
        latency = round(ttft + out_tok * rng.gauss(18, 2), 1)
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": p["instruction"]}]
        metadata = {"task": p["dataset"], "tenant": rng.choice(["acme", "globex", "initech"])}
        if i % 25 == 0:  # seeded PII: the sampler must redact it before anything is stored
            messages[0]["content"] += f" Escalations go to support-{i}@example.com or +1 415 555 01{i % 100:02d}."
            metadata["user_email"] = f"user{i}@example.org"
        log.append({
            "id": f"req-{p['id']}",
            "timestamp": (start + timedelta(seconds=i * 240)).isoformat(),
            "route": ROUTE,
            "request": {"model": ROUTE, "messages": messages, "temperature": 0.7, "max_tokens": 1024},
            "response": {
                "model": INCUMBENT,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": in_tok, "completion_tokens": out_tok, "total_tokens": in_tok + out_tok},
            },
            "latency_ms": latency,
            "ttft_ms": ttft,
            "cost_usd": round((in_tok * 0.8 + out_tok * 2.4) / 1e6, 8),
            "cache_hit": False,
            "metadata": metadata,
        })
    write_jsonl_gz(out / "requests.jsonl.gz", log)

    # A small AlpacaEval-format set of other models for the demo's quick judge.
    mini = out / "alpacaeval-mini"
    write_jsonl_gz(mini / "prompts.jsonl.gz", chosen)
    write_jsonl_gz(mini / "outputs.jsonl.gz",
                   [{"prompt_id": p["id"], "model": m, "output": by_key[(m, p["id"])]}
                    for m in JUDGE_TRAIN_MODELS for p in chosen])
    labels = [row for row in read_jsonl_gz(src / "labels.jsonl.gz")
              if row["annotator"] == ANNOTATOR and row["prompt_id"] in ids and row["model_b"] in JUDGE_TRAIN_MODELS]
    write_jsonl_gz(mini / "labels.jsonl.gz", sorted(labels, key=lambda r: (r["model_b"], r["prompt_id"])))
    with open(src / "leaderboard.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["model"] in JUDGE_TRAIN_MODELS]
    with open(mini / "leaderboard.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["model", "win_rate", "lc_win_rate", "avg_length", "n_total"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(chosen)} prompts, {len(log)} requests, {len(labels)} labels -> {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "alpacaeval")
    parser.add_argument("--out", type=Path, default=ROOT / "shadowjudge" / "demo_data")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    build(args.src, args.out, args.prompts, args.seed)
