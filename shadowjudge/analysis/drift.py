"""Drift checks: input (prompt embeddings), output (per model) and judge (agreement with the teacher).

Every check alarms only when a test AND an effect size agree: a p-value alone alarms on any large window, an
effect size alone alarms on noise in a small one. Within one check family the tests share the false-alarm rate
(Bonferroni), so the configured `alpha` bounds the false-alarm rate of the family.

Input drift compares a current window of prompt embeddings with a reference window by two tests:
- a domain classifier (logistic regression trained on half of each window to tell them apart; its AUC on the other
  half, with a label-permutation null), whose AUC is also the effect size;
- MMD with an RBF kernel (median-heuristic bandwidth) and a permutation test, whose MMD is the effect size.
Large windows are subsampled (`max_embeddings`, `max_mmd_samples`): both tests cost a bounded amount whatever the
window size, and with an effect-size gate more samples would add cost, not decisions. Given texts, only the
subsample is embedded, and it is chosen by a hash of each text (the texts with the smallest hashes), so consecutive
cycles over sliding windows pick mostly the same prompts and an embedding cache serves them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats as sps

# The refusal check's detector, so the refusal rate counts exactly the answers that check fails; evaluators.checks
# is cheap to import and imports nothing from shadowjudge.analysis.
from evaluators.checks import looks_like_refusal as is_refusal
from shadowjudge.analysis.stats import finite_values, ks_test, population_stability_index, rate_difference
from shadowjudge.config import DriftConfig


@dataclass(frozen=True)
class DriftResult:
    kind: str  # "input", "output" or "judge"
    metric: str
    target: str | None
    status: str  # "drift", "stable" or "nodata"
    statistic: str  # what `effect` is: auc, psi, rate_delta, agreement_drop
    effect: float | None
    threshold: float
    p_value: float | None
    n_reference: int
    n_current: int
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def drifted(self) -> bool:
        return self.status == "drift"

    def describe(self) -> str:
        who = f" of {self.target}" if self.target else ""
        if self.status == "nodata":
            return f"{self.kind} drift{who} ({self.metric}): no data ({self.note})"
        return (f"{self.kind} drift{who} ({self.metric}): {self.status}, {self.statistic} {self.effect:.3g} "
                f"(threshold {self.threshold:.3g}), p={self.p_value:.3g}, n={self.n_reference}/{self.n_current}"
                + (f"; {self.note}" if self.note else ""))


@dataclass
class DriftReport:
    route: str
    results: list[DriftResult]
    reference_window: str | None = None
    current_window: str | None = None

    @property
    def drifted(self) -> list[DriftResult]:
        return [r for r in self.results if r.drifted]

    def to_dict(self) -> dict[str, Any]:
        from shadowjudge.analysis.regression import json_safe

        return json_safe({**asdict(self), "drifted": [f"{r.kind}:{r.metric}:{r.target or '-'}" for r in self.drifted]})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftReport:
        """The inverse of `to_dict`: stages hand reports to each other as JSON."""
        return cls(data["route"], [DriftResult(**r) for r in data["results"]], data.get("reference_window"),
                   data.get("current_window"))


def _nodata(kind: str, metric: str, target: str | None, statistic: str, threshold: float, n_ref: int, n_cur: int,
            note: str) -> DriftResult:
    return DriftResult(kind, metric, target, "nodata", statistic, None, threshold, None, n_ref, n_cur, note=note)


TYPICAL_EXAMPLES = 5

# --- input drift -----------------------------------------------------------------------------------------------

def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices: all of them, or `limit` drawn without replacement."""
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, size=limit, replace=False))


def stable_subsample(texts: Sequence[str], limit: int) -> np.ndarray:
    """Row indices: all of them, or the `limit` texts with the smallest hashes: a random sample as far as the
    texts' content goes, and one that barely changes when a window slides by a few texts. The k-th copy of a
    repeated text hashes with k, so repeats are kept in proportion, not all or none (a window's common prompts
    would otherwise vanish from a large window's sample and stay in a small one's, which reads as drift)."""
    if len(texts) <= limit:
        return np.arange(len(texts))
    seen: dict[str, int] = {}

    def key(text: str) -> int:
        k = seen[text] = seen.get(text, -1) + 1
        return int.from_bytes(hashlib.blake2b(f"{k}\x00{text}".encode(), digest_size=8).digest(), "big")

    keys = np.fromiter((key(t) for t in texts), dtype=np.uint64, count=len(texts))
    return np.sort(np.argsort(keys, kind="stable")[:limit])


def _auc_from_ranks(ranks: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AUC (Mann-Whitney U / n1 n0) of each row of the boolean `positives` matrix."""
    n1 = positives.sum(axis=-1)
    n0 = positives.shape[-1] - n1
    return ((positives * ranks).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def domain_classifier_test(reference: np.ndarray, current: np.ndarray, permutations: int = 500,
                           seed: int = 0) -> tuple[float, float, np.ndarray]:
    """AUC of a classifier that tells current from reference on held-out data, its permutation p-value, and the
    classifier's score of every current row (high: typical of what is new, the examples a person should read).

    Trained on a stratified half, scored on the other half: the held-out scores do not depend on the held-out
    labels, so under no drift every labelling of them is equally likely and permuting labels gives an exact null.
    """
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    ref_idx, cur_idx = rng.permutation(len(reference)), rng.permutation(len(current))
    r_half, c_half = len(reference) // 2, len(current) // 2
    x_train = np.vstack([reference[ref_idx[:r_half]], current[cur_idx[:c_half]]])
    y_train = np.r_[np.zeros(r_half), np.ones(c_half)]
    x_test = np.vstack([reference[ref_idx[r_half:]], current[cur_idx[c_half:]]])
    y_test = np.r_[np.zeros(len(reference) - r_half), np.ones(len(current) - c_half)].astype(bool)
    model = LogisticRegression(C=1.0, max_iter=300, class_weight="balanced")
    model.fit(x_train, y_train)
    ranks = sps.rankdata(model.decision_function(x_test))
    auc = float(_auc_from_ranks(ranks, y_test[None, :])[0])
    null = _auc_from_ranks(ranks, rng.permuted(np.tile(y_test, (permutations, 1)), axis=1))
    p = (1 + int((null >= auc).sum())) / (permutations + 1)
    return auc, p, model.decision_function(current)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def mmd_permutation_test(reference: np.ndarray, current: np.ndarray, permutations: int = 500,
                         seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD (RBF kernel, median-heuristic bandwidth) and its permutation p-value.

    Returns MMD itself (the square root of the unbiased MMD^2, 0 when that is negative), so the effect reads in
    kernel units. All permutations are evaluated at once as K @ indicator-matrix.
    """
    rng = np.random.default_rng(seed)
    pooled = np.vstack([reference, current]).astype(np.float64)
    n, big_n = len(reference), len(pooled)
    m = big_n - n
    d2 = _sq_distances(pooled, pooled)
    off = d2[np.triu_indices(big_n, k=1)]
    bandwidth2 = float(np.median(off)) or 1.0
    kernel = np.exp(-d2 / bandwidth2)

    row_sums = kernel.sum(1)[:, None]

    def mmd2(is_ref: np.ndarray) -> np.ndarray:  # is_ref: (N, B) indicator columns
        a = is_ref.astype(np.float64)
        b = 1.0 - a
        ka = kernel @ a
        kb = row_sums - ka  # kernel @ b without a second product
        s_xx = (a * ka).sum(0) - n  # minus the diagonal (k(x, x) = 1)
        s_xy = (b * ka).sum(0)
        s_yy = (b * kb).sum(0) - m
        return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2 * s_xy / (n * m)

    observed = float(mmd2(np.r_[np.ones(n, bool), np.zeros(m, bool)][:, None])[0])
    base = np.r_[np.ones(n, bool), np.zeros(m, bool)]
    null = np.concatenate([mmd2(rng.permuted(np.tile(base, (b, 1)), axis=1).T)
                           for b in _chunks(permutations, 100)])
    p = (1 + int((null >= observed).sum())) / (permutations + 1)
    return math.sqrt(max(observed, 0.0)), p


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def input_drift(reference: np.ndarray | Sequence[str], current: np.ndarray | Sequence[str], config: DriftConfig,
                seed: int = 0, embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> DriftResult:
    """Has the prompt distribution moved? MMD OR the domain classifier, each past its effect size and significant at
    its share of alpha (weighted Bonferroni: together they alarm falsely at most `alpha` of the time).

    `reference` and `current` are embeddings, or prompt texts with `embed` (then only the subsample is embedded).
    """
    n_ref, n_cur = len(reference), len(current)
    if min(n_ref, n_cur) < config.min_samples:
        return _nodata("input", "prompt_embeddings", None, "auc", config.min_auc, n_ref, n_cur,
                       f"{min(n_ref, n_cur)} prompts in a window, {config.min_samples} needed")
    rng = np.random.default_rng(seed)
    if embed is None:
        ref_rows = _subsample(n_ref, config.max_embeddings, rng)
        cur_rows = _subsample(n_cur, config.max_embeddings, rng)
        ref_c = np.asarray(reference, dtype=np.float32)[ref_rows]
        cur_c = np.asarray(current, dtype=np.float32)[cur_rows]
    else:
        ref_rows = stable_subsample(reference, config.max_embeddings)
        cur_rows = stable_subsample(current, config.max_embeddings)
        ref_c = np.asarray(embed([reference[i] for i in ref_rows]), dtype=np.float32)
        cur_c = np.asarray(embed([current[i] for i in cur_rows]), dtype=np.float32)
    auc, auc_p, current_scores = domain_classifier_test(ref_c, cur_c, config.permutations, seed)
    ref_m = ref_c[_subsample(len(ref_c), config.max_mmd_samples, rng)]
    cur_m = cur_c[_subsample(len(cur_c), config.max_mmd_samples, rng)]
    mmd, mmd_p = mmd_permutation_test(ref_m, cur_m, config.permutations, seed)
    typical = [int(cur_rows[i]) for i in np.argsort(-current_scores)[:TYPICAL_EXAMPLES]]
    alpha_mmd = config.alpha * config.mmd_alpha_share
    by_classifier = auc_p < config.alpha - alpha_mmd and auc >= config.min_auc
    by_mmd = mmd_p < alpha_mmd and mmd >= config.min_mmd
    status = "drift" if by_classifier or by_mmd else "stable"
    note = " and ".join(n for n, hit in (("domain classifier", by_classifier), ("MMD", by_mmd)) if hit)
    return DriftResult("input", "prompt_embeddings", None, status, "auc", auc, config.min_auc, min(auc_p, mmd_p),
                       n_ref, n_cur, {"auc": auc, "auc_p": auc_p, "mmd": mmd, "mmd_p": mmd_p,
                                      "min_mmd": config.min_mmd, "classifier_samples": [len(ref_c), len(cur_c)],
                                      "mmd_samples": [len(ref_m), len(cur_m)], "typical_current_rows": typical},
                       f"detected by {note}" if note else "")


# --- output drift ----------------------------------------------------------------------------------------------

@dataclass
class OutputWindow:
    """One model's answers in a window: texts (None for a failed request), judge scores, format checks."""

    texts: list[str | None]
    scores: list[float] = field(default_factory=list)
    format_ok: list[bool] = field(default_factory=list)  # only the answers a format applies to


def _distribution_drift(metric: str, target: str | None, reference: Sequence[float], current: Sequence[float],
                        config: DriftConfig, alpha: float) -> DriftResult:
    ref, cur = finite_values(reference), finite_values(current)  # counted as the tests below see them
    if min(len(ref), len(cur)) < config.min_samples:
        return _nodata("output", metric, target, "psi", config.max_psi, len(ref), len(cur),
                       f"{min(len(ref), len(cur))} values in a window, {config.min_samples} needed")
    psi = population_stability_index(ref, cur)
    ks, p = ks_test(ref, cur)
    status = "drift" if p < alpha and psi >= config.max_psi else "stable"
    return DriftResult("output", metric, target, status, "psi", psi, config.max_psi, p, len(ref), len(cur),
                       {"ks": ks, "reference_median": float(np.median(ref)), "current_median": float(np.median(cur))})


def _rate_drift(metric: str, target: str | None, ref: Sequence[bool], cur: Sequence[bool], config: DriftConfig,
                alpha: float) -> DriftResult:
    if min(len(ref), len(cur)) < config.min_samples:
        return _nodata("output", metric, target, "rate_delta", config.max_rate_delta, len(ref), len(cur),
                       f"{min(len(ref), len(cur))} answers in a window, {config.min_samples} needed")
    delta, p = rate_difference(ref, cur)
    status = "drift" if p < alpha and abs(delta) >= config.max_rate_delta else "stable"
    return DriftResult("output", metric, target, status, "rate_delta", delta, config.max_rate_delta, p, len(ref),
                       len(cur), {"reference_rate": float(np.mean(ref)), "current_rate": float(np.mean(cur))})


def output_drift(reference: OutputWindow, current: OutputWindow, config: DriftConfig,
                 target: str | None = None) -> list[DriftResult]:
    """Length, refusal rate, format-compliance rate and judge-score distribution of one model, window to window.

    The four checks share `alpha` (Bonferroni); lengths are in characters of the answers that arrived.
    """
    alpha = config.alpha / 4
    ref_texts = [t for t in reference.texts if t is not None]
    cur_texts = [t for t in current.texts if t is not None]
    cur_refusals = [is_refusal(t) for t in cur_texts]
    refusal = _rate_drift("refusal_rate", target, [is_refusal(t) for t in ref_texts], cur_refusals, config, alpha)
    examples = [{"text": t[:1000]} for t, r in zip(cur_texts, cur_refusals, strict=True) if r][:TYPICAL_EXAMPLES]
    return [
        _distribution_drift("length", target, [len(t) for t in ref_texts], [len(t) for t in cur_texts], config, alpha),
        replace(refusal, details={**refusal.details, "examples": examples}) if refusal.status != "nodata" else refusal,
        _rate_drift("format_compliance", target, reference.format_ok, current.format_ok, config, alpha),
        _distribution_drift("judge_score", target, reference.scores, current.scores, config, alpha),
    ]


# --- judge drift -----------------------------------------------------------------------------------------------

def judge_drift(reference: Sequence[float | bool], current: Sequence[float | bool], config: DriftConfig,
                target: str | None = None) -> DriftResult:
    """Has the judge's agreement with its teacher fallen? Values in [0, 1] per calibration pair (booleans work).

    One-sided Mann-Whitney (tie-corrected, so 0/1 agreement works too) for 'current is lower', and the drop in
    mean agreement as the effect size.
    """
    ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if min(len(ref), len(cur)) < config.min_samples:
        return DriftResult("judge", "teacher_agreement", target, "nodata", "agreement_drop", None,
                           config.max_agreement_drop, None, len(ref), len(cur),
                           note=f"{min(len(ref), len(cur))} calibration pairs in a window, {config.min_samples} needed")
    drop = float(ref.mean() - cur.mean())
    if np.ptp(np.r_[ref, cur]) == 0:
        p = 1.0
    else:
        p = float(sps.mannwhitneyu(cur, ref, alternative="less", method="asymptotic").pvalue)
    status = "drift" if p < config.alpha and drop >= config.max_agreement_drop else "stable"
    return DriftResult("judge", "teacher_agreement", target, status, "agreement_drop", drop,
                       config.max_agreement_drop, p, len(ref), len(cur),
                       {"reference_agreement": float(ref.mean()), "current_agreement": float(cur.mean())})
