"""The triage bundle: a reproduce command that reruns the alerting cycle, a run link without credentials, and for
a regression on metric `checks` the answers that fail the route's checks, with their names."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from sqlalchemy import select, update

from shadowjudge.alerts.findings import Finding, regression_findings
from shadowjudge.alerts.triage import build_bundle
from shadowjudge.analysis import Classification, RunAnalysis, analyze_run
from shadowjudge.config import RedactionConfig, RouteConfig
from shadowjudge.cycle import cycle_run_key
from shadowjudge.store import ShadowResult, ShadowRun, TrafficSample, session_scope
from shadowjudge.tracking import mlflow_tracking
from shadowjudge.traffic.redaction import Redactor
from test_analysis_alpaca_runs import PROFILES, Profile, build_run, route_for

REDACTOR = Redactor.from_config(RedactionConfig())


def _finding(run_id: int | None) -> Finding:
    return Finding("regression", "critical", "chat", "c", "quality", None, 0.8, 0.7, 0.9, "m", None, run_id,
                   f"run:{run_id}")


def test_the_reproduce_command_reruns_the_alerting_cycle_not_a_new_one(engine):
    with session_scope(engine) as s:
        run = ShadowRun(run_key=cycle_run_key("chat", "20261101T0930Z"), route="chat", config_hash="t")
        s.add(run)
        s.flush()
        run_id = run.id
    bundle = build_bundle(engine, _finding(run_id), route_for(["c"]), None, "configs/prod.yaml", 5, REDACTOR)
    assert bundle["reproduce"] == ("shadowjudge run --config configs/prod.yaml --route chat "
                                   "--cycle-id 20261101T0930Z")
    assert bundle["cycle_id"] == "20261101T0930Z" and bundle["run_key"] == "chat:20261101T0930Z"
    assert "golden cases" in bundle["reproduce_note"] and "ingests new traffic" in bundle["reproduce_note"]
    # a finding outside any cycle has nothing to rerun: no command that would start a new cycle
    bundle = build_bundle(engine, _finding(None), route_for(["c"]), None, "configs/prod.yaml", 5, REDACTOR)
    assert bundle["reproduce"] is None and bundle["cycle_id"] is None


@pytest.mark.parametrize(("tracking_uri", "ui_url", "link"), [
    ("http://alice:s3cr3t@mlflow.local:5000", None, "http://mlflow.local:5000/#/experiments/3/runs/abc"),
    ("https://bob@mlflow.local/", None, "https://mlflow.local/#/experiments/3/runs/abc"),
    ("http://alice:s3cr3t@mlflow.local", "https://u:p@ui.local/ml", "https://ui.local/ml/#/experiments/3/runs/abc"),
    ("http://mlflow.local", None, "http://mlflow.local/#/experiments/3/runs/abc"),
    ("sqlite:///m.db", None, "mlflow-run://3/abc"),
])
def test_the_run_link_drops_credentials_and_stays_clickable(monkeypatch, tracking_uri, ui_url, link):
    experiment = SimpleNamespace(experiment_id="3")
    monkeypatch.setattr(mlflow_tracking, "_client",
                        lambda uri: SimpleNamespace(get_experiment_by_name=lambda name: experiment))
    assert mlflow_tracking.run_link(tracking_uri, ui_url, "shadowjudge", "chat", "abc") == link


SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}
CHECKS = [{"kind": "json", "schema": SCHEMA},
          {"kind": "regex", "pattern": "TODO-MARKER", "must_match": False, "name": "no_todo"}]


def _rewrite_answers(engine, run_id: int, candidate_fails, incumbent_fails) -> None:
    """Every replayed answer as {"answer": text}; where `candidate_fails(sid)` (or `incumbent_fails`) names 'json'
    the answer stays plain text, where it names 'no_todo' it opens with a forbidden marker."""
    with session_scope(engine) as s:
        rows = s.execute(select(ShadowResult.sample_id, ShadowResult.target, ShadowResult.output_text)
                         .where(ShadowResult.run_id == run_id, ShadowResult.output_text.is_not(None))).all()
        for sid, target, text in rows:
            fails = (incumbent_fails if target == "incumbent" else candidate_fails)(sid)
            text = "TODO-MARKER " + text if "no_todo" in fails else text
            s.execute(update(ShadowResult).where(ShadowResult.run_id == run_id, ShadowResult.sample_id == sid,
                                                 ShadowResult.target == target)
                      .values(output_text=text if "json" in fails else json.dumps({"answer": text})))


def _with_checks(route: RouteConfig, **criteria) -> RouteConfig:
    """The route with CHECKS, its criteria as written (so `checks` becomes critical) plus `criteria`."""
    data = route.model_dump()
    written = {k: data["criteria"][k] for k in route.criteria.model_fields_set}
    return RouteConfig.model_validate({**data, "checks": CHECKS, "criteria": {**written, **criteria}})


def _expected(sample_ids, candidate_fails, incumbent_fails) -> list[tuple[int, list[str], list[str]]]:
    """The samples whose candidate answer fails more checks than the incumbent's, most newly failed checks first."""
    rows = [(sid, candidate_fails(sid), incumbent_fails(sid)) for sid in sample_ids]
    rows = [r for r in rows if len(r[1]) > len(r[2])]
    return sorted(rows, key=lambda r: (-len(set(r[1]) - set(r[2])), len(r[2]) - len(r[1]), r[0]))


def test_a_checks_alert_shows_the_answers_that_fail_a_check_with_their_names(engine):
    """A candidate that drops the JSON on 40% of its answers (and writes a forbidden marker into a few): its
    `checks` alert shows exactly those answers, the ones failing both checks first, each naming the checks either
    side failed, not the judge's worst pairs; its other alerts keep the judge's worst pairs."""
    def candidate_fails(sid: int) -> list[str]:
        return [name for name, fails in (("json", sid % 5 in (0, 1)), ("no_todo", sid % 50 in (0, 7))) if fails]

    def incumbent_fails(sid: int) -> list[str]:
        # where both drop the JSON (1, 5, 6), or each fails one check (7), the candidate is no worse
        return ["json"] if sid % 13 == 0 or sid < 8 else []

    profiles = {**PROFILES, "FuseChat-Gemma-2-9B-Instruct": Profile(250, 6, 2.0, error_rate=0.2)}
    run_id = build_run(engine, run_key="chat:c1", incumbent="claude-2", profiles=profiles,
                       candidates={"c": "FuseChat-Gemma-2-9B-Instruct"})
    _rewrite_answers(engine, run_id, candidate_fails, incumbent_fails)
    route = _with_checks(route_for(["c"]))
    analysis = analyze_run(engine, run_id, route)
    candidate = analysis.candidate("c")
    assert candidate.metric("checks").classification is Classification.FAIL
    assert candidate.metric("error_rate").classification is Classification.FAIL
    findings = {f.metric: f for f in regression_findings(analysis, route) if f.slice is None}

    with session_scope(engine) as s:
        answered = s.scalars(select(ShadowResult.sample_id).where(
            ShadowResult.run_id == run_id, ShadowResult.target == "c", ShadowResult.error_class.is_(None))).all()
    expected = _expected(sorted(answered), candidate_fails, incumbent_fails)
    assert len(expected[0][1]) == 2 and len(expected[-1][1]) == 1
    examples = build_bundle(engine, findings["checks"], route, None, None, 10, REDACTOR)["examples"]
    assert [(e["sample_id"], e["candidate_failed_checks"], e["incumbent_failed_checks"]) for e in examples] == \
        expected[:10]
    assert not {1, 5, 6, 7} & {e["sample_id"] for e in examples}
    assert {"prompt", "incumbent_answer", "candidate_answer", "candidate_score", "preference"} <= set(examples[0])
    assert all("TODO-MARKER" in e["candidate_answer"] for e in examples if "no_todo" in e["candidate_failed_checks"])
    # The bundle is stored as JSON: the check names survive the round trip.
    assert json.loads(json.dumps(examples)) == examples

    # Another metric's alert keeps its examples: the candidate's errors and the judge's worst pairs, no check names.
    errors = build_bundle(engine, findings["error_rate"], route, None, None, 10, REDACTOR)["examples"]
    assert [e["sample_id"] for e in errors] == candidate.worst_sample_ids[:10]
    assert errors and all("candidate_failed_checks" not in e for e in errors)

    # An analysis stored before check failures were kept: the checks alert shows the judge's worst pairs, not none.
    stored = analysis.to_dict()
    for c in stored["candidates"]:
        for part in [c, *c["slices"]]:
            part.pop("check_failures")
    old = {f.metric: f for f in regression_findings(RunAnalysis.from_dict(stored), route) if f.slice is None}
    assert old["checks"].sample_ids == candidate.worst_sample_ids and old["checks"].sample_ids


def test_a_slices_checks_alert_shows_only_that_slices_failing_answers(engine):
    """The JSON breaks on half the koala prompts (the slice fails) and on a few oasst prompts, where the answers
    also fail the marker check; the koala alert shows koala's answers only, though oasst's fail more checks."""
    run_id = build_run(engine, run_key="chat:c2", incumbent="claude-2", profiles=PROFILES,
                       candidates={"c": "claude-2"}, datasets={"koala", "oasst", "helpful_base"})
    with session_scope(engine) as s:
        task = {sid: meta["task"] for sid, meta in s.execute(select(TrafficSample.id, TrafficSample.meta)).all()}

    def candidate_fails(sid: int) -> list[str]:
        if task[sid] == "koala":
            return ["json"] if sid % 2 == 0 else []
        return ["json", "no_todo"] if task[sid] == "oasst" and sid % 19 == 0 else []

    _rewrite_answers(engine, run_id, candidate_fails, lambda sid: [])
    route = _with_checks(route_for(["c"]), max_check_failure_delta=0.1)
    analysis = analyze_run(engine, run_id, route)
    findings = [f for f in regression_findings(analysis, route) if f.metric == "checks"]
    assert [f.slice for f in findings] == ["task=koala"]
    examples = build_bundle(engine, findings[0], route, None, None, 50, REDACTOR)["examples"]
    koala = sorted(sid for sid in task if task[sid] == "koala" and sid % 2 == 0)
    assert [(e["sample_id"], e["slice"]) for e in examples] == [(sid, "koala") for sid in koala[:10]]
    assert all(e["candidate_failed_checks"] == ["json"] and e["incumbent_failed_checks"] == [] for e in examples)
    assert task[analysis.candidate("c").check_failures[0].sample_id] == "oasst"  # they lead the overall examples
