"""Opening a cycle's run when another process opens the same one at the same moment."""

from __future__ import annotations

from sqlalchemy import func, select

from shadowjudge import cycle
from shadowjudge.config import Config, parse_config
from shadowjudge.store import ShadowRun, TrafficSample, get_engine, session_scope
from shadowjudge.store.models import utcnow

ROUTE = {"name": "chat", "incumbent": {"name": "inc", "model": "m1", "base_url": "http://127.0.0.1:9/v1"},
         "candidates": [{"name": "cand", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}]}


def test_a_run_another_process_opened_meanwhile_is_resumed(store_url, monkeypatch):
    """A scheduled cycle and `shadowjudge run --cycle-id` of the same slot both found no run and both inserted it:
    the second crashed on the unique run key instead of resuming the first's run."""
    engine = get_engine(store_url)
    config = parse_config({"store": {"url": store_url}, "sources": [{"name": "l", "kind": "jsonl", "path": "/tmp"}],
                           "routes": [ROUTE]}, environ={})
    with session_scope(engine) as s:
        s.add(TrafficSample(request_id="r1", source="s", source_position="1", route="chat", incumbent_model="m",
                            messages=[], request_ts=utcnow()))
    fingerprint = Config.fingerprint
    others = []

    def other_process_opens_it_first(self):  # between our SELECT and our INSERT
        if not others:
            others.append(None)
            others[0] = cycle.open_run(engine, config, config.routes[0], "20261122T1000Z")
        return fingerprint(self)

    monkeypatch.setattr(Config, "fingerprint", other_process_opens_it_first)
    ours = cycle.open_run(engine, config, config.routes[0], "20261122T1000Z")
    theirs = others[0]
    assert (theirs.resumed, ours.resumed) == (False, True)
    assert (ours.run_id, ours.sample_ids) == (theirs.run_id, theirs.sample_ids)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ShadowRun)) == 1
