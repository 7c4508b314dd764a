"""Calibration against the teacher, on real stores (SQLite and PostgreSQL): deterministic selection, idempotent
teacher rows, and the agreement statistic the judge-drift alert reads."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from pydantic import ValidationError
from openai import OpenAI

from evaluators.calibration import (
    TEACHER_ROLE,
    calibrate_from_config,
    calibrate_run,
    judge_agreement,
    readable_preference,
    selected_for_calibration,
    wilson_interval,
)
from evaluators.factory import EvaluatorConfigError
from evaluators.llm_judge import LlmJudge, LlmJudgeError
from shadowjudge.config import JudgeConfig
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, get_engine, session_scope

STUDENT = "small-judge:models:/j/1"
N = 40


def teacher_transport(calls: list[str], unreadable: frozenset[int] = frozenset(),
                      too_long: frozenset[int] = frozenset(), key_revoked_at: int | None = None) -> httpx.MockTransport:
    """A chat endpoint whose verdict follows the visible rule 'the answer containing GOOD wins'; its replies about
    the questions numbered in `unreadable` name no winner, those numbered in `too_long` are refused (HTTP 400, over
    the context length), and from call number `key_revoked_at` on every request fails authentication (HTTP 401)."""

    def handler(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["messages"][-1]["content"]
        calls.append(user)
        a = user.split("## Answer A", 1)[1].split("## Answer B", 1)[0]
        question = int(user.split("question ", 1)[1].split(None, 1)[0])
        if key_revoked_at is not None and len(calls) >= key_revoked_at:
            return httpx.Response(401, json={"error": {"message": "Incorrect API key", "code": "invalid_api_key"}})
        if question in too_long:
            return httpx.Response(400, json={"error": {"message": "This model's maximum context length is 8192 tokens",
                                                       "type": "invalid_request_error",
                                                       "code": "context_length_exceeded"}})
        content = "Both have merit." if question in unreadable else json.dumps({"winner": "A" if "GOOD" in a else "B"})
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "teacher",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]})

    return httpx.MockTransport(handler)


def seed_run(engine) -> int:
    """N samples; the candidate's answer is GOOD on even samples; the student agrees on all but 4 of them."""
    now = datetime.now(timezone.utc)
    with session_scope(engine) as s:
        run = ShadowRun(run_key="r1", route="chat", config_hash="h")
        s.add(run)
        s.flush()
        for i in range(N):
            sample = TrafficSample(request_id=f"req-{i}", source="logs", source_position=str(i), route="chat",
                                   incumbent_model="inc", messages=[{"role": "user", "content": f"question {i}"}],
                                   response_text="incumbent answer" + ("" if i % 2 == 0 else " GOOD"),
                                   request_ts=now)
            s.add(sample)
            s.flush()
            s.add(ShadowResult(run_id=run.id, sample_id=sample.id, target="cand", model="cand-model",
                               output_text="candidate answer" + (" GOOD" if i % 2 == 0 else "")))
            teacher_says_candidate = i % 2 == 0
            student_pref = 0.8 if teacher_says_candidate != (i < 4) else 0.2
            s.add(Judgment(run_id=run.id, sample_id=sample.id, target="cand", evaluator=STUDENT,
                           candidate_score=0.5, incumbent_score=0.5, preference=student_pref))
        return run.id


def test_selection_is_deterministic_and_close_to_the_fraction():
    picks = [selected_for_calibration(f"req-{i}", "cand", 0.2) for i in range(5000)]
    assert picks == [selected_for_calibration(f"req-{i}", "cand", 0.2) for i in range(5000)]
    assert 0.18 < sum(picks) / len(picks) < 0.22
    assert not selected_for_calibration("x", "c", 0.0) and selected_for_calibration("x", "c", 1.0)


def test_calibration_stores_teacher_verdicts_once_and_measures_agreement(store_url):
    engine = get_engine(store_url)
    run_id = seed_run(engine)
    calls: list[str] = []
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=teacher_transport(calls))), "teacher", concurrency=4)
    report = calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0)
    assert (report.selected, report.judged, report.already_judged) == (N, N, 0)
    assert len(calls) == 2 * N  # both orders per pair
    again = calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0)
    assert (again.judged, again.already_judged) == (0, N) and len(calls) == 2 * N
    with session_scope(engine) as s:
        rows = s.query(Judgment).filter(Judgment.evaluator == teacher.version).all()
        assert len(rows) == N
        assert all(r.details["role"] == TEACHER_ROLE and r.details["student"] == STUDENT for r in rows)
        assert {r.preference for r in rows} == {0.0, 1.0}

    stats = judge_agreement(engine, "chat")
    assert stats.n == N and stats.agreement == pytest.approx((N - 4) / N)
    assert stats.ci_low < stats.agreement < stats.ci_high
    assert stats.values.count(0.0) == 4
    # GOOD answers are the longer ones (21 vs 16 characters, a balanced ratio): the teacher always picks the longer
    # answer, the student all but the 4 times it disagrees.
    assert stats.n_balanced == N and stats.balanced_agreement == pytest.approx((N - 4) / N)
    assert stats.teacher_prefers_longer == 1.0 and stats.student_prefers_longer == pytest.approx((N - 4) / N)
    assert judge_agreement(engine, "other-route").n == 0
    assert judge_agreement(engine, "chat", since=datetime.now(timezone.utc) + timedelta(hours=1)).n == 0


def test_pairs_no_order_could_read_count_in_no_statistic(store_url):
    """Their stored 0.5 is a placeholder, not the teacher's view: it is no tie, and no error of the student's."""
    engine = get_engine(store_url)
    run_id = seed_run(engine)
    unreadable = frozenset(range(1, N, 4))  # 10 pairs, one of them among the 4 the student gets wrong
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=teacher_transport([], unreadable))), "teacher")
    stats = calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0).agreement
    readable = N - len(unreadable)
    assert stats.n == readable and stats.values.count(0.0) == 3
    # the student's 0.8/0.2 is 0.2 off the teacher's 1/0 where they agree, 0.8 off where not
    assert stats.mean_abs_error == pytest.approx(((readable - 3) * 0.2 + 3 * 0.8) / readable)


def test_this_cycles_verdicts_fall_in_this_cycles_drift_window(store_url):
    """The judge-drift check windows verdicts by the time of the requests they judged, as the drift windows are
    (the teacher judges a request after it was made, and a backfill judges last month's requests today)."""
    from shadowjudge.analysis.drift_data import teacher_agreement
    from shadowjudge.cycle import drift_windows

    engine = get_engine(store_url)
    run_id = seed_run(engine)
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=teacher_transport([]))), "teacher")
    calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0)
    reference, current = drift_windows(engine, "chat", 24, 168)
    assert [len(values) for values in teacher_agreement(engine, "chat", reference, current)] == [0, N]
    requested = datetime.now(timezone.utc) - timedelta(days=30)
    with session_scope(engine) as s:
        s.query(TrafficSample).update({TrafficSample.request_ts: requested})
    reference, current = drift_windows(engine, "chat", 24, 168)
    assert [len(values) for values in teacher_agreement(engine, "chat", reference, current)] == [0, N]
    assert judge_agreement(engine, "chat", since=requested + timedelta(seconds=1)).n == 0


def test_partial_fraction_picks_the_same_pairs_on_rerun(store_url):
    engine = get_engine(store_url)
    run_id = seed_run(engine)
    calls: list[str] = []
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=teacher_transport(calls))), "teacher")
    first = calibrate_run(engine, run_id, STUDENT, teacher, fraction=0.3)
    expected = sum(selected_for_calibration(f"req-{i}", "cand", 0.3) for i in range(N))
    assert first.selected == first.judged == expected > 0
    assert calibrate_run(engine, run_id, STUDENT, teacher, fraction=0.3).judged == 0


def test_pairs_already_labelled_for_training_count_in_calibration_without_a_second_call(store_url, tmp_path):
    from evaluators.traffic_labels import label_stored_traffic

    engine = get_engine(store_url)
    run_id = seed_run(engine)
    calls: list[str] = []
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=teacher_transport(calls))), "teacher")
    labelled = label_stored_traffic(engine, "chat", teacher, tmp_path / "labels", max_pairs=N // 2)
    assert labelled.teacher_calls == N // 2 and len(calls) == N
    report = calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0)
    assert (report.selected, report.judged, report.already_judged) == (N, N // 2, N // 2)
    assert len(calls) == 2 * N  # only the pairs not labelled before
    assert report.agreement.n == N and report.agreement.agreement == pytest.approx((N - 4) / N)
    with session_scope(engine) as s:
        rows = s.query(Judgment).filter(Judgment.evaluator == teacher.version).all()
    assert len(rows) == N and all(r.details["role"] == TEACHER_ROLE and r.details["student"] == STUDENT
                                  for r in rows)
    assert sum(bool(r.details.get("labelled_for_training")) for r in rows) == N // 2
    # the labels stay reusable for training: a rerun of the labelling asks the teacher nothing
    assert label_stored_traffic(engine, "chat", teacher, tmp_path / "labels", max_pairs=N).teacher_calls == 0


def test_a_pair_the_teacher_refuses_is_stored_unusable_and_the_rest_once(store_url):
    """One answer over the teacher's context length (HTTP 400) failed the batch: its other verdicts were paid for
    but not stored, and every retry and rerun paid for them again and failed again."""
    engine = get_engine(store_url)
    run_id = seed_run(engine)
    calls: list[str] = []
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1", max_retries=0,
                              http_client=httpx.Client(transport=teacher_transport(calls, too_long=frozenset({7})))),
                       "teacher", concurrency=4)
    report = calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0)
    assert (report.selected, report.judged) == (N, N) and len(calls) <= 2 * N
    assert report.agreement.n == N - 1
    with session_scope(engine) as s:
        rows = {r.sample_id: r for r in s.query(Judgment).filter(Judgment.evaluator == teacher.version)}
        assert len(rows) == N
        refused = [r for r in rows.values() if readable_preference(r.preference, r.details) is None]
        assert [(r.details["candidate_first"], r.details["incumbent_first"]) for r in refused] == [(None, None)]
    paid = len(calls)
    assert calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0).judged == 0 and len(calls) == paid


def test_a_teacher_failing_mid_batch_keeps_the_verdicts_already_paid_for(store_url):
    """A revoked key partway through a batch (after 5 pairs): the verdicts finished before it are stored, and the
    next calibration asks only for the rest."""
    engine = get_engine(store_url)
    run_id = seed_run(engine)
    calls: list[str] = []
    revoked = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1", max_retries=0,
                              http_client=httpx.Client(transport=teacher_transport(calls, key_revoked_at=11))),
                       "teacher", concurrency=1)
    with pytest.raises(LlmJudgeError, match="AuthenticationError"):
        calibrate_run(engine, run_id, STUDENT, revoked, fraction=1.0)
    with session_scope(engine) as s:
        assert s.query(Judgment).filter(Judgment.evaluator == revoked.version).count() == 5
    calls.clear()
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=teacher_transport(calls))), "teacher")
    report = calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0)
    assert (report.judged, report.already_judged) == (N - 5, 5) and len(calls) == 2 * (N - 5)


def test_a_run_rescored_by_a_new_judge_reports_that_judges_agreement(store_url):
    """The teacher's verdicts were paired with the judge recorded at the first calibration: a run rescored by a new
    champion reported the old judge's agreement under the new judge's name."""
    engine = get_engine(store_url)
    run_id = seed_run(engine)
    calls: list[str] = []
    teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                              http_client=httpx.Client(transport=teacher_transport(calls))), "teacher")
    assert calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0).agreement.agreement == pytest.approx(0.9)
    new_judge = "small-judge:models:/j/2"
    with session_scope(engine) as s:  # the new judge contradicts the teacher on every pair
        for sample_id, target in s.query(ShadowResult.sample_id, ShadowResult.target).filter_by(run_id=run_id).all():
            good = "GOOD" in s.get(TrafficSample, sample_id).response_text
            s.add(Judgment(run_id=run_id, sample_id=sample_id, target=target, evaluator=new_judge,
                           candidate_score=0.5, incumbent_score=0.5, preference=0.8 if good else 0.2))
    paid = len(calls)
    report = calibrate_run(engine, run_id, new_judge, teacher, fraction=1.0)
    assert report.student == new_judge and report.agreement.n == N and report.agreement.agreement == 0.0
    assert len(calls) == paid


def test_a_new_teacher_model_replaces_the_reference_instead_of_adding_to_it(store_url):
    """A teacher model changed and the run calibrated again counted every pair twice (n doubled, the interval
    narrowed on no new data, a drift window mixed two references)."""
    engine = get_engine(store_url)
    run_id = seed_run(engine)
    for model in ("teacher", "teacher-2"):
        teacher = LlmJudge(OpenAI(api_key="k", base_url="http://teacher.test/v1",
                                  http_client=httpx.Client(transport=teacher_transport([]))), model)
        assert calibrate_run(engine, run_id, STUDENT, teacher, fraction=1.0).agreement.n == N
    assert len(judge_agreement(engine, "chat").values) == N


def test_config_driven_calibration(sqlite_url):
    engine = get_engine(sqlite_url)
    assert calibrate_from_config(engine, 1, JudgeConfig(), STUDENT) is None
    with pytest.raises(EvaluatorConfigError, match="judge.teacher"):  # a config built without validation
        calibrate_from_config(engine, 1, JudgeConfig.model_construct(calibration_fraction=0.1, teacher=None), STUDENT)
    with pytest.raises(ValidationError, match="judge.teacher"):  # a config file is refused on load
        JudgeConfig(calibration_fraction=0.1)


def test_wilson_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(90, 100)
    assert 0.82 < low < 0.9 < high < 0.95
