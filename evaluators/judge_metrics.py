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
from scipy.optimize import minimize
from scipy.stats import spearmanr

from shadowjudge.analysis.stats import length_feature

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
class ReferenceComparisons:
    """Each model judged against the reference prompt by prompt: what its system-level win rates are made of."""

    preferences: dict[str, dict[str, float]]  # model -> prompt id -> P(model's answer beats the reference's)
    length_deltas: dict[str, dict[str, float]]  # model -> prompt id -> len(model's answer) - len(reference's)

    def win_rates(self) -> dict[str, float]:
        """Percent, the mean preference over the model's prompts."""
        return {m: 100 * float(np.mean(list(p.values()))) for m, p in self.preferences.items() if p}

    def longest_answer_wins(self) -> ReferenceComparisons:
        """The 'longest answer wins' baseline on the same prompts: it needs nothing but the length differences."""
        return ReferenceComparisons(
            {m: dict(zip(d, longest_wins(np.zeros(len(d)), list(d.values())).tolist()))
             for m, d in self.length_deltas.items()},
            self.length_deltas)

    def length_controlled_win_rates(self) -> dict[str, float]:
        """Percent, as AlpacaEval 2.0 computes its lc_win_rate from a judge's preferences (Dubois et al. 2024).

        Per model, a logistic GLM on the soft preferences with an intercept, tanh(length difference / its standard
        deviation) and the prompt's difficulty, then the predicted preference with the length term at zero, averaged
        over prompts. AlpacaEval fits difficulty once over many models; here it is the mean logit of the same
        judge's preferences on each prompt over the models given (left out below three models, where it would mostly
        echo the model itself)."""
        models = [m for m, p in self.preferences.items() if p]
        difficulty: dict[str, float] = {}
        if len(models) >= 3:
            per_prompt: dict[str, list[float]] = {}
            for m in models:
                for pid, p in self.preferences[m].items():
                    per_prompt.setdefault(pid, []).append(_logit(p))
            difficulty = {pid: float(np.mean(v)) for pid, v in per_prompt.items()}
        out = {}
        for m in models:
            pids = sorted(self.preferences[m])
            prefs = np.asarray([self.preferences[m][p] for p in pids], dtype=np.float64)
            delta = np.asarray([self.length_deltas[m][p] for p in pids], dtype=np.float64)
            hard = np.asarray([difficulty.get(p, 0.0) for p in pids])
            out[m] = 100 * _length_controlled_preference(prefs, delta, hard)
        return out

    def partly_length_controlled_win_rates(self, share: float = 0.5) -> dict[str, float]:
        """Percent, `share` of the way from the plain win rate to the length-controlled one.

        A try at one ranking for both leaderboard columns, which disagree wherever models differ in verbosity (on
        the ten `judge train --seed 0` holds out, Spearman 0.69). Cross-validated it loses more on win_rate than it
        gains on lc_win_rate, so nothing reports it but `judge_experiments` (README, "Tried and not kept")."""
        plain, controlled = self.win_rates(), self.length_controlled_win_rates()
        return {m: (1 - share) * plain[m] + share * controlled[m] for m in controlled}


def _length_controlled_preference(prefs: np.ndarray, delta: np.ndarray, difficulty: np.ndarray,
                                  l2: float = 1e-3) -> float:
    x = np.stack([np.ones_like(delta), length_feature(delta), difficulty], axis=1)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        value = np.mean(prefs * np.logaddexp(0, -z) + (1 - prefs) * np.logaddexp(0, z)) + l2 * (w @ w)
        return float(value), x.T @ (_sigmoid(z) - prefs) / len(z) + 2 * l2 * w

    w = minimize(loss, np.zeros(3), jac=True, method="L-BFGS-B").x
    return float(np.mean(_sigmoid(w[0] + w[2] * difficulty)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -z))


def _logit(p: float, clip: float = 0.02) -> float:
    p = min(max(p, clip), 1 - clip)
    return float(np.log(p / (1 - p)))


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
