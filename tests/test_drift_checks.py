"""Drift checks on real AlpacaEval prompts and answers: input (MiniLM embeddings), output per model, judge."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import select

from shadowjudge.analysis import (
    MiniLMEmbedder,
    OutputWindow,
    TimeWindow,
    detect_drift,
    input_drift,
    is_refusal,
    judge_drift,
    output_drift,
)
from shadowjudge.analysis.drift import domain_classifier_test, mmd_permutation_test, stable_subsample
from shadowjudge.config import DriftConfig
from shadowjudge.store import Judgment, insert_ignoring_duplicates, session_scope
from test_analysis_alpaca_runs import EVALUATOR, START, build_run, mini, route_for

CONFIG = DriftConfig(min_samples=30, permutations=300)
GEMMA, FALCON = "FuseChat-Gemma-2-9B-Instruct", "falcon-40b-instruct"


class CachingEmbedder:
    """The real MiniLM embedder, each text embedded once per test module (CPU time is shared on CI machines);
    it records what it was asked for."""

    name = "minilm-cached"

    def __init__(self, inner: MiniLMEmbedder) -> None:
        self.inner = inner
        self.cache: dict[str, np.ndarray] = {}
        self.requests: list[str] = []

    def embed(self, texts):
        self.requests.extend(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.inner.embed(missing), strict=True))
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


@pytest.fixture(scope="module")
def minilm() -> CachingEmbedder:
    return CachingEmbedder(MiniLMEmbedder())


@pytest.fixture(scope="module")
def prompt_embeddings(minilm):
    prompts = mini().prompts
    return minilm.embed([p["instruction"] for p in prompts]), np.array([p["dataset"] for p in prompts])


def test_minilm_embeddings_are_unit_rows(prompt_embeddings):
    vectors, _ = prompt_embeddings
    assert vectors.shape == (300, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_a_topic_shift_is_input_drift_and_a_random_split_is_not(prompt_embeddings):
    """Reference: selfinstruct, helpful_base and vicuna prompts; current: koala and oasst (a change of the
    instruction subsets). A random half against the other half is the no-drift control."""
    vectors, datasets = prompt_embeddings
    shifted = np.isin(datasets, ["koala", "oasst"])
    drift = input_drift(vectors[~shifted], vectors[shifted], CONFIG)
    assert drift.drifted, drift.describe()
    assert drift.details["mmd"] >= CONFIG.min_mmd or drift.details["auc"] >= CONFIG.min_auc
    order = np.random.default_rng(7).permutation(len(vectors))
    same = input_drift(vectors[order[:150]], vectors[order[150:]], CONFIG)
    assert same.status == "stable", same.describe()
    assert input_drift(vectors[:10], vectors[10:20], CONFIG).status == "nodata"


def test_texts_are_subsampled_stably_and_only_the_subsample_is_embedded(minilm):
    """A window sliding by 10% keeps ~90% of its subsample (so the embedding cache serves consecutive cycles), and
    a window larger than max_embeddings costs max_embeddings embeddings, not its size."""
    texts = [f"prompt number {i}" for i in range(3000)]
    first, slid = stable_subsample(texts[:2000], 500), stable_subsample(texts[200:2200], 500)
    kept = set(np.asarray(texts[:2000])[first]) & set(np.asarray(texts[200:2200])[slid])
    assert len(first) == len(slid) == 500 and len(kept) >= 400
    assert list(stable_subsample(texts[:50], 500)) == list(range(50))
    prompts = [p["instruction"] for p in mini().prompts]
    config = DriftConfig(min_samples=30, permutations=100, max_embeddings=100)
    before = len(minilm.requests)
    result = input_drift(prompts[:150], prompts[150:], config, embed=minilm.embed)
    assert len(minilm.requests) - before == 200
    assert (result.n_reference, result.n_current) == (150, 150)
    assert result.details["classifier_samples"] == [100, 100]


def test_repeated_prompts_keep_their_share_of_a_subsample():
    """Every copy of a prompt shares its content hash: all copies went in or none did, so a large window could lose
    its common prompts while a small one kept them, and input drift alarmed on identical traffic (10 runs of 10)."""
    rng = np.random.default_rng(0)
    common = [f"common question {k}" for k in range(6)]
    window = [common[rng.integers(6)] if rng.random() < 0.4 else f"unique prompt {i}" for i in range(14000)]
    kept = np.asarray(window)[stable_subsample(window, 2000)]
    share = float(np.isin(kept, common).mean())
    assert 0.35 < share < 0.45, share  # 40% of the window
    again = np.asarray(window)[stable_subsample(window, 2000)]
    assert list(again) == list(kept)  # still deterministic


def test_tests_are_calibrated_under_no_drift():
    """Permutation p-values are uniform when nothing changed: the rejection rate at 0.1 is near 0.1."""
    rng = np.random.default_rng(0)
    rejections = 0
    for t in range(25):
        data = rng.normal(size=(100, 16))
        _, p_auc, _ = domain_classifier_test(data[:50], data[50:], 100, t)
        _, p_mmd = mmd_permutation_test(data[:50], data[50:], 100, t)
        rejections += (p_auc < 0.1) + (p_mmd < 0.1)
    assert rejections / 50 < 0.22


def _window(model: str, datasets: set[str] | None = None) -> OutputWindow:
    data = mini()
    prompts = [p for p in data.prompts if datasets is None or p["dataset"] in datasets]
    return OutputWindow([data.outputs[(model, p["id"])] for p in prompts],
                        [data.scores[(model, p["id"])] for p in prompts])


def test_output_drift_of_a_model_swap_and_not_of_the_same_model():
    drifted = {r.metric: r for r in output_drift(_window(GEMMA), _window(FALCON), CONFIG, "cand")}
    assert drifted["length"].drifted and drifted["length"].details["current_median"] < 1000
    assert drifted["judge_score"].drifted
    assert drifted["format_compliance"].status == "nodata"  # no request asked for a format
    same = output_drift(_window(GEMMA, {"koala", "oasst"}), _window(GEMMA, {"helpful_base", "vicuna", "selfinstruct"}),
                        CONFIG, "cand")
    assert not any(r.drifted for r in same), [r.describe() for r in same]


def test_judge_scores_on_a_rubric_drift_when_they_move_past_the_top_value():
    """98% of the reference at 8/10, every current score 10/10: PSI read 0.106, and the check said stable."""
    texts = ["an answer"] * 200
    reference = OutputWindow(texts, [0.8] * 196 + [0.7] * 4)
    score = next(r for r in output_drift(reference, OutputWindow(texts, [1.0] * 200), CONFIG)
                 if r.metric == "judge_score")
    assert score.drifted and score.effect > 5
    same = next(r for r in output_drift(reference, OutputWindow(texts, [0.7] * 4 + [0.8] * 196), CONFIG)
                if r.metric == "judge_score")
    assert same.status == "stable" and same.effect == pytest.approx(0.0)


def test_non_finite_scores_are_dropped_before_they_are_counted():
    """Enough values, all NaN: they passed the min_samples count and reached the KS test empty."""
    texts = ["an answer"] * 100
    nan_scores = output_drift(OutputWindow(texts, [0.5] * 100), OutputWindow(texts, [float("nan")] * 100), CONFIG)
    score = next(r for r in nan_scores if r.metric == "judge_score")
    assert score.status == "nodata" and (score.n_reference, score.n_current) == (100, 0)
    some_nan = [float("nan")] * 10 + [0.5] * 90
    score = next(r for r in output_drift(OutputWindow(texts, [0.5] * 100), OutputWindow(texts, some_nan), CONFIG)
                 if r.metric == "judge_score")
    assert score.status == "stable" and score.n_current == 90


def test_refusal_and_format_compliance_rates():
    assert is_refusal("I'm sorry, but I cannot help with that request.")
    assert is_refusal("As an AI language model, I cannot browse the internet.")
    assert not is_refusal("I can't help but admire the view. Here is the poem you asked for.")
    assert is_refusal("I\u2019m unable to help with that request.") and is_refusal("Sorry! I cannot assist with this.")
    refusals = output_drift(_window("claude-2"), _window(FALCON), DriftConfig(min_samples=30, max_rate_delta=0.03))
    refusal = next(r for r in refusals if r.metric == "refusal_rate")
    assert refusal.drifted and refusal.effect > 0.03
    assert all(is_refusal(e["text"]) for e in refusal.details["examples"])
    ok = OutputWindow([""] * 100, format_ok=[True] * 95 + [False] * 5)
    broken = OutputWindow([""] * 100, format_ok=[True] * 70 + [False] * 30)
    fmt = next(r for r in output_drift(ok, broken, CONFIG) if r.metric == "format_compliance")
    assert fmt.drifted and fmt.effect == pytest.approx(-0.25)


def test_refusal_rate_counts_what_the_refusal_check_fails():
    """One refusal detector: the drift rate and the deterministic check never disagree about an answer, and a
    refusal quoted deep in a story is not the answer's."""
    from evaluators.checks import looks_like_refusal

    assert is_refusal is looks_like_refusal
    story = ("Here is a short story. The robot had served the family for years. One night the child asked it to "
             "open the door. \"I can't help you with that,\" it said.")
    assert not is_refusal(story)


def test_judge_drift_from_agreement_values():
    ref = [True] * 90 + [False] * 10
    assert judge_drift(ref, [True] * 70 + [False] * 30, CONFIG).drifted
    assert judge_drift(ref, [True] * 89 + [False] * 11, CONFIG).status == "stable"  # within max_agreement_drop
    assert judge_drift(ref, [True] * 5, CONFIG).status == "nodata"
    assert judge_drift(np.full(100, 0.8), np.full(100, 0.8), CONFIG).status == "stable"


def test_detect_drift_over_store_windows(engine, minilm):
    """Window 0: selfinstruct, helpful_base and vicuna prompts; the candidate is FuseChat-Gemma. Window 1: koala and
    oasst prompts, and the candidate's answers are falcon-40b's. Input drift and the candidate's output drift are
    found; the incumbent (claude-2 in both windows) does not drift in length."""
    data = mini()
    reference_ids = [p["id"] for p in data.prompts if p["dataset"] not in ("koala", "oasst")]
    current_ids = [p["id"] for p in data.prompts if p["dataset"] in ("koala", "oasst")]
    build_run(engine, run_key="w0", incumbent="claude-2", candidates={"cand": GEMMA}, window=0,
              prompt_ids=reference_ids)
    build_run(engine, run_key="w1", incumbent="claude-2", candidates={"cand": FALCON}, window=1,
              prompt_ids=current_ids)
    minilm.requests.clear()
    report = detect_drift(engine, route_for(["cand"]), TimeWindow(START, START + timedelta(days=1)),
                          TimeWindow(START + timedelta(days=1), START + timedelta(days=2)), CONFIG, minilm,
                          judge_agreement=([True] * 95 + [False] * 5, [True] * 75 + [False] * 25))
    found = {(r.kind, r.metric, r.target) for r in report.drifted}
    assert ("input", "prompt_embeddings", None) in found
    assert ("output", "length", "cand") in found and ("output", "judge_score", "cand") in found
    assert ("output", "length", "incumbent") not in found
    assert ("judge", "teacher_agreement", None) in found
    assert len(minilm.requests) == len(reference_ids) + len(current_ids)
    examples = next(r for r in report.results if r.kind == "input").details["examples"]
    assert examples and all(e["text"] in {p["instruction"] for p in data.prompts} for e in examples)
    assert report.to_dict()["drifted"]


@pytest.mark.parametrize("judged_after", [timedelta(hours=1), timedelta(days=30)], ids=["live", "backfill"])
def test_judge_drift_from_stored_teacher_verdicts(engine, judged_after):
    """The teacher (calibration) agrees with the small judge on every pair in window 0 and on ~70% in window 1.
    Verdicts count in the window of the requests they judged, however long after them the teacher judged."""
    data = mini()
    ids = [p["id"] for p in data.prompts]
    runs = [build_run(engine, run_key=f"w{w}", incumbent="claude-2", candidates={"cand": GEMMA}, window=w,
                      prompt_ids=ids[w * 150:(w + 1) * 150]) for w in (0, 1)]
    rng = np.random.default_rng(5)
    with session_scope(engine) as s:
        students = s.execute(select(Judgment.run_id, Judgment.sample_id, Judgment.preference)
                             .where(Judgment.run_id.in_(runs))).all()
        teacher = []
        for run_id, sample_id, pref in students:
            window = runs.index(run_id)
            agree = window == 0 or rng.random() < 0.7
            says_candidate = (pref > 0.5) == agree
            teacher.append(dict(run_id=run_id, sample_id=sample_id, target="cand", evaluator="teacher-gpt",
                                preference=0.9 if says_candidate else 0.1,
                                details={"role": "teacher", "student": EVALUATOR},
                                created_at=START + timedelta(days=window) + judged_after))
        insert_ignoring_duplicates(s, Judgment, teacher, ["run_id", "sample_id", "target", "evaluator"])
    day = timedelta(days=1)
    windows = TimeWindow(START, START + day), TimeWindow(START + day, START + 2 * day)
    report = detect_drift(engine, route_for(["cand"]), *windows, CONFIG)
    judge = next(r for r in report.results if r.kind == "judge")
    assert judge.drifted and judge.details["reference_agreement"] == 1.0
    assert 0.55 < judge.details["current_agreement"] < 0.85
    later = TimeWindow(START + timedelta(days=5), START + timedelta(days=6))
    assert next(r for r in detect_drift(engine, route_for(["cand"]), windows[0], later, CONFIG).results
                if r.kind == "judge").status == "nodata"


def test_a_busy_window_reads_a_bounded_stable_subsample_of_its_requests(store_url):
    from datetime import UTC, datetime

    from shadowjudge.analysis.drift_data import load_prompts, window_sample_ids
    from shadowjudge.store import TrafficSample, get_engine

    engine = get_engine(store_url)

    def add(first: int, n: int) -> None:
        rows = [dict(request_id=f"r{i}", source="s", source_position=str(i), route="chat", incumbent_model="m",
                     messages=[{"role": "user", "content": f"question {i}"}], params={}, meta={}, redactions={},
                     request_ts=START + timedelta(minutes=i), ingested_at=datetime.now(UTC), cache_hit=False)
                for i in range(first, first + n)]
        with session_scope(engine) as s:
            insert_ignoring_duplicates(s, TrafficSample, rows, ["request_id"])

    add(0, 400)
    window = TimeWindow(START, START + timedelta(days=1))
    before = window_sample_ids(engine, "chat", window, limit=100)
    assert len(before) == 100 and len(window_sample_ids(engine, "chat", window)) == 400
    add(400, 40)  # the window moves on by 10%
    after = window_sample_ids(engine, "chat", window, limit=100)
    assert len(after) == 100 and len(set(before) & set(after)) >= 60
    prompts = load_prompts(engine, after)
    assert len(prompts) == 100 and all(p.startswith("question ") for p in prompts)


def test_a_candidates_drift_windows_hold_its_replays_not_the_requests_subsample(store_url):
    """A candidate replays a share of the requests. Its answers were read from the window's hash subsample of
    requests, so with 2000 requests a window, 150 replays and max_window_rows=400 about 30 of them counted (20000,
    1000 and 5000: 246); its replays come first now, and the row limit applies to them."""
    import random
    from datetime import UTC, datetime

    from shadowjudge.store import ShadowResult, ShadowRun, TrafficSample, get_engine

    engine = get_engine(store_url)
    per_window, replays = 2000, 150
    rows = [dict(request_id=f"r{i}", source="s", source_position=str(i), route="chat", incumbent_model="m",
                 messages=[{"role": "user", "content": f"question {i}"}], params={}, meta={}, redactions={},
                 response_text="an answer", request_ts=START + timedelta(seconds=i * 86400 // per_window),
                 ingested_at=datetime.now(UTC), cache_hit=False) for i in range(2 * per_window)]
    with session_scope(engine) as s:
        insert_ignoring_duplicates(s, TrafficSample, rows, ["request_id"])
        ids = dict(s.execute(select(TrafficSample.request_id, TrafficSample.id)).all())
        run = ShadowRun(run_key="k", route="chat", config_hash="h", status="finished")
        s.add(run)
        s.flush()
        rng = random.Random(0)
        replayed = [ids[f"r{i}"] for w in (0, 1) for i in rng.sample(range(w * per_window, (w + 1) * per_window),
                                                                       replays)]
        s.add_all(ShadowResult(run_id=run.id, sample_id=sid, target="cand", model="cand", attempt=0,
                               output_text="a candidate answer") for sid in replayed)
    day = timedelta(days=1)
    config = DriftConfig(min_samples=30, permutations=100, max_window_rows=400)
    report = detect_drift(engine, route_for(["cand"]), TimeWindow(START, START + day),
                          TimeWindow(START + day, START + 2 * day), config, judge_agreement=([], []))
    length = {r.target: r for r in report.results if r.metric == "length"}
    assert (length["cand"].n_reference, length["cand"].n_current) == (replays, replays)
    assert (length["incumbent"].n_reference, length["incumbent"].n_current) == (400, 400)


def test_the_incumbents_output_window_holds_only_the_logged_answers_it_served(store_url):
    """A week before the rollout, then a day with the candidate on half the route: its logged answers (longer, and
    logged under its model with or without a provider prefix) were read as the incumbent's outputs, and the
    incumbent's output length drifted although the incumbent changed nothing."""
    import random
    from datetime import UTC, datetime

    from shadowjudge.analysis import load_output_window
    from shadowjudge.analysis.drift_data import window_sample_ids
    from shadowjudge.store import TrafficSample, get_engine

    engine = get_engine(store_url)
    rng, per_window, day = random.Random(0), 300, timedelta(days=1)

    def answer(served_by: str) -> str:
        return ("claude " if served_by.endswith("claude-2") else "the candidate's longer answer ") * rng.randint(5, 15)

    rollout_logs = ["claude-2", "cand", "OpenAI/CAND", "anthropic/claude-2"]  # the candidate served half of them
    served_by = ["claude-2"] * per_window + rollout_logs * (per_window // 4)
    rows = [dict(request_id=f"r{i}", source="s", source_position=str(i), route="chat", incumbent_model=model,
                 messages=[{"role": "user", "content": f"question {i}"}], params={}, meta={}, redactions={},
                 response_text=answer(model), request_ts=START + i * day / per_window, ingested_at=datetime.now(UTC),
                 cache_hit=False) for i, model in enumerate(served_by)]
    with session_scope(engine) as s:
        insert_ignoring_duplicates(s, TrafficSample, rows, ["request_id"])
    route = route_for(["cand"])
    before, rollout = TimeWindow(START, START + day), TimeWindow(START + day, START + 2 * day)

    report = detect_drift(engine, route, before, rollout, DriftConfig(min_samples=30, permutations=100,
                                                                      max_window_rows=100), judge_agreement=([], []))
    length = next(r for r in report.results if r.metric == "length" and r.target == "incumbent")
    assert length.status == "stable" and (length.n_reference, length.n_current) == (100, 100)
    assert {t.split()[0] for t in load_output_window(engine, route, "incumbent", rollout).texts} == {"claude"}
    assert len(window_sample_ids(engine, "chat", rollout)) == per_window  # the requests: input drift reads them all
    assert len(window_sample_ids(engine, "chat", rollout, incumbent_of=route)) == per_window // 2
