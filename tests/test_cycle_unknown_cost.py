"""Unknown costs and unbounded ratios on their way from a stored run to MLflow: an unpriced target's spend is
unknown (None), not $0 or a TypeError, and a cost per outcome JSON turned into null is logged as unbounded."""

from __future__ import annotations

import math

from sqlalchemy import update
from test_analysis_alpaca_runs import build_run, route_for

from shadowjudge.cycle import RunHandle, _candidate_metrics, stored_reports
from shadowjudge.store import ShadowResult, session_scope


def test_a_run_with_an_unpriced_target_reports_an_unknown_spend(engine):
    run_id = build_run(engine, run_key="r", incumbent="claude-2", candidates={"a": "claude-2"})
    with session_scope(engine) as s:
        s.execute(update(ShadowResult).where(ShadowResult.run_id == run_id, ShadowResult.target == "a")
                  .values(cost_usd=None))
    shadow = stored_reports(engine, route_for(["a"]), RunHandle(run_id, "r", [], resumed=True))["shadow"]
    assert shadow["spend_usd"] is None
    assert shadow["targets"]["a"]["spend_usd"] is None
    assert shadow["targets"]["incumbent"]["spend_usd"] > 0


def test_an_unbounded_cost_per_outcome_is_logged_as_infinite_and_nodata_as_nothing():
    metric = {"metric": "cost_per_outcome", "classification": "fail", "effect": None, "ci_low": None,
              "ci_high": None, "candidate_value": None, "incumbent_value": 0.002, "p_value": None}
    missing = {"metric": "ttft", "classification": "nodata", "effect": None, "ci_low": None, "ci_high": None}
    analysis = {"candidates": [{"target": "a", "verdict": "fail", "score": None, "n": 10, "n_judged": 10,
                                "metrics": [metric, missing]}]}
    out = _candidate_metrics(analysis, {}, "a")
    assert math.isinf(out["cost_per_outcome.effect"]) and math.isinf(out["cost_per_outcome.ci_high"])
    assert out["cost_per_outcome.incumbent_value"] == 0.002
    assert "cost_per_outcome.p_value" not in out and not any(k.startswith("ttft.") for k in out)
