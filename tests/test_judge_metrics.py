"""System-level figures: Spearman against the leaderboard, its interval over models, the leaderboard's own ceiling,
and length-controlled win rates computed the way AlpacaEval 2.0 computes its lc_win_rate."""

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import spearmanr

from evaluators.judge_metrics import ReferenceComparisons, system_metrics
from evaluators.preference_data import MINI_DATA as MINI
from evaluators.preference_data import load_preference_data


@dataclass
class Row:
    win_rate: float
    lc_win_rate: float | None


LEADERBOARD = {f"m{i}": Row(win_rate=float(i), lc_win_rate=float(i if i % 3 else 20 - i)) for i in range(12)}


def test_a_judge_that_reproduces_win_rate_is_exact_there_and_capped_by_the_leaderboard_on_lc():
    sm = system_metrics({m: r.win_rate for m, r in LEADERBOARD.items()}, LEADERBOARD)
    assert sm.n_models == 12 and sm.spearman_win_rate == 1.0
    assert sm.spearman_win_rate_ci95 == pytest.approx((1.0, 1.0))
    assert sm.spearman_lc_win_rate == sm.leaderboard_win_rate_vs_lc < 0.9


def test_the_interval_brackets_the_estimate_and_narrows_with_more_models():
    rng = np.random.default_rng(3)

    def noisy(n: int):
        board = {f"m{i}": Row(float(i), float(i)) for i in range(n)}
        return system_metrics({m: r.win_rate + rng.normal(0, n / 4) for m, r in board.items()}, board)

    small, large = noisy(10), noisy(60)
    for sm in (small, large):
        low, high = sm.spearman_win_rate_ci95
        assert -1 <= low <= sm.spearman_win_rate <= high <= 1
    assert np.diff(large.spearman_win_rate_ci95)[0] < np.diff(small.spearman_win_rate_ci95)[0]


def test_models_without_lc_rows_and_too_few_models():
    board = dict(LEADERBOARD, extra=Row(5.0, None))
    sm = system_metrics({m: 1.0 * i for i, m in enumerate(board)}, board, bootstrap=0)
    assert sm.n_models == 13 and np.isnan(sm.spearman_lc_win_rate_ci95[0])
    tiny = system_metrics({"m1": 1.0, "m2": 2.0}, LEADERBOARD)
    assert np.isnan(tiny.spearman_win_rate) and np.isnan(tiny.spearman_win_rate_ci95[1])
    assert set(tiny.as_dict("baseline_")) >= {"baseline_spearman_lc_win_rate_ci95_low", "baseline_n_models"}


def _length_biased_judge(quality: dict[str, float], verbosity: dict[str, float], prompts: int = 300, seed: int = 0):
    """A judge whose preference is the model's quality plus a strong pull towards the longer answer."""
    rng = np.random.default_rng(seed)
    prefs, deltas = {}, {}
    difficulty = rng.normal(0, 1, prompts)
    for m in quality:
        delta = rng.normal(verbosity[m], 400, prompts)
        z = quality[m] + 2.0 * np.tanh(delta / 500) - difficulty
        prefs[m] = {f"p{i}": float(v) for i, v in enumerate(1 / (1 + np.exp(-z)))}
        deltas[m] = {f"p{i}": float(d) for i, d in enumerate(delta)}
    return ReferenceComparisons(prefs, deltas)


def test_length_control_recovers_the_quality_order_that_verbosity_hides():
    quality = {f"m{i}": q for i, q in enumerate(np.linspace(-1.5, 1.5, 8))}
    verbosity = {m: 1200.0 * (7 - i) / 7 - 600 for i, m in enumerate(quality)}  # the worst are the wordiest
    judged = _length_biased_judge(quality, verbosity)
    truth = [quality[m] for m in quality]
    raw, lc = judged.win_rates(), judged.length_controlled_win_rates()
    rho_raw = spearmanr([raw[m] for m in quality], truth).statistic
    rho_lc = spearmanr([lc[m] for m in quality], truth).statistic
    assert rho_lc > 0.95 and rho_raw < 0.5, (rho_lc, rho_raw)


def test_the_half_length_controlled_win_rate_sits_between_the_two_orders():
    quality = {f"m{i}": q for i, q in enumerate(np.linspace(-1.5, 1.5, 8))}
    verbosity = {m: 1200.0 * (7 - i) / 7 - 600 for i, m in enumerate(quality)}
    judged = _length_biased_judge(quality, verbosity)
    raw, lc = judged.win_rates(), judged.length_controlled_win_rates()
    assert judged.partly_length_controlled_win_rates(0.0) == pytest.approx(raw)
    assert judged.partly_length_controlled_win_rates(1.0) == pytest.approx(lc)
    half = judged.partly_length_controlled_win_rates()
    assert half == pytest.approx({m: (raw[m] + lc[m]) / 2 for m in quality})
    assert all(min(raw[m], lc[m]) <= half[m] <= max(raw[m], lc[m]) for m in quality)


def test_equal_lengths_leave_the_win_rate_alone():
    judged = _length_biased_judge({"a": 0.5, "b": -0.5}, {"a": 0.0, "b": 0.0})
    zero = ReferenceComparisons(judged.preferences, {m: {p: 0.0 for p in d} for m, d in judged.length_deltas.items()})
    assert zero.length_controlled_win_rates() == pytest.approx(zero.win_rates(), abs=0.5)  # no difficulty term: 2 models


def test_gpt4_turbo_labels_give_back_the_published_lc_win_rates():
    """AlpacaEval's own labels through this GLM reproduce the leaderboard's lc_win_rate column (the demo subset: 300
    prompts of 11 models), so the judge's length-controlled figures are computed as the leaderboard's are."""
    data = load_preference_data(MINI)
    prefs: dict[str, dict[str, float]] = {}
    deltas: dict[str, dict[str, float]] = {}
    for p in data.pairs:
        prefs.setdefault(p.model_b, {})[p.prompt_id] = p.p_b_better
        deltas.setdefault(p.model_b, {})[p.prompt_id] = float(len(data.answer(p.prompt_id, p.model_b))
                                                              - len(data.answer(p.prompt_id, p.model_a)))
    lc = ReferenceComparisons(prefs, deltas).length_controlled_win_rates()
    board = {m: data.leaderboard[m].lc_win_rate for m in lc}
    assert len(lc) == 11
    assert np.mean([abs(lc[m] - board[m]) for m in lc]) < 4
    assert spearmanr([lc[m] for m in lc], [board[m] for m in lc]).statistic > 0.95
