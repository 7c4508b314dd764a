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


def _config(store_url: str, route: dict, max_samples: int | None = None) -> Config:
    return parse_config({"store": {"url": store_url}, "sources": [{"name": "l", "kind": "jsonl", "path": "/tmp"}],
                         "shadow": {"max_samples": max_samples}, "routes": [route]}, environ={})


def _log(engine, served_by: list[str]) -> list[int]:
    """Store one sample per model the gateway logged as serving it; their ids, in order."""
    with session_scope(engine) as s:
        first = s.scalar(select(func.count()).select_from(TrafficSample)) or 0
        samples = [TrafficSample(request_id=f"r{first + k}", source="s", source_position=str(first + k), route="chat",
                                 incumbent_model=model, messages=[], request_ts=utcnow())
                   for k, model in enumerate(served_by)]
        s.add_all(samples)
        s.flush()
        return [t.id for t in samples]


def _summary(engine, run_id: int) -> dict:
    with session_scope(engine) as s:
        return dict(s.get(ShadowRun, run_id).summary)


def test_samples_a_candidate_served_are_not_in_the_run_and_no_later_run_reads_them(store_url):
    """During a rollout the gateway serves part of the route with the candidate: its logged answers were taken as the
    incumbent's, so the candidate was compared with itself and a regression shrank as its weight grew. It is known
    by its model (with or without the provider prefix the gateway logs, in any case) or its name."""
    engine = get_engine(store_url)
    config = _config(store_url, ROUTE)
    ids = _log(engine, ["m1", "m2", "openai/m1", "openai/M2", "m1", "cand", "M1"])
    first = cycle.open_run(engine, config, config.routes[0], "c1")
    assert first.sample_ids == [ids[0], ids[2], ids[4], ids[6]]
    assert _summary(engine, first.run_id)["served_by_candidates"] == 3
    assert cycle.open_run(engine, config, config.routes[0], "c1").sample_ids == first.sample_ids  # resumed as it was

    last = _log(engine, ["m2", "m2"])[-1]  # only the candidate's: nothing to test, and the watermark moves past them
    second = cycle.open_run(engine, config, config.routes[0], "c2")
    assert second.sample_ids == [] and _summary(engine, second.run_id)["max_sample_id"] == last
    newer = _log(engine, ["m2", "m1"])
    assert cycle.open_run(engine, config, config.routes[0], "c3").sample_ids == [newer[1]]


def test_a_name_the_candidate_is_logged_under_marks_its_samples_too(store_url):
    """Providers log a dated version ('gpt-4o-2024-08-06' for 'gpt-4o'): the target's `logged_as` names it."""
    engine = get_engine(store_url)
    config = _config(store_url, {**ROUTE, "candidates": [{**ROUTE["candidates"][0], "logged_as": ["m2-0805"]}]})
    ids = _log(engine, ["m1", "m2-0805", "vendor/M2-0805", "m1-0805"])
    assert cycle.open_run(engine, config, config.routes[0], "c1").sample_ids == [ids[0], ids[3]]


def test_max_samples_counts_the_incumbents_samples_and_the_rest_wait_for_the_next_run(store_url):
    engine = get_engine(store_url)
    config = _config(store_url, ROUTE, max_samples=2)
    ids = _log(engine, ["m2", "m1", "m2", "m2", "m1", "m2", "m1", "m1"])
    runs = [cycle.open_run(engine, config, config.routes[0], f"c{k}") for k in range(3)]
    assert [r.sample_ids for r in runs] == [[ids[1], ids[4]], [ids[6], ids[7]], []]
    assert [_summary(engine, r.run_id)["served_by_candidates"] for r in runs] == [3, 1, 0]
    assert [_summary(engine, r.run_id)["max_sample_id"] for r in runs] == [ids[4], ids[7], ids[7]]


def test_a_candidate_serving_the_incumbents_model_marks_no_sample_as_its_own(store_url):
    """The same model from another provider: the logs cannot tell whose answer a sample is, so none is excluded."""
    engine = get_engine(store_url)
    route = {**ROUTE, "candidates": [{**ROUTE["candidates"][0], "model": "azure/m1", "logged_as": ["inc"]}]}
    config = _config(store_url, route)
    ids = _log(engine, ["m1", "openai/m1", "azure/M1", "inc"])
    assert cycle.open_run(engine, config, config.routes[0], "c1").sample_ids == ids
