"""How well the small judge agrees with the big judge on models it never saw; prints ONE JSON object.

    python bench/judge_quality.py --data DIR [--prompts N] [--model-uri URI] [--tracking-uri URI]

DIR is any AlpacaEval-format directory (prompts/outputs/labels jsonl.gz + leaderboard.csv). Only models the judge
never trained on are measured (the judge records its training models; the JSON lists those left out), unless
--include-seen. Reported, for the judge
and for the 'longest answer wins' baseline side by side: instance agreement with the labels overall and on
length-balanced pairs (length ratio 0.67-1.5), P(prefers the longer answer), and at system level each model's win
rate vs gpt4_1106_preview with its Spearman against the leaderboard's win_rate and lc_win_rate (with 95% intervals
from resampling the models, and the leaderboard's own win_rate-vs-lc_win_rate Spearman on the same models). Beside
them, `system_length_controlled`: each model's length-controlled win rate computed from the judge's preferences the
way the leaderboard computes lc_win_rate from GPT-4's (AlpacaEval's GLM), against the same two columns.
Default model: the champion in the registry at --tracking-uri / $MLFLOW_TRACKING_URI / sqlite:///.shadowjudge/mlflow.db.
Data derived from AlpacaEval is CC BY-NC 4.0 (see shadowjudge/demo_data/ATTRIBUTION.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

TARGETS = {"spearman_win_rate": 0.90, "spearman_lc_win_rate": 0.80}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--prompts", type=int, default=None, help="a fixed, seeded subset of N prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-uri", default=None)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--registered-name", default="shadowjudge-judge")
    parser.add_argument("--include-seen", action="store_true",
                        help="also measure models the judge was trained on (by default only unseen models count)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache to read and fill (fp32 ONNX, as training writes it): repeat runs skip "
                             "the encoder; without it the judge encodes with the runtime it is served with")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from evaluators.encoder import EmbeddingCache
    from evaluators.factory import load_small_judge
    from evaluators.judge_cli import progress_bar, strict_json, tracking_uri_default, writable_directory
    from evaluators.judge_training import evaluate_judge
    from shadowjudge.errors import ShadowJudgeError

    started = time.monotonic()
    try:
        judge = load_small_judge(args.model_uri or f"models:/{args.registered_name}@champion",
                                 tracking_uri_default(args.tracking_uri))
        runtime = judge.spec.serving_backend
        if args.cache_dir is not None:
            writable_directory(args.cache_dir, "--cache-dir")
            judge.embedder = EmbeddingCache(args.cache_dir, judge.spec.encoder)
            runtime = f"onnx (fp32) through the embedding cache {args.cache_dir}"
        with progress_bar(not args.no_progress) as update:
            report = evaluate_judge(judge, args.data, prompts=args.prompts, seed=args.seed,
                                    include_seen=args.include_seen, progress=update)
        if isinstance(judge.embedder, EmbeddingCache):
            judge.embedder.save()
    except ShadowJudgeError as exc:  # bad data, an unloadable judge, a missing encoder: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in report["warnings"]:  # why figures below are null, where a reader of the JSON may not look
        print(f"warning: {warning}", file=sys.stderr)
    system = report.get("system", {})
    lc = report.get("system_length_controlled", {})
    balanced = report["instance"]["balanced_agreement"]
    base_balanced = report["instance_baseline_longest"]["balanced_agreement"]
    out = {
        "benchmark": "judge_quality",
        "judge": judge.version,
        "encoder_runtime": runtime,
        **report,
        "targets": {
            **{k: {"target": v, "value": system.get(k), "met": bool(system.get(k, float("nan")) >= v),
                   "ci95_over_models": [system.get(f"{k}_ci95_low"), system.get(f"{k}_ci95_high")]}
               for k, v in TARGETS.items()},
            "balanced_agreement_above_baseline": {"value": balanced - base_balanced, "met": balanced > base_balanced},
        },
        # Not a target of its own: the lc_win_rate target above is stated for the judge's plain win rate. This is
        # the like-for-like reading, the judge's length-controlled win rate against the leaderboard's.
        "length_controlled_vs_lc_win_rate": {
            "value": lc.get("spearman_lc_win_rate"),
            "ci95_over_models": [lc.get("spearman_lc_win_rate_ci95_low"), lc.get("spearman_lc_win_rate_ci95_high")],
            "baseline_longest": report.get("system_length_controlled_baseline_longest", {}).get("spearman_lc_win_rate"),
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {_threads()}",
    }
    print(json.dumps(strict_json(out), indent=2, allow_nan=False))
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
