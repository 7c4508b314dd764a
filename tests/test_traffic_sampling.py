"""Sampling: deterministic hash sampling, filters, stratified quotas with a floor, a daily cap held across runs."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from shadowjudge.config import RedactionConfig, SamplingConfig, parse_config
from shadowjudge.store import TrafficSample, get_engine, session_scope
from shadowjudge.traffic import TimeWindow, TrafficRecord, hash_fraction, ingest_sources
from shadowjudge.traffic.redaction import Redactor
from shadowjudge.traffic.sampling import Sampler

ROUTE = {"name": "chat-default", "incumbent": {"name": "inc", "model": "m1", "base_url": "http://127.0.0.1:9/v1"},
         "candidates": [{"name": "cand", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}]}
DAY = datetime(2026, 11, 22, tzinfo=timezone.utc)


def record(i: int, *, route: str = "chat-default", model: str = "m1", ts: datetime = DAY, **metadata) -> TrafficRecord:
    return TrafficRecord(request_id=f"req-{i}", timestamp=ts, route=route, incumbent_model=model,
                         messages=[{"role": "user", "content": f"question {i}"}], metadata=metadata)


def sampler(**config) -> Sampler:
    return Sampler(SamplingConfig(**config), Redactor.from_config(RedactionConfig()))


def test_hash_fraction_is_deterministic_uniform_and_seeded():
    values = [hash_fraction("s", f"req-{i}") for i in range(20_000)]
    assert values == [hash_fraction("s", f"req-{i}") for i in range(20_000)]
    assert all(0 <= v < 1 for v in values)
    assert abs(sum(v < 0.1 for v in values) / len(values) - 0.1) < 0.01
    assert hash_fraction("s", "req-1") != hash_fraction("other-seed", "req-1")


@settings(max_examples=200, deadline=None)
@given(request_id=st.text(min_size=1, max_size=40), low=st.floats(0.001, 1.0), high=st.floats(0.001, 1.0))
def test_a_request_sampled_at_a_rate_is_sampled_at_every_higher_rate(request_id, low, high):
    low, high = sorted((low, high))
    rec = TrafficRecord(request_id=request_id, timestamp=DAY, route="r", incumbent_model="m",
                        messages=[{"role": "user", "content": "x"}])
    if sampler(rate=low).hash_in(rec):
        assert sampler(rate=high).hash_in(rec)


def test_filters_on_window_route_model_and_metadata():
    s = sampler(routes=["chat-default"], models=["m1"], metadata_equals={"tenant": "acme"})
    window = TimeWindow(DAY, DAY + timedelta(days=1))
    assert s.screen(record(1, tenant="acme"), window) is None
    assert s.screen(record(1, tenant="acme", ts=DAY - timedelta(seconds=1)), window) == "outside_window"
    assert s.screen(record(1, route="other", tenant="acme"), window) == "route"
    assert s.screen(record(1, model="m9", tenant="acme"), window) == "model"
    assert s.screen(record(1, tenant="globex"), window) == "metadata"
    assert s.screen(record(1), window) == "metadata"


@pytest.mark.parametrize("expected, logged, kept", [
    (True, True, True), (True, "true", True), (True, "True", True), (True, False, False), (True, 1, False),
    (False, False, True), (False, None, False), (False, 0, False),
    ("true", True, True), ("True", True, True), ("false", False, True), ("true", "True", False),
    (1, 1, True), (1, 1.0, True), (1, "1", True), (1, True, False), (1.5, "1.5", True), (2, 2.5, False),
    ("1", 1, True), ("1.0", 1, True), ("0123", 123, False), ("0123", "0123", True),
    ("acme", "acme", True), ("acme", "Acme", False), ("acme", ["acme"], False), ("7", "7.0", False),
    (None, None, True), (None, "missing", True), (None, "x", False), ("None", None, False), ("x", "missing", False),
])
def test_metadata_equals_compares_logged_json_as_the_config_means_it(expected, logged, kept):
    """A JSON boolean matched only Python's 'True', and YAML `true` was refused: a config writing `premium: true`
    (or "true") kept nothing."""
    s = sampler(metadata_equals={"premium": expected})
    rec = record(1) if logged == "missing" else record(1, premium=logged)
    assert (s.screen(rec, TimeWindow()) is None) is kept


def test_metadata_equals_takes_yaml_scalars_from_the_file_and_text_from_the_environment():
    text = "premium: true\ntier: 2\nratio: 0.5\nregion: null\nplan: 'True'\nzip: '0123'\n"
    data = {"sources": [{"name": "s", "path": "x"}], "routes": [ROUTE],
            "sampling": {"metadata_equals": yaml.safe_load(text)}}
    values = parse_config(data, environ={}).sampling.metadata_equals
    assert values == {"premium": True, "tier": 2, "ratio": 0.5, "region": None, "plan": "True", "zip": "0123"}
    assert [type(v) for v in values.values()] == [bool, int, float, type(None), str, str]
    env = {"SHADOWJUDGE__SAMPLING__METADATA_EQUALS__ZIP": "0123", "SHADOWJUDGE__SAMPLING__METADATA_EQUALS__VIP": "true"}
    file_values = {"sampling": {"metadata_equals": {"zip": "9", "vip": False}}}
    values = parse_config({**data, **file_values}, environ=env).sampling.metadata_equals
    assert values == {"zip": "0123", "vip": "true"}  # as written: YAML would read 0123 as the octal 83
    s = sampler(metadata_equals=values)
    assert s.screen(record(1, zip="0123", vip=True), TimeWindow()) is None


def test_an_ingest_keeps_the_requests_whose_json_boolean_the_config_names(store_url, tmp_path):
    log = tmp_path / "log.jsonl"
    with open(log, "w") as fh:
        for i, premium in enumerate([True, False, True, "true", None, 1]):
            fh.write(json.dumps({"id": f"req-{i}", "timestamp": (DAY + timedelta(seconds=i)).isoformat(),
                                 "request": {"model": "chat-default", "messages": [{"role": "user", "content": "q"}]},
                                 "metadata": {"premium": premium, "task": "qa" if i % 2 else "chat"}}) + "\n")
    config = parse_config({"store": {"url": store_url}, "routes": [ROUTE],
                           "sources": [{"name": "g", "kind": "jsonl", "path": str(log)}],
                           "sampling": yaml.safe_load("{metadata_equals: {premium: true}, stratify_by: task}")},
                          environ={})
    report = ingest_sources(get_engine(store_url), config).sources[0]
    assert report.stored == 3 and report.filtered_by == {"metadata": 3}
    with session_scope(get_engine(store_url)) as session:
        kept = dict(session.execute(select(TrafficSample.request_id, TrafficSample.stratum)).all())
    assert kept == {"req-0": "chat", "req-2": "chat", "req-3": "qa"}  # strata as before: the value's text


def test_stratum_is_the_redacted_metadata_value():
    s = sampler(stratify_by="owner")
    assert s.stratum(record(1, owner="jane@example.com")) == "[EMAIL]"
    assert s.stratum(record(1, owner=7)) == "7"
    assert s.stratum(record(1)) is None


def _select(store_url, s: Sampler, records, budget=None):
    from shadowjudge.traffic.sampling import DailyBudget

    budget = budget or DailyBudget()
    with session_scope(get_engine(store_url)) as session:
        return s.select(session, records, TimeWindow(), budget)


def test_quota_per_stratum_floor_for_rare_strata_and_daily_cap(store_url):
    # 300 common requests and 3 rare ones; at 10% the rare stratum would likely get none without the floor.
    records = [record(i, lang="en") for i in range(300)] + [record(1000 + i, lang="is") for i in range(3)]
    selection = _select(store_url, sampler(rate=0.1, stratify_by="lang", per_stratum_quota=20, min_per_stratum=2),
                        records)
    by_stratum = {}
    for _, stratum in selection.admitted:
        by_stratum[stratum] = by_stratum.get(stratum, 0) + 1
    assert by_stratum["is"] >= 2 and by_stratum["en"] == 20
    assert selection.filtered_by["stratum_quota"] > 0 and selection.filtered_by["rate"] > 0
    assert len(selection.admitted) + sum(selection.filtered_by.values()) == len(records)

    capped = _select(store_url, sampler(rate=1.0, daily_cap=50), records)
    assert len(capped.admitted) == 50 and capped.filtered_by["daily_cap"] == len(records) - 50


def test_kept_requests_are_exactly_those_below_the_rate(store_url):
    records = [record(i) for i in range(500)]
    selection = _select(store_url, sampler(rate=0.2, seed="abc"), records)
    assert {r.request_id for r, _ in selection.admitted} == \
        {r.request_id for r in records if hash_fraction("abc", r.request_id) < 0.2}


def _log(path: Path, n: int, start: int = 0, day: datetime = DAY) -> None:
    with open(path, "a") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"id": f"req-{i}", "timestamp": (day + timedelta(seconds=i)).isoformat(),
                                 "request": {"model": "chat-default",
                                             "messages": [{"role": "user", "content": f"q{i}"}]},
                                 "metadata": {"task": "rare" if i % 50 == 0 else "common"}}) + "\n")


def test_daily_cap_and_quotas_hold_across_runs_and_days(store_url, tmp_path):
    log = tmp_path / "log.jsonl"
    _log(log, 100)
    config = parse_config({"store": {"url": store_url}, "routes": [ROUTE],
                           "sources": [{"name": "g", "kind": "jsonl", "path": str(log), "batch_size": 16}],
                           "sampling": {"rate": 1.0, "daily_cap": 60, "stratify_by": "task",
                                        "per_stratum_quota": 55}}, environ={})
    engine = get_engine(store_url)
    first = ingest_sources(engine, config).sources[0]
    assert first.stored == 57  # 55 common + the 2 rare ones seen before the cap
    assert first.filtered_by == {"stratum_quota": 43}

    _log(log, 20, start=100)  # same day: the common stratum is full, the rare one is not
    second = ingest_sources(engine, config).sources[0]
    assert second.stored == 1 and second.filtered_by == {"stratum_quota": 19}  # the one rare request
    _log(log, 10, start=0, day=DAY + timedelta(days=1))  # ids req-0.. again: duplicates, not new samples
    _log(log, 10, start=500, day=DAY + timedelta(days=1))
    third = ingest_sources(engine, config).sources[0]
    assert third.duplicates == 10 and third.stored == 10
    with session_scope(engine) as s:
        per_day = s.execute(select(func.count()).select_from(TrafficSample)
                            .where(TrafficSample.request_ts < DAY + timedelta(days=1))).scalar()
    assert per_day <= 60


def test_duplicates_do_not_use_up_quota(store_url):
    from shadowjudge.traffic.ingest import insert_samples, sample_row
    from shadowjudge.traffic.sampling import DailyBudget

    s = sampler(rate=1.0, daily_cap=5)
    redactor = Redactor.from_config(RedactionConfig())
    now = datetime.now(timezone.utc)
    with session_scope(get_engine(store_url)) as session:
        insert_samples(session, [sample_row(record(i), None, "g", redactor, now) for i in range(3)])
    selection = _select(store_url, s, [record(i) for i in range(10)], DailyBudget())
    assert selection.duplicates == 3
    assert [r.request_id for r, _ in selection.admitted] == ["req-3", "req-4"]
    assert selection.filtered_by == {"daily_cap": 5}


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_rate_is_respected_end_to_end(store_url, tmp_path, rate):
    log = tmp_path / "log.jsonl"
    _log(log, 400)
    config = parse_config({"store": {"url": store_url}, "routes": [ROUTE], "sampling": {"rate": rate},
                           "sources": [{"name": "g", "kind": "jsonl", "path": str(log)}]}, environ={})
    report = ingest_sources(get_engine(store_url), config).sources[0]
    assert report.stored == sum(hash_fraction("shadowjudge", f"req-{i}") < rate for i in range(400))


def test_a_stratum_value_holding_nul_keeps_its_quota_across_runs(store_url, tmp_path):
    """The store keeps NUL as U+FFFD; the sampler counted the raw value, found none stored and admitted a full
    quota again on every run."""
    log = tmp_path / "log.jsonl"
    config = parse_config({"store": {"url": store_url}, "routes": [ROUTE],
                           "sources": [{"name": "g", "kind": "jsonl", "path": str(log)}],
                           "sampling": {"rate": 1.0, "stratify_by": "task", "per_stratum_quota": 2}}, environ={})
    engine = get_engine(store_url)
    for run in range(3):
        with open(log, "a") as fh:
            for i in range(run * 4, run * 4 + 4):
                fh.write(json.dumps({"id": f"req-{i}", "timestamp": (DAY + timedelta(seconds=i)).isoformat(),
                                     "request": {"model": "chat-default",
                                                 "messages": [{"role": "user", "content": f"q{i}"}]},
                                     "metadata": {"task": "x\u0000y"}}) + "\n")
        ingest_sources(engine, config)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(TrafficSample)) == 2


def test_a_second_ingest_waits_for_the_first_so_the_daily_cap_holds(store_url, tmp_path, monkeypatch):
    """Two ingests at once (the shipped schedules start the cycle's and ingest-and-sample's at the same minute)
    each counted the store before the other's batches and admitted up to the cap: 15 samples under a cap of 10."""
    import threading

    from shadowjudge.store.lease import LeaseLock
    from shadowjudge.traffic import ingest as ingest_module

    def config_for(name: str, start: int):
        _log(tmp_path / f"{name}.jsonl", 8, start=start)
        return parse_config({"store": {"url": store_url}, "routes": [ROUTE],
                             "sources": [{"name": name, "kind": "jsonl", "path": str(tmp_path / f"{name}.jsonl"),
                                          "batch_size": 4}],
                             "sampling": {"rate": 1.0, "daily_cap": 10}}, environ={})

    engine = get_engine(store_url)
    first, second = config_for("a", 0), config_for("b", 100)
    other = threading.Thread(target=lambda: ingest_sources(engine, second, wait_s=60))
    real_store_batch = ingest_module._store_batch

    def store_batch_then_start_the_other(*args, **kwargs):
        real_store_batch(*args, **kwargs)
        if not other.is_alive() and other.ident is None:
            other.start()
            other.join(timeout=3)  # before: it ran all its batches here, in between ours

    monkeypatch.setattr(ingest_module, "_store_batch", store_batch_then_start_the_other)
    ingest_sources(engine, first)
    other.join(timeout=60)
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(TrafficSample)) == 10

    held = LeaseLock(engine, ingest_module.INGEST_LOCK, holder="elsewhere:1:x")
    assert held.acquire()
    with pytest.raises(ingest_module.IngestBusy, match="elsewhere:1:x"):
        ingest_sources(engine, first, wait_s=0.2)
    held.release()
    assert ingest_sources(engine, first, wait_s=0.2).totals["read"] == 0


def _per_stratum(selection) -> dict[str | None, int]:
    return dict(Counter(stratum for _, stratum in selection.admitted))


def test_a_rare_stratum_gets_its_floor_past_the_daily_cap(store_url):
    """Common traffic filled the cap before the rare requests came, which were then dropped by the cap: the floor
    was never met. Floors are kept past the cap, and count toward it."""
    s = sampler(rate=1.0, stratify_by="task", min_per_stratum=2, daily_cap=40)
    common = [record(i, task="common") for i in range(60)]
    rare = [record(1000 + i, task="rare") for i in range(3)]

    late = _select(store_url, s, common + rare)
    assert _per_stratum(late) == {"common": 40, "rare": 2}  # the third rare request is over its floor: capped
    assert late.filtered_by == {"daily_cap": 21}

    early = _select(store_url, s, rare + common)  # the floor admissions use up room under the cap
    assert _per_stratum(early) == {"rare": 3, "common": 37}


def test_floor_and_cap_go_to_the_first_requests_read_while_the_rate_does_not_depend_on_order(store_url):
    """Pins the documented order dependence: a stratum's floor is met by its first requests in read order (so a
    reordered log keeps other floor samples), while which requests hash in is the same in any order."""
    s = sampler(rate=0.3, seed="o", stratify_by="task", min_per_stratum=2)
    records = [record(i, task="rare" if i % 10 == 0 else "common") for i in range(100)]
    hashed_in = {r.request_id for r in records if s.hash_in(r)}

    def expected(ordered: list[TrafficRecord]) -> set[str]:
        first_per_stratum = {}
        for r in ordered:
            first_per_stratum.setdefault(r.metadata["task"], []).append(r.request_id)
        return hashed_in | {i for ids in first_per_stratum.values() for i in ids[:2]}

    forward = {r.request_id for r, _ in _select(store_url, s, records).admitted}
    backward = {r.request_id for r, _ in _select(store_url, s, records[::-1]).admitted}
    assert forward == expected(records) and backward == expected(records[::-1])
    assert forward != backward and hashed_in <= forward & backward

    capped = sampler(rate=1.0, daily_cap=5)
    assert [r.request_id for r, _ in _select(store_url, capped, records[::-1]).admitted] == \
        [r.request_id for r in records[::-1][:5]]


def test_a_crash_mid_day_then_a_rerun_keeps_floors_and_cap_as_one_run_would(store_url, tmp_path, monkeypatch):
    """The rerun's counts for the day come from the store, floor admissions past the cap included."""
    from shadowjudge.store import upgrade_database
    from shadowjudge.traffic import ingest as ingest_module

    log = tmp_path / "log.jsonl"
    _log(log, 200)  # one day; requests 0, 50, 100 and 150 are 'rare', the cap fills long before 50

    def run(url: str, crash_after_batches: int | None = None) -> dict[str, str | None]:
        config = parse_config({"store": {"url": url}, "routes": [ROUTE],
                               "sources": [{"name": "g", "kind": "jsonl", "path": str(log), "batch_size": 10}],
                               "sampling": {"rate": 0.5, "stratify_by": "task", "min_per_stratum": 3,
                                            "daily_cap": 20}}, environ={})
        if crash_after_batches is not None:
            real, calls = ingest_module._store_batch, []

            def store_then_crash(*args, **kwargs):
                if len(calls) == crash_after_batches:
                    raise KeyboardInterrupt("killed")
                calls.append(1)
                real(*args, **kwargs)

            monkeypatch.setattr(ingest_module, "_store_batch", store_then_crash)
            with pytest.raises(KeyboardInterrupt):
                ingest_sources(get_engine(url), config)
            monkeypatch.setattr(ingest_module, "_store_batch", real)
            with session_scope(get_engine(url)) as session:
                assert session.scalar(select(func.count()).select_from(TrafficSample)) == 21  # cap + rare req-50
        ingest_sources(get_engine(url), config)
        with session_scope(get_engine(url)) as session:
            return dict(session.execute(select(TrafficSample.request_id, TrafficSample.stratum)).tuples().all())

    one_run_url = f"sqlite:///{tmp_path}/one-run.db"
    upgrade_database(one_run_url)
    one_run = run(one_run_url)
    assert Counter(one_run.values()) == {"common": 19, "rare": 3}
    assert run(store_url, crash_after_batches=7) == one_run
