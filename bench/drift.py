"""Input-drift benchmark on real AlpacaEval instructions (CC BY-NC 4.0; see shadowjudge/demo_data/ATTRIBUTION.md).

Prints ONE JSON object:
- false_alarm_rate: no drift, reference and current are disjoint random draws from all 805 instructions
  (target <= 0.05);
- detection_rate: a topic shift, current drawn only from the koala and oasst subsets, reference from the rest of the
  pool, a mix of all five subsets (target >= 0.90);
- seconds_100k: time of one input-drift test of 100,000 x 384 embeddings against 100,000 x 384 (median of repeats).

Embeddings are all-MiniLM-L6-v2 on CPU. The thresholds tested are shipped defaults (DriftConfig()); they were chosen
on this same data, so these rates show the shipped behaviour, not an out-of-sample estimate.

    python bench/drift.py [--data ../shared/data/alpacaeval] [--trials 200]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shadowjudge.environment import apply_defaults  # noqa: E402

apply_defaults()

from shadowjudge.analysis.drift import input_drift  # noqa: E402
from shadowjudge.analysis.embeddings import MiniLMEmbedder  # noqa: E402
from shadowjudge.config import DriftConfig  # noqa: E402

SHIFT_SUBSETS = ("koala", "oasst")


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a rate."""
    if n == 0:
        return [math.nan, math.nan]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_trials(vectors: np.ndarray, subsets: np.ndarray, trials: int, n_ref: int, n_cur: int,
               config: DriftConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shift_pool = np.flatnonzero(np.isin(subsets, SHIFT_SUBSETS))
    outcome: dict[str, list] = {"null": [], "shift": []}
    for t in range(trials):
        order = rng.permutation(len(vectors))
        null = input_drift(vectors[order[:n_ref]], vectors[order[n_ref:n_ref + n_cur]], config, seed=t)
        current = rng.choice(shift_pool, size=n_cur, replace=False)
        rest = np.setdiff1d(np.arange(len(vectors)), current)
        reference = rng.choice(rest, size=n_ref, replace=False)
        shift = input_drift(vectors[reference], vectors[current], config, seed=t)
        for key, result in (("null", null), ("shift", shift)):
            d = result.details
            outcome[key].append((result.drifted, d["auc"], d["auc_p"], d["mmd"], d["mmd_p"],
                                 "domain classifier" in result.note, "MMD" in result.note))
        if (t + 1) % 25 == 0:
            log(f"{t + 1}/{trials} trials")
    summary = {}
    for key, rows in outcome.items():
        arr = np.array(rows, dtype=float)
        hits = int(arr[:, 0].sum())
        summary[key] = {"rate": round(hits / trials, 4), "rate_95ci": wilson(hits, trials),
                        "by_classifier": round(float(arr[:, 5].mean()), 4), "by_mmd": round(float(arr[:, 6].mean()), 4),
                        "auc_median": round(float(np.median(arr[:, 1])), 4),
                        "mmd_median": round(float(np.median(arr[:, 3])), 4)}
    return summary


def time_large(vectors: np.ndarray, subsets: np.ndarray, config: DriftConfig, repeats: int, seed: int) -> dict:
    """100,000 x 384 per window: real embeddings resampled with a little noise (timing does not depend on content)."""
    rng = np.random.default_rng(seed)

    def window(pool: np.ndarray, n: int) -> np.ndarray:
        x = vectors[rng.choice(pool, size=n)] + rng.normal(0, 0.02, size=(n, vectors.shape[1])).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    n = 100_000
    everything = np.arange(len(vectors))
    reference = window(everything, n)
    shift_pool = np.flatnonzero(np.isin(subsets, SHIFT_SUBSETS))
    currents = {"no_drift": window(everything, n), "topic_shift": window(shift_pool, n)}
    out = {}
    for name, current in currents.items():
        seconds, drifted = [], None
        for r in range(repeats):
            start = time.perf_counter()
            result = input_drift(reference, current, config, seed=r)
            seconds.append(time.perf_counter() - start)
            drifted = result.drifted
        out[name] = {"seconds_median": round(float(np.median(seconds)), 3),
                     "seconds_all": [round(s, 3) for s in seconds], "drifted": drifted}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpacaeval"))
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--reference-size", type=int, default=300)
    parser.add_argument("--current-size", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with gzip.open(Path(args.data) / "prompts.jsonl.gz", "rt") as fh:
        prompts = [json.loads(line) for line in fh]
    subsets = np.array([p["dataset"] for p in prompts])
    config = DriftConfig()
    load_before = os.getloadavg()[0]

    start = time.perf_counter()
    vectors = MiniLMEmbedder().embed([p["instruction"] for p in prompts])
    embed_seconds = time.perf_counter() - start
    log(f"embedded {len(prompts)} instructions in {embed_seconds:.1f}s")

    start = time.perf_counter()
    rates = run_trials(vectors, subsets, args.trials, args.reference_size, args.current_size, config, args.seed)
    trial_seconds = time.perf_counter() - start
    large = time_large(vectors, subsets, config, args.repeats, args.seed)

    print(json.dumps({
        "benchmark": "input_drift",
        "data": "AlpacaEval instructions (805; CC BY-NC 4.0), all-MiniLM-L6-v2 embeddings",
        "trials": args.trials,
        "reference_size": args.reference_size,
        "current_size": args.current_size,
        "shift": f"current only {'+'.join(SHIFT_SUBSETS)}; reference a mix of all subsets",
        "false_alarm_rate": rates["null"]["rate"],
        "false_alarm_rate_95ci": rates["null"]["rate_95ci"],
        "detection_rate": rates["shift"]["rate"],
        "detection_rate_95ci": rates["shift"]["rate_95ci"],
        "targets": {"false_alarm_rate_max": 0.05, "detection_rate_min": 0.90},
        "meets_targets": rates["null"]["rate"] <= 0.05 and rates["shift"]["rate"] >= 0.90,
        "seconds_100k": large["topic_shift"]["seconds_median"],
        "large_windows": {"rows_per_window": 100_000, "dims": int(vectors.shape[1]), **large},
        "per_condition": rates,
        "config": config.model_dump(),
        "seconds": {"embed_805": round(embed_seconds, 2), "trials_total": round(trial_seconds, 2),
                    "per_trial_pair": round(trial_seconds / args.trials, 4)},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(load_before, 2),
                    "note": "shared CPU machine; timings are noisy under contention"},
    }))


if __name__ == "__main__":
    main()
