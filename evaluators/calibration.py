"""Calibration in production: a deterministic fraction of the pairs the small judge scored is also judged by the
teacher, and their agreement over time is what tells the analysis stage the small judge has drifted.

Selection hashes (sample, target), so reruns pick the same pairs and a pair is never judged twice by the teacher;
the teacher's verdicts are `Judgment` rows under the teacher's own version string, with
`details = {"role": "teacher", "student": <small judge version>, ...}`. A selected pair the teacher already judged
for training (role "label", evaluators.traffic_labels) is not asked again: that verdict becomes the calibration one.
A pair counts once in the agreement, by its latest teacher verdict (a teacher model changed and rerun replaces the
reference, it does not add a second one), against the preference of the student being measured.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select, update

from shadowjudge.store import (
    Judgment,
    ShadowResult,
    ShadowRun,
    TrafficSample,
    insert_ignoring_duplicates,
    session_scope,
)

if TYPE_CHECKING:
    from evaluators.llm_judge import LlmJudge, PairVerdict
    from shadowjudge.config import JudgeConfig

TEACHER_ROLE = "teacher"
LABEL_ROLE = "label"  # a verdict bought for training labels (evaluators.traffic_labels)


def selected_for_calibration(request_id: str, target: str, fraction: float) -> bool:
    """Deterministic Bernoulli(fraction) on the pair's identity: the same pairs on every rerun and every machine."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.sha256(f"calibration:{request_id}:{target}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class TeacherTask:
    """One stored pair for the teacher: where its verdict goes (run, sample, target) and the texts it reads."""

    run_id: int
    sample_id: int
    target: str
    prompt: str
    incumbent: str
    candidate: str


def readable_preference(preference: float | None, details: dict[str, Any] | None) -> float | None:
    """A stored teacher preference, or None where neither answer order gave a verdict its reply could be read as
    (the stored value is then a placeholder tie, which must not count as the teacher's view)."""
    orders = ("candidate_first", "incumbent_first")
    if details and all(k in details for k in orders) and all(details[k] is None for k in orders):
        return None
    return preference


def judge_and_store(engine: Engine, teacher: "LlmJudge", tasks: Sequence[TeacherTask], details: dict[str, Any], *,
                    batch_size: int = 16, progress: Callable[[int, int], None] | None = None
                    ) -> dict[tuple[int, int, str], float | None]:
    """The teacher's preference for each task (`readable_preference`), stored as a Judgment row under the
    teacher's version (`details` plus which order said what) batch by batch, so an interrupted run keeps every
    verdict it paid for. Calibration and training labels both ask the teacher through here."""
    from evaluators.llm_judge import LlmJudgeError

    verdicts: dict[tuple[int, int, str], float | None] = {}
    for start in range(0, len(tasks), batch_size):
        batch = tasks[start:start + batch_size]
        failure: LlmJudgeError | None = None
        try:
            judged: Sequence[PairVerdict | None] = teacher.judge_pairs(
                [t.prompt for t in batch], [t.incumbent for t in batch], [t.candidate for t in batch])
        except LlmJudgeError as exc:  # the pairs judged before it are stored: a retry pays only for the rest
            judged, failure = exc.completed, exc
        records = [dict(run_id=t.run_id, sample_id=t.sample_id, target=t.target, evaluator=teacher.version,
                        candidate_score=None, incumbent_score=None, preference=v.preference,
                        details={**details, "candidate_first": v.candidate_first,
                                 "incumbent_first": v.incumbent_first})
                   for t, v in zip(batch, judged) if v is not None]
        if records:
            with session_scope(engine) as s:
                insert_ignoring_duplicates(s, Judgment, records, ["run_id", "sample_id", "target", "evaluator"])
        verdicts.update({(r["run_id"], r["sample_id"], r["target"]): readable_preference(r["preference"], r["details"])
                         for r in records})
        if failure is not None:
            raise failure
        if progress:
            progress(start + len(batch), len(tasks))
    return verdicts


@dataclass
class CalibrationReport:
    teacher: str
    student: str
    selected: int
    judged: int
    already_judged: int
    agreement: "AgreementStats | None" = None


def calibrate_run(engine: Engine, run_id: int, student_version: str, teacher: "LlmJudge", fraction: float,
                  *, batch_size: int = 16) -> CalibrationReport:
    """Send the selected share of a run's student-judged pairs to the teacher and store its verdicts."""
    from shadowjudge.scoring import prompt_text

    with session_scope(engine) as s:
        rows = s.execute(
            select(Judgment.sample_id, Judgment.target, TrafficSample.request_id, TrafficSample.messages,
                   TrafficSample.response_text, ShadowResult.output_text)
            .join(TrafficSample, TrafficSample.id == Judgment.sample_id)
            .join(ShadowResult, (ShadowResult.run_id == Judgment.run_id)
                  & (ShadowResult.sample_id == Judgment.sample_id) & (ShadowResult.target == Judgment.target)
                  & (ShadowResult.attempt == 0))
            .where(Judgment.run_id == run_id, Judgment.evaluator == student_version)
            .order_by(Judgment.sample_id, Judgment.target)
        ).all()
        done = {(r.sample_id, r.target): r for r in s.execute(
            select(Judgment.id, Judgment.sample_id, Judgment.target, Judgment.details)
            .where(Judgment.run_id == run_id, Judgment.evaluator == teacher.version)).all()}
        chosen = [r for r in rows if selected_for_calibration(r.request_id, r.target, fraction)
                  and r.response_text is not None and r.output_text is not None]
        # Same teacher, same answers: a training label is this pair's calibration verdict, without a second call.
        for r in chosen:
            label = done.get((r.sample_id, r.target))
            if label is not None and isinstance(label.details, dict) and label.details.get("role") == LABEL_ROLE:
                s.execute(update(Judgment).where(Judgment.id == label.id).values(
                    details={**label.details, "role": TEACHER_ROLE, "student": student_version,
                             "labelled_for_training": True}))
    todo = [r for r in chosen if (r.sample_id, r.target) not in done]
    judge_and_store(engine, teacher, [TeacherTask(run_id, r.sample_id, r.target, prompt_text(r.messages),
                                                  r.response_text, r.output_text) for r in todo],
                    {"role": TEACHER_ROLE, "student": student_version}, batch_size=batch_size)
    with session_scope(engine) as s:
        route = s.scalar(select(ShadowRun.route).where(ShadowRun.id == run_id))
    agreement = judge_agreement(engine, route, run_id=run_id, student=student_version) if route is not None else None
    return CalibrationReport(teacher.version, student_version, len(chosen), len(todo), len(chosen) - len(todo),
                             agreement)


@dataclass
class AgreementStats:
    """How often the small judge picks the teacher's winner (teacher ties excluded), with a 95% Wilson interval.

    Beside it, what separates a judge that learned the teacher's taste from one that learned length: agreement on
    length-balanced pairs (length ratio 0.67-1.5) and how often each judge picks the longer answer. `values` holds
    each pair's agreement (1.0/0.0) in request-time order, for drift tests between windows. `mean_abs_error` is over
    every pair the teacher gave a verdict on, ties included; a pair neither order could be read for counts nowhere.
    """

    n: int
    agreement: float
    ci_low: float
    ci_high: float
    mean_abs_error: float
    n_balanced: int = 0
    balanced_agreement: float = float("nan")
    student_prefers_longer: float = float("nan")
    teacher_prefers_longer: float = float("nan")
    values: list[float] = field(default_factory=list, repr=False)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def judge_agreement(engine: Engine, route: str, since: datetime | None = None,
                    until: datetime | None = None, run_id: int | None = None,
                    student: str | None = None) -> AgreementStats:
    """Agreement between the small judge and the teacher on a route's calibrated pairs: those of requests made in
    [since, until) (by request time, as the drift windows are, however much later the teacher judged them), or of
    one run.

    Each pair counts once, by its latest teacher verdict. `student` is the judge version measured, by its own
    preferences (a run rescored by a new judge is that judge's agreement, without asking the teacher again); by
    default each verdict's `details["student"]`, the judge it was bought to calibrate."""
    query = (select(Judgment.id, Judgment.run_id, Judgment.sample_id, Judgment.target, Judgment.preference,
                    Judgment.details,
                    func.length(TrafficSample.response_text).label("incumbent_chars"),
                    func.length(ShadowResult.output_text).label("candidate_chars"))
             .join(TrafficSample, TrafficSample.id == Judgment.sample_id)
             .outerjoin(ShadowResult, (ShadowResult.run_id == Judgment.run_id)
                        & (ShadowResult.sample_id == Judgment.sample_id) & (ShadowResult.target == Judgment.target)
                        & (ShadowResult.attempt == 0))
             .where(TrafficSample.route == route, Judgment.preference.is_not(None))
             .order_by(TrafficSample.request_ts, Judgment.id))
    if since is not None:
        query = query.where(TrafficSample.request_ts >= since)
    if until is not None:
        query = query.where(TrafficSample.request_ts < until)
    if run_id is not None:
        query = query.where(Judgment.run_id == run_id)

    def student_of(row: Any) -> str | None:
        return student or row.details.get("student")

    with session_scope(engine) as s:
        latest: dict[tuple[int, int, str], Any] = {}  # one pair, one reference: its latest teacher verdict
        for r in s.execute(query).all():  # a pair's rows share a request time, then come in id order
            if isinstance(r.details, dict) and r.details.get("role") == TEACHER_ROLE:
                latest[(r.run_id, r.sample_id, r.target)] = r
        teacher_rows = list(latest.values())
        students: dict[tuple[int, int, str, str], float] = {}
        run_ids = sorted({r.run_id for r in teacher_rows})
        versions = sorted({v for v in map(student_of, teacher_rows) if v})
        if run_ids and versions:
            for run_id, sample_id, target, evaluator, pref in s.execute(
                select(Judgment.run_id, Judgment.sample_id, Judgment.target, Judgment.evaluator, Judgment.preference)
                .where(Judgment.run_id.in_(run_ids), Judgment.evaluator.in_(versions))
            ).all():
                if pref is not None:
                    students[(run_id, sample_id, target, evaluator)] = pref
    values: list[float] = []
    errors: list[float] = []
    # Decided pairs: student and teacher preference, incumbent and candidate answer lengths.
    sized: list[tuple[float, float, int, int]] = []
    for r in teacher_rows:
        student_pref = students.get((r.run_id, r.sample_id, r.target, student_of(r)))
        teacher_pref = readable_preference(r.preference, r.details)
        if student_pref is None or teacher_pref is None:
            continue
        errors.append(abs(student_pref - teacher_pref))
        if abs(teacher_pref - 0.5) < 1e-9:
            continue  # the teacher could not decide (or contradicted itself across orders)
        values.append(1.0 if (student_pref > 0.5) == (teacher_pref > 0.5) else 0.0)
        if r.incumbent_chars is not None and r.candidate_chars is not None:
            sized.append((student_pref, teacher_pref, r.incumbent_chars, r.candidate_chars))
    n, hits = len(values), int(sum(values))
    low, high = wilson_interval(hits, n)
    stats = AgreementStats(n=n, agreement=hits / n if n else float("nan"), ci_low=low, ci_high=high,
                           mean_abs_error=sum(errors) / len(errors) if errors else float("nan"), values=values)
    if sized:
        from evaluators.judge_metrics import pair_metrics

        student_prefs, teacher_prefs, inc_chars, cand_chars = zip(*sized, strict=True)
        by_student = pair_metrics(student_prefs, teacher_prefs, inc_chars, cand_chars)
        by_teacher = pair_metrics(teacher_prefs, teacher_prefs, inc_chars, cand_chars)
        stats.n_balanced, stats.balanced_agreement = by_student.n_balanced, by_student.balanced_agreement
        stats.student_prefers_longer = by_student.prefers_longer
        stats.teacher_prefers_longer = by_teacher.prefers_longer
    return stats


def calibrate_from_config(engine: Engine, run_id: int, judge: "JudgeConfig", student_version: str
                          ) -> CalibrationReport | None:
    """What the cycle calls after scoring: nothing when calibration_fraction is 0, else calibrate_run."""
    if judge.calibration_fraction <= 0:
        return None
    from evaluators.factory import EvaluatorConfigError
    from evaluators.llm_judge import LlmJudge

    if judge.teacher is None:
        raise EvaluatorConfigError("judge.calibration_fraction > 0 needs judge.teacher (the LLM judge endpoint)")
    return calibrate_run(engine, run_id, student_version, LlmJudge.from_target(judge.teacher),
                         judge.calibration_fraction)
