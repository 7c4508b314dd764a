"""Small-judge throughput on this CPU for 512-token answer pairs; prints ONE JSON object.

    python bench/judge_speed.py [--pairs N] [--model-uri URI] [--tracking-uri URI]

Every pair is a real instruction with two real AlpacaEval answers cut to exactly 512 tokens. Paths, side by side:
  pytorch_full_512        plain PyTorch, whole 512 tokens of both answers, nothing cached (the naive judge)
  pytorch_head_tail       plain PyTorch, the judge's head+tail truncation, nothing cached
  onnx_fp32_head_tail     ONNX Runtime fp32, same numbers as PyTorch, nothing cached
  onnx_int8_head_tail     ONNX Runtime dynamic int8, nothing cached
  *_incumbent_cached      as production scores: the incumbent answer and prompt were embedded when the incumbent
                          was scored (scoring.py scores it first), so a judgment encodes only the candidate
Judgments/s are wall-clock over the whole compare() call (tokenising, encoding, features, head). Other processes
share the CPU: compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

DATA = Path(__file__).resolve().parent.parent / "shadowjudge" / "demo_data" / "alpacaeval-mini"
TOKENS = 512


def build_pairs(tokenizer, n: int) -> tuple[list[str], list[str], list[str]]:
    """n (prompt, incumbent, candidate) triples; answers are real outputs joined and cut to exactly 512 tokens."""
    with gzip.open(DATA / "prompts.jsonl.gz", "rt") as fh:
        prompts = {row["id"]: row["instruction"] for row in map(json.loads, fh)}
    outputs: dict[str, list[str]] = {}
    for line in gzip.open(DATA / "outputs.jsonl.gz", "rt"):
        row = json.loads(line)
        outputs.setdefault(row["prompt_id"], []).append(row["output"])
    ids = sorted(outputs)
    p, inc, cand = [], [], []
    for i in range(n):
        pid = ids[i % len(ids)]
        answers = outputs[pid]
        p.append(prompts[pid])
        inc.append(_exactly(tokenizer, answers[(i // len(ids)) % len(answers)], answers))
        cand.append(_exactly(tokenizer, answers[(i // len(ids) + 1) % len(answers)], answers[::-1]))
    return p, inc, cand


def _exactly(tokenizer, first: str, pool: list[str]) -> str:
    ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    for more in pool:
        if len(ids) >= TOKENS:
            break
        ids += tokenizer("\n\n" + more, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:TOKENS])


def rate(judge, prompts, inc, cand, batch: int, warm_incumbent: bool) -> dict[str, float]:
    if warm_incumbent:
        judge.score(prompts, inc)  # what scoring.py does first; fills the judge's embedding cache
    started = time.perf_counter()
    for s in range(0, len(prompts), batch):
        judge.compare(prompts[s:s + batch], inc[s:s + batch], cand[s:s + batch])
    elapsed = time.perf_counter() - started
    return {"pairs": len(prompts), "seconds": round(elapsed, 2), "judgments_per_s": round(len(prompts) / elapsed, 2)}


def positive_int(text: str) -> int:
    """An argparse type: a count of pairs or a batch size, where 0 would leave nothing to time (or divide by it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=positive_int, default=256,
                        help="pairs per fast path (the full-512 path runs a quarter)")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--model-uri", default=None)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--registered-name", default="shadowjudge-judge")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from evaluators.encoder import base_model_dir, default_threads
    from evaluators.factory import load_small_judge
    from evaluators.judge_cli import tracking_uri_default
    from evaluators.small_judge import SmallJudge
    from shadowjudge.errors import ShadowJudgeError

    try:
        shipped = load_small_judge(args.model_uri or f"models:/{args.registered_name}@champion",
                                   tracking_uri_default(args.tracking_uri), backend="torch")
    except ShadowJudgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = shipped.state()
    prompts, inc, cand = build_pairs(AutoTokenizer.from_pretrained(str(base_model_dir())), args.pairs)

    def judge(backend: str, spec=shipped.spec) -> SmallJudge:
        return SmallJudge(spec, state, version=f"bench:{backend}", backend=backend, batch_size=args.batch)

    n_full = max(args.batch, args.pairs // 4)
    full_spec = replace(shipped.spec, encoder=replace(shipped.spec.encoder, max_tokens=TOKENS))
    judge("onnx")  # export the ONNX encoders once, outside the timings
    judge("onnx-int8")
    results = {
        "pytorch_full_512": rate(judge("torch", full_spec), prompts[:n_full], inc[:n_full], cand[:n_full],
                                 args.batch, False),
        "pytorch_head_tail": rate(judge("torch"), prompts, inc, cand, args.batch, False),
        "onnx_fp32_head_tail": rate(judge("onnx"), prompts, inc, cand, args.batch, False),
        "onnx_int8_head_tail": rate(judge("onnx-int8"), prompts, inc, cand, args.batch, False),
        "pytorch_head_tail_incumbent_cached": rate(judge("torch"), prompts, inc, cand, args.batch, True),
        "onnx_int8_head_tail_incumbent_cached": rate(judge("onnx-int8"), prompts, inc, cand, args.batch, True),
    }
    shipped_backend = shipped.spec.serving_backend
    fastest = max(results, key=lambda k: results[k]["judgments_per_s"])
    base = results["pytorch_full_512"]["judgments_per_s"]
    print(json.dumps({
        "benchmark": "judge_speed",
        "judge": shipped.version,
        "answer_tokens": TOKENS,
        "encoder": {"max_tokens": shipped.spec.encoder.max_tokens, "head_fraction": shipped.spec.encoder.head_fraction,
                    "num_layers": shipped.spec.encoder.num_layers, "pooling": shipped.spec.encoder.pooling,
                    "validated_backend": shipped_backend},
        "results": results,
        "fastest_path": fastest,
        "fastest_judgments_per_s": results[fastest]["judgments_per_s"],
        "speedup_vs_pytorch_full_512": {k: round(v["judgments_per_s"] / base, 2) for k, v in results.items()},
        "target_judgments_per_s": 50,
        "met": results[fastest]["judgments_per_s"] >= 50,
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs; threads {default_threads()}, "
                   f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at the end",
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
