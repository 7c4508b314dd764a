"""How well a judge agrees with the big judge, per pair and per model, next to the 'longest answer wins' baseline.

Big judges prefer longer answers, so agreement alone flatters a length detector: the figures that show a judge
learned more than length are agreement on length-balanced pairs and the ranking of models by length-controlled
win rate.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import spearmanr

BALANCED_RATIO = (0.67, 1.5)


@dataclass(frozen=True)
class PairMetrics:
    n: int
    agreement: float
    n_balanced: int
    balanced_agreement: float
    prefers_longer: float
    log_loss: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def pair_metrics(predicted: Sequence[float], labels: Sequence[float],
                 len_a: Sequence[int], len_b: Sequence[int]) -> PairMetrics:
    """Agreement of P(b better) with soft labels; label ties (p = 0.5) do not count towards agreement."""
    pred = np.asarray(predicted, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.float64)
    la, lb = np.asarray(len_a, dtype=np.float64), np.asarray(len_b, dtype=np.float64)
    decided = np.abs(lab - 0.5) > 1e-9
    hits = (pred > 0.5) == (lab > 0.5)
    ratio = lb / np.maximum(la, 1.0)
    balanced = decided & (ratio >= BALANCED_RATIO[0]) & (ratio <= BALANCED_RATIO[1])
    differ = la != lb
    picks_longer = (pred > 0.5) == (lb > la)
    clipped = np.clip(pred, 1e-6, 1 - 1e-6)
    log_loss = -np.mean(lab * np.log(clipped) + (1 - lab) * np.log(1 - clipped)) if len(pred) else float("nan")
    return PairMetrics(
        n=int(decided.sum()),
        agreement=_mean(hits[decided]),
        n_balanced=int(balanced.sum()),
        balanced_agreement=_mean(hits[balanced]),
        prefers_longer=_mean(picks_longer[differ]),
        log_loss=float(log_loss),
    )


def longest_wins(len_a: Sequence[int], len_b: Sequence[int]) -> np.ndarray:
    """The baseline judge: P(b better) = 1 if b is longer, 0 if shorter, 0.5 on a tie."""
    la, lb = np.asarray(len_a), np.asarray(len_b)
    return np.where(lb > la, 1.0, np.where(lb < la, 0.0, 0.5))


@dataclass(frozen=True)
class SystemMetrics:
    n_models: int
    spearman_win_rate: float
    spearman_lc_win_rate: float
    win_rates: dict[str, float]
    # 95% intervals from resampling the models (a Spearman over ten models moves a lot with which ten they are),
    # and how well the leaderboard's own two columns agree on these models: a judge that reproduced win_rate
    # exactly would score this against lc_win_rate.
    spearman_win_rate_ci95: tuple[float, float] = (float("nan"), float("nan"))
    spearman_lc_win_rate_ci95: tuple[float, float] = (float("nan"), float("nan"))
    leaderboard_win_rate_vs_lc: float = float("nan")

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}n_models": float(self.n_models), f"{prefix}spearman_win_rate": self.spearman_win_rate,
               f"{prefix}spearman_lc_win_rate": self.spearman_lc_win_rate,
               f"{prefix}leaderboard_win_rate_vs_lc": self.leaderboard_win_rate_vs_lc}
        for name, (low, high) in (("spearman_win_rate", self.spearman_win_rate_ci95),
                                  ("spearman_lc_win_rate", self.spearman_lc_win_rate_ci95)):
            out[f"{prefix}{name}_ci95_low"], out[f"{prefix}{name}_ci95_high"] = low, high
        return out


def system_metrics(win_rates: Mapping[str, float], leaderboard: Mapping[str, object], *,
                   bootstrap: int = 1000, seed: int = 0) -> SystemMetrics:
    """Spearman of judged win rates (vs the reference) with the leaderboard's win_rate and lc_win_rate, with
    percentile intervals over `bootstrap` resamples of the models (0: none)."""
    models = [m for m in sorted(win_rates) if m in leaderboard]
    judged = [win_rates[m] for m in models]
    wr = [getattr(leaderboard[m], "win_rate") for m in models]
    lc_models = [m for m in models if getattr(leaderboard[m], "lc_win_rate") is not None]
    lc = [getattr(leaderboard[m], "lc_win_rate") for m in lc_models]
    lc_judged = [win_rates[m] for m in lc_models]
    return SystemMetrics(
        n_models=len(models),
        spearman_win_rate=_spearman(judged, wr),
        spearman_lc_win_rate=_spearman(lc_judged, lc),
        win_rates={m: float(win_rates[m]) for m in models},
        spearman_win_rate_ci95=_bootstrap_spearman(judged, wr, bootstrap, seed),
        spearman_lc_win_rate_ci95=_bootstrap_spearman(lc_judged, lc, bootstrap, seed),
        leaderboard_win_rate_vs_lc=_spearman([getattr(leaderboard[m], "win_rate") for m in lc_models], lc),
    )


def _bootstrap_spearman(x: Sequence[float], y: Sequence[float], n: int, seed: int) -> tuple[float, float]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if n <= 0 or len(x) < 3:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples with too few distinct models: nan, dropped below
        rhos = [_spearman(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(n))]
    rhos = [r for r in rhos if np.isfinite(r)]  # a resample of one repeated model has no ranking
    if not rhos:
        return float("nan"), float("nan")
    low, high = np.percentile(rhos, [2.5, 97.5])
    return float(low), float(high)


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return float("nan")
    rho = spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def _mean(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else float("nan")
