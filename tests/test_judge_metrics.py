"""System-level figures: Spearman against the leaderboard, its interval over models, the leaderboard's own ceiling."""

from dataclasses import dataclass

import numpy as np
import pytest

from evaluators.judge_metrics import system_metrics


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
