"""The per-sample table a cycle logs to MLflow: its slice column is the route's slice_key, and its texts are
redacted with the config's settings (the candidates' answers are stored as the models returned them)."""

from __future__ import annotations

from sqlalchemy import select, update
from test_analysis_alpaca_runs import build_run, route_for

from shadowjudge.config import RedactionConfig
from shadowjudge.cycle import samples_table
from shadowjudge.store import ShadowResult, TrafficSample, session_scope
from shadowjudge.traffic.redaction import Redactor

LEAK = "mail jane.doe@example.com or call +1 415 555 0100 about TICKET-4242"


def _run_with_pii(engine) -> int:
    run_id = build_run(engine, run_key="r", incumbent="claude-2", candidates={"a": "claude-2"})
    with session_scope(engine) as s:
        first = s.scalar(select(ShadowResult.sample_id).where(ShadowResult.run_id == run_id, ShadowResult.target == "a")
                         .order_by(ShadowResult.sample_id).limit(1))
        s.execute(update(ShadowResult).where(ShadowResult.run_id == run_id, ShadowResult.target == "a",
                                             ShadowResult.sample_id == first).values(output_text=LEAK))
        for sample in s.scalars(select(TrafficSample)):
            sample.meta = {**(sample.meta or {}), "tenant": f"tenant-{sample.id % 3}"}
    return run_id


def _candidate_answers(table: dict) -> list[str]:
    return [text for text, target in zip(table["candidate_answer"], table["target"], strict=True) if target == "a"]


def test_the_logged_table_redacts_answers_with_the_configs_settings(engine):
    run_id = _run_with_pii(engine)
    route = route_for(["a"], slice_key="tenant")
    config = RedactionConfig(extra_patterns={"ticket": r"TICKET-\d+"})
    table = samples_table(engine, run_id, None, route, Redactor.from_config(config), limit=100_000)
    answers = " ".join(_candidate_answers(table))
    assert "jane.doe@example.com" not in answers and "555 0100" not in answers and "TICKET-4242" not in answers
    assert "[EMAIL]" in answers and "[PHONE]" in answers and "[TICKET]" in answers
    off = samples_table(engine, run_id, None, route, Redactor.from_config(RedactionConfig(enabled=False)),
                        limit=100_000)
    assert LEAK in _candidate_answers(off)


def test_the_logged_tables_slice_column_is_the_routes_slice_key(engine):
    run_id = _run_with_pii(engine)
    redactor = Redactor.from_config(RedactionConfig())
    by_tenant = samples_table(engine, run_id, None, route_for(["a"], slice_key="tenant"), redactor)
    assert set(by_tenant["slice"]) == {"tenant-0", "tenant-1", "tenant-2"}
    unsliced = samples_table(engine, run_id, None, route_for(["a"], slice_key=None), redactor)
    assert set(unsliced["slice"]) == {""}
