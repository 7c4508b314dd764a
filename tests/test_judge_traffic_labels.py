"""Training labels from stored traffic, on real stores (SQLite and PostgreSQL): the teacher labels a seeded sample
of shadow pairs once, reruns and larger samples pay only for new pairs, calibration's verdicts are reused, and the
directory it writes trains a judge through the same command as the AlpacaEval labels."""

from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from evaluators.calibration import TEACHER_ROLE
from evaluators.llm_judge import LlmJudge
from evaluators.preference_data import PreferenceDataError, load_preference_data
from evaluators.traffic_labels import LABEL_ROLE, label_stored_traffic
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, get_engine, session_scope
from tests.test_judge_calibration import teacher_transport

TARGETS = ("cand-a", "cand-b", "cand-c")
N = 30
TOPICS = ["rivers", "prime numbers", "sourdough", "tax law", "jazz", "volcanoes", "chess", "compilers", "tea",
          "bridges"]


def _answer(i: int, who: str, good: bool) -> str:
    topic = TOPICS[i % len(TOPICS)]
    if good:
        return f"GOOD: a careful answer about {topic} from {who}, with the reasoning laid out step by step."
    return f"{who} has no idea about {topic}."


def seed_traffic(engine, route: str = "chat") -> None:
    """N samples answered by the incumbent and three candidates in two runs; the GOOD answer alternates sides.
    Failed and empty shadow answers, and the incumbent's own replay (target 'incumbent' serving model 'inc'), are
    stored too and must not be labelled: the teacher would judge the incumbent against itself."""
    now = datetime.now(timezone.utc)
    with session_scope(engine) as s:
        runs = [ShadowRun(run_key=f"r{k}", route=route, config_hash="h") for k in (1, 2)]
        s.add_all(runs)
        s.flush()
        for i in range(N):
            sample = TrafficSample(request_id=f"req-{i}", source="logs", source_position=str(i), route=route,
                                   incumbent_model="inc", messages=[{"role": "user", "content": f"question {i}"}],
                                   response_text=_answer(i, "inc", i % 2 == 1), request_ts=now)
            s.add(sample)
            s.flush()
            for t, target in enumerate(TARGETS):
                run = runs[t % 2]
                s.add(ShadowResult(run_id=run.id, sample_id=sample.id, target=target, model=target,
                                   output_text=_answer(i, target, i % 2 == 0)))
            s.add(ShadowResult(run_id=runs[0].id, sample_id=sample.id, target="incumbent", model="inc",
                               output_text=_answer(i, "inc again", i % 2 == 1)))
            s.add(ShadowResult(run_id=runs[0].id, sample_id=sample.id, target="broken", model="broken",
                               output_text=None, error_class="timeout"))
        other = TrafficSample(request_id="other-route", source="logs", source_position="x", route="elsewhere",
                              incumbent_model="inc", messages=[{"role": "user", "content": "q"}],
                              response_text="a", request_ts=now)
        s.add(other)
        s.flush()
        s.add(ShadowResult(run_id=runs[0].id, sample_id=other.id, target="cand-a", model="cand-a", output_text="b"))


def _teacher(calls: list[str]) -> LlmJudge:
    return LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                           http_client=httpx.Client(transport=teacher_transport(calls))), "teacher", concurrency=4)


def _rows(path) -> list[dict]:
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_teacher_labels_a_seeded_sample_once_and_writes_a_training_directory(store_url, tmp_path):
    engine = get_engine(store_url)
    seed_traffic(engine)
    calls: list[str] = []
    teacher = _teacher(calls)
    with session_scope(engine) as s:  # a verdict calibration already paid for
        sample_id = s.query(TrafficSample.id).filter(TrafficSample.request_id == "req-0").scalar()
        run_id = s.query(ShadowResult.run_id).filter(ShadowResult.sample_id == sample_id,
                                                     ShadowResult.target == "cand-a").scalar()
        s.add(Judgment(run_id=run_id, sample_id=sample_id, target="cand-a", evaluator=teacher.version,
                       preference=1.0, details={"role": TEACHER_ROLE}))

    out = tmp_path / "labels"
    everything = N * len(TARGETS)
    report = label_stored_traffic(engine, "chat", teacher, out, max_pairs=everything)
    assert report.available_pairs == everything and report.pairs == everything
    assert report.reused_verdicts == 1 and report.teacher_calls == everything - 1
    assert len(calls) == 2 * (everything - 1)  # both orders of every new pair, to cancel position bias
    assert report.models == ["cand-a", "cand-b", "cand-c", "inc"]

    data = load_preference_data(out)
    assert len(data.prompts) == N and len(data.pairs) == everything and data.judged_models() == list(TARGETS)
    for p in data.pairs:  # the teacher's rule: the GOOD answer wins
        assert p.model_a == "inc" and p.annotator == teacher.version
        assert p.p_b_better == (1.0 if data.answer(p.prompt_id, p.model_b).startswith("GOOD") else 0.0)
    with session_scope(engine) as s:
        roles = [j.details["role"] for j in s.query(Judgment).filter(Judgment.evaluator == teacher.version)]
    assert roles.count(LABEL_ROLE) == everything - 1 and roles.count(TEACHER_ROLE) == 1

    files = {name: _rows(out / f"{name}.jsonl.gz") for name in ("prompts", "outputs", "labels")}
    calls.clear()
    again = label_stored_traffic(engine, "chat", teacher, out, max_pairs=everything)
    assert again.teacher_calls == 0 and again.reused_verdicts == everything and calls == []
    assert {name: _rows(out / f"{name}.jsonl.gz") for name in files} == files


def test_a_larger_sample_pays_only_for_the_new_pairs_and_keeps_the_old_ones(sqlite_url, tmp_path):
    engine = get_engine(sqlite_url)
    seed_traffic(engine)
    calls: list[str] = []
    small = label_stored_traffic(engine, "chat", _teacher(calls), tmp_path / "a", max_pairs=20, seed=3)
    larger = label_stored_traffic(engine, "chat", _teacher(calls), tmp_path / "b", max_pairs=50, seed=3)
    assert small.teacher_calls == 20 and larger.teacher_calls == 30 and larger.reused_verdicts == 20
    first = {(r["prompt_id"], r["model_b"]) for r in _rows(tmp_path / "a" / "labels.jsonl.gz")}
    second = {(r["prompt_id"], r["model_b"]) for r in _rows(tmp_path / "b" / "labels.jsonl.gz")}
    assert first < second  # the seeded order is a prefix: a larger sample contains the smaller one
    other_seed = label_stored_traffic(engine, "chat", _teacher(calls), tmp_path / "c", max_pairs=20, seed=4)
    assert {(r["prompt_id"], r["model_b"]) for r in _rows(tmp_path / "c" / "labels.jsonl.gz")} != first
    assert other_seed.pairs == 20


def test_a_verdict_the_teacher_never_gave_is_written_unlabelled_not_as_a_tie(sqlite_url, tmp_path):
    """Replies that name no winner in either order are stored (not paid for again) but written as null, which
    training skips, rather than as p_b_better 0.5, which would teach the judge that the answers are equal."""
    engine = get_engine(sqlite_url)
    seed_traffic(engine)
    agreeing = teacher_transport([])

    def handler(request: httpx.Request) -> httpx.Response:
        if "jazz" not in json.loads(request.content)["messages"][-1]["content"]:
            return agreeing.handle_request(request)
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "teacher",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Both have merits; hard to say."}}]})

    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=httpx.MockTransport(handler))), "teacher")
    everything = N * len(TARGETS)
    jazz = sum(1 for i in range(N) if TOPICS[i % len(TOPICS)] == "jazz") * len(TARGETS)
    report = label_stored_traffic(engine, "chat", teacher, tmp_path / "labels", max_pairs=everything)
    assert report.unusable_verdicts == jazz > 0
    labels = _rows(tmp_path / "labels" / "labels.jsonl.gz")
    assert sum(r["p_b_better"] is None for r in labels) == jazz and len(labels) == everything
    data = load_preference_data(tmp_path / "labels")
    assert data.unlabelled_rows == jazz and len(data.pairs) == everything - jazz
    again = label_stored_traffic(engine, "chat", teacher, tmp_path / "labels", max_pairs=everything)
    assert again.teacher_calls == 0 and again.unusable_verdicts == jazz


def test_nothing_to_label_says_so(sqlite_url, tmp_path):
    engine = get_engine(sqlite_url)
    with pytest.raises(PreferenceDataError, match="no stored shadow answers"):
        label_stored_traffic(engine, "chat", _teacher([]), tmp_path / "x")
    seed_traffic(engine)
    with pytest.raises(PreferenceDataError, match="at least 1"):
        label_stored_traffic(engine, "chat", _teacher([]), tmp_path / "x", max_pairs=0)
    public = tmp_path / "alpacaeval-copy"
    public.mkdir()
    (public / "leaderboard.csv").write_text("model,win_rate,lc_win_rate\n")
    calls: list[str] = []
    with pytest.raises(PreferenceDataError, match="leaderboard.csv.*use an empty directory"):
        label_stored_traffic(engine, "chat", _teacher(calls), public)
    assert calls == []  # refused before the teacher was asked anything


def test_traffic_labels_train_a_judge_that_beats_chance_on_a_candidate_it_never_saw(sqlite_url, tmp_path):
    from evaluators.judge_training import train_judge
    from tests.test_judge_training import TINY

    engine = get_engine(sqlite_url)
    seed_traffic(engine)
    out = tmp_path / "labels"
    label_stored_traffic(engine, "chat", _teacher([]), out, max_pairs=N * len(TARGETS))
    # Two candidate heads chosen by 5-fold cross-validation, as the full settings do, over two training models and
    # no leaderboard: as many folds as models, selection on pair agreement, and no empty-fold warnings.
    heads = (TINY.heads[0], replace(TINY.heads[0], name="tiny-lc", use_length=False, length_controlled=True))
    settings = replace(TINY, heads=heads, selection_folds=5, int8_check_pairs=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = train_judge(out, f"sqlite:///{tmp_path}/mlflow.db", quick=True, seed=0,
                             registered_name="traffic-judge", settings=settings, cache_dir=tmp_path / "cache")
    assert len(result.heldout_models) == 1 and result.heldout_models[0] in TARGETS
    assert result.head in ("tiny", "tiny-lc")
    assert result.metrics["n"] == N and result.metrics["agreement"] > 0.8, result.metrics


def test_traffic_labels_and_the_public_set_train_one_judge(sqlite_url, tmp_path):
    """`judge train --data PUBLIC --data LABELS`: one judge on both sets. The traffic set's prompt ids are prefixed
    so its answers stay with its prompts, and the judge learns the route's teacher as well as the public labels."""
    from evaluators.factory import load_small_judge
    from evaluators.judge_registry import client
    from evaluators.judge_training import train_judge
    from evaluators.preference_data import MINI_DATA
    from tests.test_judge_training import TINY, write_subset

    engine = get_engine(sqlite_url)
    seed_traffic(engine)
    labels = tmp_path / "labels"
    label_stored_traffic(engine, "chat", _teacher([]), labels, max_pairs=N * len(TARGETS))
    public = write_subset(MINI_DATA, tmp_path / "public", 30)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_judge([public, labels], uri, quick=True, seed=0, registered_name="mixed-judge",
                         settings=replace(TINY, int8_check_pairs=0), cache_dir=tmp_path / "cache")
    public_models = set(load_preference_data(public).judged_models())
    assert set(result.heldout_models) <= public_models | set(TARGETS)
    # seed 0 holds out cand-b: the route teacher's agreement on it is reported apart from GPT-4's
    assert "cand-b" in result.heldout_models
    by_annotator = {k.split("/", 1)[1]: v for k, v in result.metrics.items() if k.startswith("agreement_by_annotator/")}
    route_teacher = [v for k, v in by_annotator.items() if k.startswith("llm-judge_teacher")]
    assert len(by_annotator) == 2 and route_teacher[0] > 0.8, by_annotator
    run = client(uri).get_run(result.run_id)
    assert run.data.params["data_dir"] == f"{public} + {labels}"
    assert int(run.data.params["n_pairs"]) == len(load_preference_data(public).pairs) + N * len(TARGETS)
    judge = load_small_judge(result.model_uri, uri)
    trained_models = set(judge.spec.trained_models)
    assert trained_models & public_models and trained_models & set(TARGETS)
    traffic = load_preference_data(labels)
    prefs = judge.compare([traffic.prompts[p.prompt_id] for p in traffic.pairs],
                          [traffic.answer(p.prompt_id, p.model_a) for p in traffic.pairs],
                          [traffic.answer(p.prompt_id, p.model_b) for p in traffic.pairs])
    agree = sum((x > 0.5) == (p.p_b_better > 0.5) for x, p in zip(prefs, traffic.pairs)) / len(prefs)
    assert agree > 0.8, agree


def test_the_command_labels_through_a_teacher_on_loopback(tmp_path):
    """`shadowjudge judge label-traffic` as a user runs it: config file, SQLite store, a teacher over HTTP."""
    import os
    import subprocess
    import sys

    import yaml

    from shadowjudge.demo import demo_config
    from shadowjudge.store import upgrade_database
    from tests.test_cycle_checks import Teacher

    url = f"sqlite:///{tmp_path}/store.db"
    upgrade_database(url)
    seed_traffic(get_engine(url), route="chat-default")
    with Teacher() as teacher:
        config = demo_config(tmp_path, "http://127.0.0.1:9/v1")
        config["store"] = {"url": url}
        config["judge"] = {"evaluator": "lexical", "teacher": {
            "name": "teacher", "model": "gpt-4-judge", "base_url": f"http://127.0.0.1:{teacher.server.server_address[1]}/v1"}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "shadowjudge.cli", "judge", "label-traffic", "-c",
                               str(tmp_path / "c.yaml"), "--out", str(tmp_path / "labels"), "--max-pairs", "40",
                               "--no-progress"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        calls = teacher.calls
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["route"] == "chat-default" and report["pairs"] == 40 and report["teacher_calls"] == 40
    assert calls == 80  # both orders
    data = load_preference_data(tmp_path / "labels")
    assert len(data.pairs) == 40 and all(p.p_b_better in (0.0, 1.0) for p in data.pairs)


def test_a_later_run_that_answered_differently_is_labelled_again(sqlite_url, tmp_path):
    engine = get_engine(sqlite_url)
    seed_traffic(engine)
    calls: list[str] = []
    everything = N * len(TARGETS)
    label_stored_traffic(engine, "chat", _teacher(calls), tmp_path / "a", max_pairs=everything)
    with session_scope(engine) as s:  # cand-a's new version answers the first 5 requests the other way round
        run = ShadowRun(run_key="r3", route="chat", config_hash="h2")
        s.add(run)
        s.flush()
        for i in range(5):
            sample_id = s.query(TrafficSample.id).filter(TrafficSample.request_id == f"req-{i}").scalar()
            s.add(ShadowResult(run_id=run.id, sample_id=sample_id, target="cand-a", model="cand-a",
                               output_text=_answer(i, "cand-a", i % 2 == 1)))
    calls.clear()
    again = label_stored_traffic(engine, "chat", _teacher(calls), tmp_path / "b", max_pairs=everything)
    assert again.teacher_calls == 5 and again.reused_verdicts == everything - 5
    data = load_preference_data(tmp_path / "b")
    changed = 0
    for p in data.pairs:  # the teacher's rule, both orders: GOOD beats not GOOD, two alike tie
        good_a, good_b = (data.answer(p.prompt_id, m).startswith("GOOD") for m in (p.model_a, p.model_b))
        assert p.p_b_better == 0.5 + (good_b - good_a) / 2
        changed += good_a == good_b
    assert changed == 5  # the new answers, labelled as they are now


def test_the_training_flow_labels_production_traffic_then_trains(tmp_path, prefect_harness, monkeypatch):
    """The train-judge Prefect flow with labels from production: teacher over HTTP, then training and registry."""
    monkeypatch.chdir(tmp_path)  # nothing the flow writes may land in the checkout (its cache: the config's folder)
    import yaml

    from evaluators.judge_registry import CHAMPION, find_alias
    from flows.train_judge import train_judge_flow
    from shadowjudge.demo import demo_config
    from shadowjudge.store import upgrade_database
    from tests.test_cycle_checks import Teacher

    url = f"sqlite:///{tmp_path}/store.db"
    upgrade_database(url)
    seed_traffic(get_engine(url), route="chat-default")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    with Teacher() as teacher:
        config = demo_config(tmp_path, "http://127.0.0.1:9/v1")
        config["store"] = {"url": url}
        config["judge"] = {"evaluator": "lexical", "teacher": {
            "name": "teacher", "model": "gpt-4-judge",
            "base_url": f"http://127.0.0.1:{teacher.server.server_address[1]}/v1"}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        result = train_judge_flow(str(tmp_path / "labels"), tracking, quick=True, registered_name="traffic-flow",
                                  label_traffic_config=str(tmp_path / "c.yaml"), max_pairs=60)
        calls = teacher.calls
    assert result["traffic_labels"]["pairs"] == 60 and calls == 120
    assert result["alias"] == CHAMPION and find_alias(tracking, "traffic-flow", CHAMPION).version == "1"
    assert len(load_preference_data(tmp_path / "labels").pairs) == 60


def _one_sample_run(engine, incumbent_model: str, prompt: str, results: list[tuple[str, str, str]]) -> None:
    """Run 'r' of route 'chat' over one logged request, with one stored answer per (target, model, text)."""
    with session_scope(engine) as s:
        run = ShadowRun(run_key="r", route="chat", config_hash="h")
        sample = TrafficSample(request_id="req", source="logs", source_position="0", route="chat",
                               incumbent_model=incumbent_model, messages=[{"role": "user", "content": prompt}],
                               response_text="logged", request_ts=datetime.now(timezone.utc))
        s.add_all([run, sample])
        s.flush()
        s.add_all([ShadowResult(run_id=run.id, sample_id=sample.id, target=target, model=model, output_text=text)
                   for target, model, text in results])


def test_a_replay_of_the_logged_model_is_not_a_pair_however_the_log_spells_it(sqlite_url):
    """The gateway logs 'anthropic/Inc' for the model the incumbent target calls 'inc': its replay was labelled as
    a pair, and the teacher paid to judge the model against itself."""
    from evaluators.traffic_labels import stored_pairs

    engine = get_engine(sqlite_url)
    _one_sample_run(engine, "anthropic/Inc", "q", [("incumbent", "inc", "a"), ("cand-a", "cand-a", "b")])
    assert [p.target for p in stored_pairs(engine, "chat")] == ["cand-a"]


def _seed_promotion(engine, logged_after: str) -> None:
    """Before a promotion the gateway logs 'claude-instant-1.2' and target 'yi-34b' (model 'Yi-34B-Chat') is a
    candidate; after it, the gateway logs `logged_after` for Yi, and 'claude-instant' is the candidate."""
    now = datetime.now(timezone.utc)
    with session_scope(engine) as s:
        runs = [ShadowRun(run_key=key, route="chat", config_hash="h") for key in ("before", "after")]
        s.add_all(runs)
        s.flush()
        for i in range(2 * N):
            before = i < N
            incumbent = "claude-instant-1.2" if before else logged_after
            sample = TrafficSample(request_id=f"req-{i}", source="logs", source_position=str(i), route="chat",
                                   incumbent_model=incumbent, messages=[{"role": "user", "content": f"question {i}"}],
                                   response_text=_answer(i, incumbent, i % 2 == 1), request_ts=now)
            s.add(sample)
            s.flush()
            candidates = ([("yi-34b", "Yi-34B-Chat"), ("llama", "llama-2-7b")] if before
                          else [("claude-instant", "claude-instant-1.2"), ("llama", "llama-2-7b")])
            for target, model in candidates:
                s.add(ShadowResult(run_id=runs[0 if before else 1].id, sample_id=sample.id, target=target,
                                   model=model, output_text=_answer(i, model, i % 2 == 0)))


@pytest.mark.parametrize("logged_after, logged_as", [("Yi-34B-Chat", []), ("01-ai/yi-34b-chat", []),
                                                     ("yi-34b-chat-0205", ["yi-34b-chat-0205"])])
def test_a_promoted_candidate_is_one_model_under_one_name_on_both_sides(sqlite_url, tmp_path, logged_after,
                                                                         logged_as):
    """Labels named the candidate side by target ('yi-34b') and the incumbent side by the gateway's log
    ('Yi-34B-Chat'): after a promotion one model had two names, and a split holding it out trained on its answers.
    Both sides are named by model now, the log matched like the rest of the system matches it (case, a provider
    prefix, the target's `logged_as`)."""
    from evaluators.preference_data import split_by_model
    from shadowjudge.config import TargetConfig

    engine = get_engine(sqlite_url)
    _seed_promotion(engine, logged_after)
    targets = [TargetConfig(name="yi-34b", model="Yi-34B-Chat", base_url="http://x/v1", logged_as=logged_as),
               TargetConfig(name="claude-instant", model="claude-instant-1.2", base_url="http://x/v1"),
               TargetConfig(name="llama", model="llama-2-7b", base_url="http://x/v1")]
    out = tmp_path / "labels"
    configured = {"targets": targets} if logged_as else {}  # case and a provider prefix need no config
    report = label_stored_traffic(engine, "chat", _teacher([]), out, max_pairs=10 * N, **configured)
    assert report.models == ["Yi-34B-Chat", "claude-instant-1.2", "llama-2-7b"]
    data = load_preference_data(out)
    assert data.models() == report.models and data.judged_models() == report.models
    assert {p.model_a for p in data.pairs} == {"claude-instant-1.2", "Yi-34B-Chat"}
    for seed in range(10):
        split = split_by_model(data, 0.34, seed)
        seen_in_training = {m for p in split.train_pairs(data) for m in (p.model_a, p.model_b)}
        assert not seen_in_training & set(split.heldout_models), (seed, split)


def test_the_logged_incumbent_is_named_after_the_model_it_is(tmp_path):
    from evaluators.traffic_labels import model_names
    from shadowjudge.config import TargetConfig

    stored = ["gpt-4o", "Yi-34B-Chat", "acme/llama-3", "meta-llama/llama-3"]
    targets = [TargetConfig(name="four", model="gpt-4o", base_url="http://x/v1", logged_as=["gpt-4o-2024-08-06"])]
    assert model_names(["OpenAI/GPT-4o", "gpt-4o-2024-08-06", "yi-34b-chat", "llama-3", "unknown"], stored,
                       targets) == {"OpenAI/GPT-4o": "gpt-4o", "gpt-4o-2024-08-06": "gpt-4o",
                                    "yi-34b-chat": "Yi-34B-Chat", "llama-3": "llama-3", "unknown": "unknown"}
    assert model_names(["gpt-4o-2024-08-06"], stored) == {"gpt-4o-2024-08-06": "gpt-4o-2024-08-06"}


def test_two_targets_serving_one_model_give_one_answer_per_prompt(sqlite_url, tmp_path):
    """Named by model, two targets of one model would put two answers under one (prompt, model) name."""
    from evaluators.traffic_labels import stored_pairs

    engine = get_engine(sqlite_url)
    _one_sample_run(engine, "inc", "question 0", [(t, "llama-3", t) for t in ("llama-together", "llama-fireworks")])
    pairs = stored_pairs(engine, "chat")
    assert [(p.target, p.model) for p in pairs] == [("llama-fireworks", "llama-3")]
    label_stored_traffic(engine, "chat", _teacher([]), tmp_path / "labels")
    data = load_preference_data(tmp_path / "labels")
    assert [(p.model_a, p.model_b) for p in data.pairs] == [("inc", "llama-3")]
    assert data.answer(data.pairs[0].prompt_id, "llama-3") == "llama-fireworks"


def test_labels_from_a_config_name_the_incumbent_by_the_routes_targets(tmp_path, monkeypatch):
    """`judge label-traffic -c CONFIG` gives the route's targets, whose `logged_as` names the logged incumbent."""
    import yaml

    from evaluators import traffic_labels
    from shadowjudge.demo import demo_config
    from shadowjudge.store import upgrade_database

    config = demo_config(tmp_path, "http://127.0.0.1:9/v1")
    config["store"] = {"url": f"sqlite:///{tmp_path}/store.db"}
    upgrade_database(config["store"]["url"])
    config["judge"] = {"evaluator": "lexical", "teacher": {"name": "t", "model": "m", "base_url": "http://x/v1"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    given = {}
    monkeypatch.setattr(traffic_labels, "label_stored_traffic",
                        lambda engine, route, teacher, out, **kwargs: given.update(route=route, **kwargs))
    traffic_labels.label_route_traffic(tmp_path / "c.yaml", tmp_path / "labels")
    route = config["routes"][0]
    assert given["route"] == route["name"]
    assert [t.name for t in given["targets"]] == [route["incumbent"]["name"], *(c["name"] for c in route["candidates"])]
