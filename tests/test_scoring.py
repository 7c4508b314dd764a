"""The score stage against a real store: what a judge that gives no value for a pair leaves behind."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sqlalchemy import select

from shadowjudge.analysis.run_data import load_run_data
from shadowjudge.config import parse_config
from shadowjudge.scoring import score_run
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, get_engine, session_scope
from shadowjudge.store.models import utcnow

ROUTE = {"name": "chat", "incumbent": {"name": "inc", "model": "m1", "base_url": "http://127.0.0.1:9/v1"},
         "candidates": [{"name": "cand", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}]}


class HalfReadable:
    """A judge whose replies for answers containing 'garbled' cannot be read (an LLM judge answering in prose)."""

    version = "half-readable:1"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        self.calls += 1
        return [math.nan if "garbled" in a else 0.8 for a in answers]

    def compare(self, prompts: Sequence[str], incumbent: Sequence[str], candidate: Sequence[str]) -> list[float]:
        return [math.nan if "garbled" in c else 0.7 for c in candidate]


def test_a_pair_the_judge_gave_no_value_for_is_stored_without_one_not_as_a_middling_score(store_url):
    """An LLM judge's unreadable verdicts were stored as 0.5: the analysis read them as real scores."""
    engine = get_engine(store_url)
    route = parse_config({"store": {"url": store_url}, "sources": [{"name": "l", "kind": "jsonl", "path": "/tmp"}],
                          "routes": [ROUTE]}, environ={}).routes[0]
    with session_scope(engine) as s:
        samples = [TrafficSample(request_id=f"r{k}", source="s", source_position=str(k), route="chat",
                                 incumbent_model="m1", messages=[{"role": "user", "content": f"q{k}"}],
                                 response_text=f"incumbent answer {k}", request_ts=utcnow()) for k in range(4)]
        s.add_all(samples)
        s.flush()
        run = ShadowRun(run_key="chat:t", route="chat", kind="cycle", status="running", config_hash="x",
                        sample_ids=[t.id for t in samples], summary={})
        s.add(run)
        s.flush()
        run_id = run.id
        s.add_all(ShadowResult(run_id=run_id, sample_id=t.id, target="cand", model="m2", attempt=0, retries=0,
                               output_text="garbled" if k % 2 else f"candidate answer {k}")
                  for k, t in enumerate(samples))
    judge = HalfReadable()
    report = score_run(engine, run_id, judge, ["cand"])
    assert (report.judged, report.unreadable) == (4, 2)
    with session_scope(engine) as s:
        stored = s.execute(select(Judgment.candidate_score, Judgment.preference).order_by(Judgment.sample_id)).all()
    assert [tuple(r) for r in stored] == [(0.8, 0.7), (None, None), (0.8, 0.7), (None, None)]
    assert len(load_run_data(engine, run_id, route).judgments["cand"]) == 4
    calls = judge.calls
    again = score_run(engine, run_id, judge, ["cand"])  # a rerun asks nothing again: those pairs are judged
    assert (again.judged, again.already_judged, judge.calls) == (0, 4, calls)
