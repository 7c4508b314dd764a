"""Drift checks over the store: two time windows of a route's traffic, compared input, output and judge-wise.

Windows are by request time (`traffic_samples.request_ts`): what production saw, not when it was replayed. The
incumbent's outputs are what production answered (the logged response, where the incumbent served it); a
candidate's are its replays.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, exists, select

from shadowjudge.analysis.drift import DriftReport, DriftResult, OutputWindow, input_drift, judge_drift, output_drift
from shadowjudge.analysis.embeddings import PromptEmbedder
from shadowjudge.config import DriftConfig, RouteConfig, incumbent_served
from shadowjudge.scoring import prompt_text
from shadowjudge.store import Judgment, ShadowResult, ShadowRun, TrafficSample, session_scope

FormatCheck = Callable[[dict[str, Any], str], bool | None]


@dataclass(frozen=True)
class TimeWindow:
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"time window ends ({self.end}) before it starts ({self.start})")

    @property
    def label(self) -> str:
        return f"{self.start.isoformat()}/{self.end.isoformat()}"


def json_when_asked(params: dict[str, Any], text: str) -> bool | None:
    """Format compliance of an answer: valid JSON when the request asked for JSON; not applicable otherwise."""
    response_format = (params or {}).get("response_format") or {}
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind not in ("json_object", "json_schema"):
        return None
    try:
        json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False
    return True


def _in_window(query, window: TimeWindow):
    return query.where(TrafficSample.request_ts >= window.start, TrafficSample.request_ts < window.end)


_ID_CHUNK = 900  # ids per IN (...) list: well under every backend's parameter limit


def _id_hash(sample_id: int) -> int:
    return (sample_id * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF  # Fibonacci hashing: a fixed shuffle of the ids


def window_sample_ids(engine: Engine, route: str, window: TimeWindow, limit: int | None = None,
                      replayed_by: str | None = None, incumbent_of: RouteConfig | None = None) -> list[int]:
    """The route's sample ids in `window` (read from the (route, request_ts) index alone, unless `incumbent_of` asks
    for the logged model too), at most `limit` of them: those with the smallest id hashes, so a busy week's window
    costs `limit` rows, not millions, and consecutive cycles over a sliding window keep most of the same samples.

    With `replayed_by`, only the samples that target has a replay of (attempt 0) count, and the limit applies to
    those: a candidate replays a small share of the requests, and limiting the window first kept only the share of
    it that fell in the hash subsample (246 of 1000 replays in a window of 20000 requests). With `incumbent_of`
    (the route's config), only the samples its incumbent served count, the limit applying to those too: during a
    rollout a candidate answers part of the route, and its logged answers are not the incumbent's outputs."""
    columns = (TrafficSample.id,) if incumbent_of is None else (TrafficSample.id, TrafficSample.incumbent_model)
    query = _in_window(select(*columns).where(TrafficSample.route == route), window)
    if replayed_by is not None:
        query = query.where(exists().where(ShadowResult.sample_id == TrafficSample.id,
                                           ShadowResult.target == replayed_by, ShadowResult.attempt == 0))
    with session_scope(engine) as s:
        ids = list(s.scalars(query)) if incumbent_of is None else incumbent_served(incumbent_of, s.execute(query))
    if limit is not None and len(ids) > limit:
        ids = sorted(ids, key=_id_hash)[:limit]
    return sorted(ids)


def _chunks(ids: Sequence[int]):
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start:start + _ID_CHUNK]


def load_prompts(engine: Engine, sample_ids: Sequence[int]) -> list[str]:
    """Prompt texts of the requests `sample_ids` (a window's subsample, chosen with `window_sample_ids`)."""
    ids = list(sample_ids)
    rows: list = []
    with session_scope(engine) as s:
        for chunk in _chunks(ids):
            rows += s.scalars(select(TrafficSample.messages).where(TrafficSample.id.in_(chunk))
                              .order_by(TrafficSample.id)).all()
    return [text for text in (prompt_text(m) for m in rows) if text]


def latest_evaluator(engine: Engine, route: str) -> str | None:
    """The judge of the route's latest judged run: windows judged by different versions must not be compared."""
    with session_scope(engine) as s:
        return s.scalar(select(ShadowRun.judge_version).where(ShadowRun.route == route,
                                                              ShadowRun.judge_version.is_not(None))
                        .order_by(ShadowRun.id.desc()).limit(1))


def load_output_window(engine: Engine, route: RouteConfig, target: str, window: TimeWindow,
                       evaluator_version: str | None = None, format_check: FormatCheck = json_when_asked,
                       sample_ids: Sequence[int] | None = None) -> OutputWindow:
    """One target's answers, judge scores and format checks for the route's requests in `window` (or for the
    window's `sample_ids`, when the caller has chosen a subsample with `window_sample_ids`)."""
    incumbent = target == route.incumbent.name
    if sample_ids is None:
        sample_ids = (window_sample_ids(engine, route.name, window, incumbent_of=route) if incumbent
                      else window_sample_ids(engine, route.name, window, replayed_by=target))
    rows: list = []
    scores: dict[int, float] = {}
    with session_scope(engine) as s:
        for chunk in _chunks(list(sample_ids)):
            if incumbent:
                rows += s.execute(select(TrafficSample.id, TrafficSample.params, TrafficSample.response_text)
                                  .where(TrafficSample.id.in_(chunk)).order_by(TrafficSample.id)).all()
            else:
                rows += s.execute(select(TrafficSample.id, TrafficSample.params, ShadowResult.output_text)
                                  .join(ShadowResult, ShadowResult.sample_id == TrafficSample.id)
                                  .where(TrafficSample.id.in_(chunk), ShadowResult.target == target,
                                         ShadowResult.attempt == 0)
                                  .order_by(TrafficSample.id, ShadowResult.id)).all()
            if not evaluator_version:
                continue
            score_col = Judgment.incumbent_score if incumbent else Judgment.candidate_score
            query = select(Judgment.sample_id, score_col).where(Judgment.sample_id.in_(chunk),
                                                                Judgment.evaluator == evaluator_version)
            if not incumbent:
                query = query.where(Judgment.target == target)
            for sample_id, value in s.execute(query.order_by(Judgment.id)).all():
                if value is not None:
                    scores.setdefault(sample_id, float(value))  # the incumbent's score repeats per candidate
    seen: set[int] = set()
    texts: list[str | None] = []
    format_ok: list[bool] = []
    for sample_id, params, text in rows:
        if sample_id in seen:  # one answer per request, even if several runs replayed it
            continue
        seen.add(sample_id)
        texts.append(text)
        if text is not None:
            verdict = format_check(params or {}, text)
            if verdict is not None:
                format_ok.append(verdict)
    return OutputWindow(texts, [scores[i] for i in sorted(scores)], format_ok)


def teacher_agreement(engine: Engine, route: str, reference: TimeWindow,
                      current: TimeWindow) -> tuple[list[float], list[float]]:
    """Per-pair agreement of the small judge with its teacher in each window, by the request time of the pairs the
    teacher judged (not when it judged them: a cycle's calibration follows its requests, and a backfill's comes
    days after them)."""
    from evaluators.calibration import judge_agreement

    return (judge_agreement(engine, route, reference.start, reference.end).values,
            judge_agreement(engine, route, current.start, current.end).values)


def detect_drift(engine: Engine, route: RouteConfig, reference: TimeWindow, current: TimeWindow,
                 config: DriftConfig, embedder: PromptEmbedder | None = None, evaluator_version: str | None = None,
                 judge_agreement: tuple[Sequence[float | bool], Sequence[float | bool]] | None = None,
                 format_check: FormatCheck = json_when_asked, seed: int = 0) -> DriftReport:
    """Every drift check of a route, current window against reference window.

    Input drift needs an `embedder`. Judge drift uses `judge_agreement=(reference_values, current_values)` when
    given, else the teacher's calibration verdicts stored in each window (`teacher_agreement`); without
    calibration pairs it reports 'nodata'.
    """
    results: list[DriftResult] = []
    ref_ids = window_sample_ids(engine, route.name, reference, config.max_window_rows)
    cur_ids = window_sample_ids(engine, route.name, current, config.max_window_rows)
    if embedder is not None:
        ref_prompts = load_prompts(engine, ref_ids)
        cur_prompts = load_prompts(engine, cur_ids)
        result = input_drift(ref_prompts, cur_prompts, config, seed, embed=embedder.embed)
        rows = result.details.get("typical_current_rows", [])
        results.append(replace(result, details={**result.details,
                                                "examples": [{"text": cur_prompts[i][:1000]} for i in rows]}))
    evaluator = evaluator_version or latest_evaluator(engine, route.name)
    windows: dict[str, tuple[list[int], ...]] = {  # the incumbent's answers: the logged ones it served
        route.incumbent.name: tuple(window_sample_ids(engine, route.name, w, config.max_window_rows,
                                                      incumbent_of=route) for w in (reference, current))}
    for c in route.candidates:  # a candidate's answers: its replays in the window, subsampled among themselves
        windows[c.name] = tuple(window_sample_ids(engine, route.name, w, config.max_window_rows, replayed_by=c.name)
                                for w in (reference, current))
    for target, (target_ref_ids, target_cur_ids) in windows.items():
        ref = load_output_window(engine, route, target, reference, evaluator, format_check, target_ref_ids)
        cur = load_output_window(engine, route, target, current, evaluator, format_check, target_cur_ids)
        if not ref.texts and not cur.texts:
            continue  # a candidate not replayed in either window has nothing to compare
        results.extend(output_drift(ref, cur, config, target))
    if judge_agreement is None:
        judge_agreement = teacher_agreement(engine, route.name, reference, current)
    results.append(judge_drift(judge_agreement[0], judge_agreement[1], config))
    return DriftReport(route.name, results, reference.label, current.label)
