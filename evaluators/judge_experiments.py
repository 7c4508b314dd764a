"""Compare reward-head designs by cross-validation over MODELS, every candidate logged to MLflow.

Each fold holds out a set of judged models; a head is trained on the others and judged on the held-out ones
(pair agreement, length-balanced agreement, and the held-out models' win rates vs the reference). System-level
Spearman is computed over the out-of-fold win rates of all models together (and per fold). Embeddings come from
the on-disk cache, so a configuration takes seconds once the corpus is embedded.

    python -m evaluators.judge_experiments --data ../shared/data/alpacaeval --folds 5

`--exclude-heldout SEED` leaves out the models `shadowjudge judge train --seed SEED` holds out, so that a design
chosen here is not chosen on the models the trained judge is then measured on.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from evaluators.encoder import POOLINGS, EmbeddingCache, EncoderSettings
from evaluators.judge_metrics import ReferenceComparisons, longest_wins, pair_metrics, system_metrics
from evaluators.judge_training import (
    DEFAULT_CACHE_DIR,
    FULL,
    EmbeddedAnswers,
    HeadConfig,
    answer_rewards,
    embed_answers,
    fit_head,
)
from evaluators.preference_data import (
    FULL_DATA,
    REFERENCE_MODEL,
    PreferenceData,
    load_preference_data,
    split_by_model,
)

EXPERIMENT = "shadowjudge-judge-experiments"


def model_folds(models: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    shuffled = sorted(models)
    random.Random(seed).shuffle(shuffled)
    return [sorted(shuffled[i::folds]) for i in range(folds)]


def _finite(stat, values) -> float:
    """`stat` over the finite values; NaN when there are none (folds without leaderboard rows), without a warning."""
    kept = [v for v in values if np.isfinite(v)]
    return float(stat(kept)) if kept else float("nan")


def cross_validate(data: PreferenceData, emb: EmbeddedAnswers, config: HeadConfig, encoder: EncoderSettings,
                   *, folds: int = 5, seed: int = 0, annotators: Sequence[str] | None = None,
                   length_penalty: float = 0.0) -> dict:
    """Out-of-fold figures for one head configuration (and the longest-wins baseline on the same folds).

    `length_penalty` adds beta * log(1 + characters) to every reward at inference, an experiment kept runnable:
    negative values trade win_rate Spearman for lc_win_rate Spearman (README, "Tried and not kept")."""
    pairs = [p for p in data.pairs if not annotators or p.annotator in annotators]
    judged = sorted({p.model_b for p in data.pairs})
    prompts = sorted(data.prompts)
    oof: dict[str, dict[str, float]] = {}
    deltas: dict[str, dict[str, float]] = {}
    preds, labels, la, lb = [], [], [], []
    fold_rho, fold_lc = [], []
    for fold in model_folds(judged, folds, seed):
        held = set(fold)
        train = [p for p in pairs if p.model_b not in held and p.model_a not in held]
        spec, state = fit_head(emb, train, config, encoder, seed)
        r = answer_rewards(emb, spec, state) + length_penalty * np.log1p(emb.lengths)
        test = [p for p in data.pairs if p.model_b in held]
        ia = emb.rows([(p.prompt_id, p.model_a) for p in test])
        ib = emb.rows([(p.prompt_id, p.model_b) for p in test])
        preds.append(1 / (1 + np.exp(-(r[ib] - r[ia]))))
        labels.append(np.asarray([p.p_b_better for p in test]))
        la.append(emb.lengths[ia])
        lb.append(emb.lengths[ib])
        for m in fold:
            keys = [(pid, m) for pid in prompts if (pid, m) in emb.index and (pid, REFERENCE_MODEL) in emb.index]
            if not keys or m not in data.leaderboard:
                continue
            im = emb.rows(keys)
            iref = emb.rows([(pid, REFERENCE_MODEL) for pid, _ in keys])
            pids = [pid for pid, _ in keys]
            oof[m] = dict(zip(pids, (1 / (1 + np.exp(-(r[im] - r[iref])))).tolist()))
            deltas[m] = dict(zip(pids, (emb.lengths[im] - emb.lengths[iref]).astype(float).tolist()))
        fold_win = ReferenceComparisons({m: oof[m] for m in fold if m in oof}, deltas).win_rates()
        sm = system_metrics(fold_win, data.leaderboard, bootstrap=0)
        fold_rho.append(sm.spearman_win_rate)
        fold_lc.append(sm.spearman_lc_win_rate)
    p, y, a, b = (np.concatenate(v) for v in (preds, labels, la, lb))
    pm = pair_metrics(p, y, a, b)
    bm = pair_metrics(longest_wins(a, b), y, a, b)
    judged_vs_ref = ReferenceComparisons(oof, deltas)
    base_vs_ref = judged_vs_ref.longest_answer_wins()
    sb = system_metrics(base_vs_ref.win_rates(), data.leaderboard, bootstrap=0)
    plain, controlled = judged_vs_ref.win_rates(), judged_vs_ref.length_controlled_win_rates()
    sm = system_metrics(plain, data.leaderboard)
    slc = system_metrics(controlled, data.leaderboard)
    sblc = system_metrics(base_vs_ref.length_controlled_win_rates(), data.leaderboard, bootstrap=0)
    shalf = system_metrics(judged_vs_ref.partly_length_controlled_win_rates(), data.leaderboard)
    return {
        "agreement": pm.agreement, "balanced_agreement": pm.balanced_agreement, "prefers_longer": pm.prefers_longer,
        "log_loss": pm.log_loss,
        "spearman_win_rate": sm.spearman_win_rate, "spearman_lc_win_rate": sm.spearman_lc_win_rate,
        "spearman_win_rate_ci95_low": sm.spearman_win_rate_ci95[0],
        "spearman_win_rate_ci95_high": sm.spearman_win_rate_ci95[1],
        "spearman_lc_win_rate_ci95_low": sm.spearman_lc_win_rate_ci95[0],
        "spearman_lc_win_rate_ci95_high": sm.spearman_lc_win_rate_ci95[1],
        "fold_spearman_win_rate_mean": _finite(np.mean, fold_rho),
        "fold_spearman_lc_win_rate_mean": _finite(np.mean, fold_lc),
        "fold_spearman_win_rate_min": _finite(np.min, fold_rho),
        "fold_spearman_lc_win_rate_min": _finite(np.min, fold_lc),
        "baseline_agreement": bm.agreement, "baseline_balanced_agreement": bm.balanced_agreement,
        "baseline_spearman_win_rate": sb.spearman_win_rate, "baseline_spearman_lc_win_rate": sb.spearman_lc_win_rate,
        # the judge's own length-controlled win rate (AlpacaEval's GLM over its preferences) against the leaderboard
        "lc_spearman_win_rate": slc.spearman_win_rate, "lc_spearman_lc_win_rate": slc.spearman_lc_win_rate,
        "lc_spearman_lc_win_rate_ci95_low": slc.spearman_lc_win_rate_ci95[0],
        "lc_spearman_lc_win_rate_ci95_high": slc.spearman_lc_win_rate_ci95[1],
        "baseline_lc_spearman_lc_win_rate": sblc.spearman_lc_win_rate,
        # halfway between the two, tried and not kept (ReferenceComparisons.partly_length_controlled_win_rates)
        "half_lc_spearman_win_rate": shalf.spearman_win_rate,
        "half_lc_spearman_lc_win_rate": shalf.spearman_lc_win_rate,
        "n_models": sm.n_models,
        "win_rates": {m: {"plain": round(plain[m], 3), "length_controlled": round(controlled[m], 3)}
                      for m in sorted(controlled)},
    }


DEFAULT_GRID: tuple[HeadConfig, ...] = (
    HeadConfig("linear-length", use_length=True, hidden=0, epochs=30),
    HeadConfig("linear-nolength", use_length=False, hidden=0, epochs=30),
    HeadConfig("mlp64-length", use_length=True, hidden=64),
    HeadConfig("mlp64-nolength", use_length=False, hidden=64),
    HeadConfig("mlp64-length-noprompt", use_length=True, hidden=64, prompt_interaction=False),
    HeadConfig("mlp256-length", use_length=True, hidden=256, weight_decay=5e-2),
    HeadConfig("mlp64-nolength-lc", use_length=False, hidden=64, length_controlled=True),
    HeadConfig("mlp64-nolength-lc-keep", use_length=False, hidden=64, length_controlled=True, keep_length_term=True),
    HeadConfig("linear-nolength-lc-keep", use_length=False, hidden=0, epochs=30, length_controlled=True,
               keep_length_term=True),
    HeadConfig("linear-nolength-lc", use_length=False, hidden=0, epochs=30, length_controlled=True),
    HeadConfig("mlp64-nolength-lc-noprompt", use_length=False, hidden=64, prompt_interaction=False,
               length_controlled=True),
    HeadConfig("mlp256-nolength-lc", use_length=False, hidden=256, weight_decay=5e-2, length_controlled=True),
    HeadConfig("mlp512-nolength-lc", use_length=False, hidden=512, weight_decay=1e-1, length_controlled=True),
    HeadConfig("mlp256-nolength-lc-e60", use_length=False, hidden=256, weight_decay=5e-2, epochs=60,
               length_controlled=True),
    HeadConfig("mlp256-nolength-lc-e120", use_length=False, hidden=256, weight_decay=5e-2, epochs=120,
               length_controlled=True),
    HeadConfig("mlp64-nolength-lc-words", use_length=False, hidden=64, length_controlled=True, word_buckets=2 ** 18),
    HeadConfig("mlp256-nolength-lc-words", use_length=False, hidden=256, weight_decay=5e-2, epochs=60,
               length_controlled=True, word_buckets=2 ** 18),
    HeadConfig("mlp64-nolength-lc-words-e15", use_length=False, hidden=64, epochs=15, length_controlled=True,
               word_buckets=2 ** 18),
    HeadConfig("mlp256-nolength-lc-words-e30", use_length=False, hidden=256, weight_decay=5e-2, epochs=30,
               length_controlled=True, word_buckets=2 ** 18),
)


def run_grid(data_dir: str | Path, tracking_uri: str | None, *, encoder: EncoderSettings, folds: int, seed: int,
             grid: Sequence[HeadConfig] = DEFAULT_GRID, cache_dir: Path = DEFAULT_CACHE_DIR,
             annotators: Sequence[str] | None = None, max_prompts: int | None = None,
             length_penalty: float = 0.0, exclude_heldout: int | None = None) -> list[dict]:
    data = load_preference_data(data_dir)
    if max_prompts:
        data = data.sample_prompts(max_prompts, seed)
    if exclude_heldout is not None:
        data = replace(data, pairs=split_by_model(data, FULL.heldout_fraction, exclude_heldout).train_pairs(data))
    cache = EmbeddingCache(cache_dir, encoder)
    keys = sorted(data.outputs)
    emb = embed_answers(data, keys, cache)
    cache.save()
    rows = []
    for config in grid:
        started = time.monotonic()
        metrics = cross_validate(data, emb, config, encoder, folds=folds, seed=seed, annotators=annotators,
                                 length_penalty=length_penalty)
        metrics["seconds"] = time.monotonic() - started
        row = {"config": asdict(config), "encoder": asdict(encoder), "annotators": list(annotators or []),
               "length_penalty": length_penalty, "excluded_heldout_of_seed": exclude_heldout, **metrics}
        rows.append(row)
        if tracking_uri:
            _log(tracking_uri, row, folds, seed, str(data_dir))
    return rows


def _log(tracking_uri: str, row: dict, folds: int, seed: int, data_dir: str) -> None:
    import mlflow

    from evaluators import judge_registry as reg

    experiment = reg.ensure_experiment(tracking_uri, EXPERIMENT)
    with reg.tracking(tracking_uri), mlflow.start_run(experiment_id=experiment, run_name=row["config"]["name"]):
        mlflow.log_params({**{f"head_{k}": v for k, v in row["config"].items()},
                           **{f"encoder_{k}": v for k, v in row["encoder"].items()},
                           "folds": folds, "seed": seed, "data_dir": data_dir, "length_penalty": row["length_penalty"],
                           "excluded_heldout_of_seed": row["excluded_heldout_of_seed"],
                           "annotators": ",".join(row["annotators"]) or "all"})
        mlflow.log_metrics({k: float(v) for k, v in row.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Cross-validate reward-head designs by model; logs to MLflow")
    parser.add_argument("--data", default=str(FULL_DATA))
    parser.add_argument("--tracking-uri", default="sqlite:///.shadowjudge/mlflow.db")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--pooling", default="last", choices=POOLINGS,
                        help="last: the last layer mean-pooled; layer-mean: every layer's pooled output averaged")
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--annotators", default="", help="comma-separated; empty = all")
    parser.add_argument("--only", default="", help="comma-separated config names from the default grid")
    parser.add_argument("--length-penalty", type=float, default=0.0,
                        help="add BETA * log(1 + characters) to every reward at inference (negative: penalise length)")
    parser.add_argument("--exclude-heldout", type=int, default=None, metavar="SEED",
                        help="leave out the models `judge train --seed SEED` holds out (design on training models)")
    args = parser.parse_args(argv)
    grid = [c for c in DEFAULT_GRID if not args.only or c.name in args.only.split(",")]
    rows = run_grid(args.data, args.tracking_uri or None,
                    encoder=EncoderSettings(max_tokens=args.max_tokens, num_layers=args.num_layers,
                                            pooling=args.pooling),
                    folds=args.folds, seed=args.seed, grid=grid,
                    annotators=[a for a in args.annotators.split(",") if a] or None, max_prompts=args.max_prompts,
                    length_penalty=args.length_penalty, exclude_heldout=args.exclude_heldout)
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("encoder",)}))


if __name__ == "__main__":
    main()


__all__ = ["DEFAULT_GRID", "cross_validate", "run_grid"]
