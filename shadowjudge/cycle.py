"""The evaluation cycle's stages as plain functions; flows/cycle.py only wires them together.

Every stage reads what the previous one stored and writes its own output idempotently, so a cycle rerun with
the same `cycle_id` (after a crash, or on purpose) finishes the work without duplicating a row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shadowjudge.config import Config, RouteConfig, incumbent_served
from shadowjudge.errors import InputError, ShadowJudgeError
from shadowjudge.store import (
    Judgment,
    Lock,
    RouteWeightChange,
    ShadowResult,
    ShadowRun,
    TrafficSample,
    session_scope,
)
from shadowjudge.store.lease import LeaseLock, default_holder
from shadowjudge.store.models import utcnow

if TYPE_CHECKING:
    from shadowjudge.traffic.redaction import Redactor

log = logging.getLogger(__name__)


def default_cycle_id(now: datetime | None = None) -> str:
    """Cycles are keyed by their (scheduled) minute, so a retry of the same schedule slot is the same cycle."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%MZ")


class RunNotFound(InputError):
    """A stage asked for a cycle whose run was never opened (its shadow test has not run)."""


@dataclass
class RunHandle:
    run_id: int
    run_key: str
    sample_ids: list[int]
    resumed: bool


# Cycle ids travel into the run key (a 128-character column), Prefect flow-run names and MLflow run names.
CYCLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
RUN_KEY_MAX = 128


class BadCycleId(InputError):
    """A cycle id given by a user that cannot key a run."""


def check_cycle_id(cycle_id: str) -> str:
    """The cycle id itself, or BadCycleId naming what is wrong with it."""
    if not isinstance(cycle_id, str) or not CYCLE_ID.fullmatch(cycle_id):
        raise BadCycleId(f"cycle id {cycle_id!r} is not usable: give 1 to 64 letters, digits, '.', '_', ':' or '-', "
                         "starting with a letter or digit")
    return cycle_id


def cycle_run_key(route: str, cycle_id: str) -> str:
    """A cycle's run is keyed by route and cycle id: the natural key every stage finds it by."""
    key = f"{route}:{check_cycle_id(cycle_id)}"
    if len(key) > RUN_KEY_MAX:
        raise BadCycleId(f"route '{route}' with cycle id '{cycle_id}' makes a run key of {len(key)} characters; "
                         f"the store keeps {RUN_KEY_MAX}: use a shorter route name or cycle id")
    return key


def cycle_id_of(route: str, run_key: str) -> str:
    """The cycle id a run of `route` was opened for: its run key (`cycle_run_key`) less the route's name."""
    return run_key.removeprefix(f"{route}:")


# Who drives a run, recorded in its summary as `driven_by` whenever one opens, resumes or works on it: a full cycle
# holds the route's cycle lease from opening its run to closing it, and the run's driver lease (`CycleLease.drive`)
# for as long as its process works on the run, so its run still `running` while neither is held was left by a cycle
# that is gone (`unfinished_state`); the stage flows take the lease one stage at a time, so their run is
# legitimately `running` between stages. Runs stored before this was recorded say neither.
FULL_CYCLE = "cycle"
STAGE_FLOWS = "stages"


def _record_driver(session: Session, run: ShadowRun, driver: str | None) -> None:
    """Record who drives the run now. A stage flow refuses (RouteBeingEvaluated) a run a live full cycle still
    drives (one that lost the route's lease, its current stage not over): it would replay, and pay for, the same
    samples beside it, and taking the run over as `stages` would keep it from ever being resumed as interrupted."""
    if driver is None or run.summary.get("driven_by") == driver:
        return
    if driver == STAGE_FLOWS and left_running_by_full_cycle(run):
        lease = run_driver_lease(session.get_bind(), run.run_key)
        if not lease.clear_if_abandoned_in(session):
            raise RouteBeingEvaluated(still_driven(run.route, run.run_key, lease, "this stage flow"))
    run.summary = {**run.summary, "driven_by": driver}


def unfinished_state(run: ShadowRun, cycle_gone: bool) -> str | None:
    """'failed' for a failed run; 'interrupted' for a run a full cycle left `running` when that cycle is gone
    (`cycle_gone`: no one holds the run's driver lease, nor works on the route, so the cycle was killed, lost its host,
    stalled past the driver lease, or stopped on a busy route step or a lost lease); None for any other run. Either
    kind keeps samples no later run takes."""
    if run.status == "failed":
        return "failed"
    if cycle_gone and left_running_by_full_cycle(run):
        return "interrupted"
    return None


def left_running_by_full_cycle(run: ShadowRun) -> bool:
    return run.status == "running" and (run.summary or {}).get("driven_by") == FULL_CYCLE


def unfinished_states(engine: Engine, runs: list[ShadowRun]) -> dict[int, str | None]:
    """`unfinished_state` of each run (by id) as `status` shows it: a full cycle's `running` run is interrupted only
    while no cycle holds its route's lease and no live cycle holds its driver lease."""
    states: dict[int, str | None] = {}
    route_free: dict[str, bool] = {}
    for run in runs:
        gone = False
        if left_running_by_full_cycle(run):
            if run.route not in route_free:
                route_free[run.route] = cycle_lease_holder(engine, run.route) is None
            gone = route_free[run.route] and run_driver(engine, run.run_key) is None
        states[run.id] = unfinished_state(run, gone)
    return states


def find_run(engine: Engine, run_key: str, driver: str | None = None) -> RunHandle:
    """The run a later stage works on; unlike `open_run` it never opens one (that would pick a new sample set).
    `driver` (given by a stage flow holding the route's cycle lease) is recorded on a run not yet finished."""
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun).where(ShadowRun.run_key == run_key))
        if run is None:
            raise RunNotFound(f"no run '{run_key}' in the store: run the shadow test of that cycle first")
        if run.status != "finished":
            _record_driver(s, run, driver)
        return RunHandle(run.id, run.run_key, list(run.sample_ids), resumed=True)


def sample_ranges(sample_ids: list[int], parts: int) -> list[tuple[int, int]]:
    """Split a run's sample ids into at most `parts` contiguous (first, last) ranges of nearly equal size."""
    ids = sorted(sample_ids)
    parts = max(1, min(parts, len(ids)))
    size, extra = divmod(len(ids), parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            ranges.append((ids[start], ids[end - 1]))
        start = end
    return ranges


def scoring_summary(engine: Engine, run_id: int) -> dict[str, Any]:
    """What the store holds of a run's scoring: read after scoring ran elsewhere (fanned out to other workers)."""
    with session_scope(engine) as s:
        evaluator = s.scalar(select(ShadowRun.judge_version).where(ShadowRun.id == run_id))
        judged = s.scalar(select(func.count()).select_from(Judgment).where(
            Judgment.run_id == run_id, Judgment.evaluator == (evaluator or ""))) or 0
    return {"evaluator": evaluator, "judged_total": judged}


def stored_reports(engine: Engine, route: RouteConfig, handle: RunHandle) -> dict[str, Any]:
    """The shadow and score reports of a run rebuilt from the store, for a stage rerun on its own."""
    from dataclasses import asdict

    from shadowjudge.shadow.engine import summarize_run
    from shadowjudge.shadow.metrics import total_spend

    targets = summarize_run(engine, handle.run_id, route.targets)
    return {"shadow": {"run_id": handle.run_id, "targets": {name: asdict(t) for name, t in targets.items()},
                       "spend_usd": total_spend(t.spend_usd for t in targets.values())},
            "score": scoring_summary(engine, handle.run_id)}


def open_run(engine: Engine, config: Config, route: RouteConfig, cycle_id: str,
             driver: str | None = None) -> RunHandle:
    """Find or create the cycle's run and fix its sample set: samples of the route newer than those of its newest
    cycle run, finished or not, that the incumbent served (at most shadow.max_samples of them). `driver`
    (FULL_CYCLE or STAGE_FLOWS) is recorded on the run as `driven_by`.

    A run still open (its stages run one by one, or it crashed and is finished by rerunning its cycle id) keeps its
    samples: a cycle opened meanwhile taking them again would step the route twice on one set of evidence. Samples a
    candidate served (during a rollout) are passed over, and the run's `max_sample_id` moves past them all the same,
    so no later run reads them again.
    """
    run_key = cycle_run_key(route.name, cycle_id)
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun).where(ShadowRun.run_key == run_key))
        if run is not None:
            if run.status == "failed":  # worked on again: `status` must not show the old error as the current state
                run.status = "running"
                run.summary = {**{k: v for k, v in run.summary.items() if k != "error"},
                               "last_error": run.summary.get("error")}
            if run.status != "finished":
                _record_driver(s, run, driver)
            return RunHandle(run.id, run_key, list(run.sample_ids), resumed=True)
        last = s.scalar(select(ShadowRun).where(ShadowRun.route == route.name, ShadowRun.kind == "cycle")
                        .order_by(ShadowRun.id.desc()).limit(1))
        watermark = int(last.summary.get("max_sample_id", 0)) if last is not None else 0
        sample_ids, read_to, served_by_candidates = _incumbent_samples_after(s, route, watermark,
                                                                             config.shadow.max_samples)
        if served_by_candidates:
            log.info("route %s: %d new samples were served by a candidate, not the incumbent: not shadow-tested",
                     route.name, served_by_candidates)
        run = ShadowRun(run_key=run_key, route=route.name, kind="cycle", status="running",
                        config_hash=config.fingerprint(), sample_ids=sample_ids,
                        summary={"max_sample_id": read_to, "cycle_id": cycle_id,
                                 "served_by_candidates": served_by_candidates,
                                 **({"driven_by": driver} if driver is not None else {})})
        s.add(run)
        try:
            s.flush()
        except IntegrityError:  # another process opened this cycle's run since our SELECT: resume theirs
            s.rollback()
            return find_run(engine, run_key, driver)
        return RunHandle(run.id, run_key, sample_ids, resumed=False)


def _incumbent_samples_after(session: Session, route: RouteConfig, watermark: int,
                             limit: int | None) -> tuple[list[int], int, int]:
    """The route's first `limit` (None: all) samples after `watermark` that its incumbent served, the id up to which
    samples were read (past the candidates' among them), and how many of those a candidate served.

    Read a page of `limit` rows at a time: during a rollout a candidate serves part of them, and the logged model
    that says which is matched in Python (without case or provider prefix), not in SQL."""
    sample_ids: list[int] = []
    read_to, served_by_candidates = watermark, 0
    while True:
        rows = session.execute(select(TrafficSample.id, TrafficSample.incumbent_model)
                               .where(TrafficSample.route == route.name, TrafficSample.id > read_to)
                               .order_by(TrafficSample.id).limit(limit)).all()
        served = set(incumbent_served(route, rows))
        for sample_id, _ in rows:
            read_to = sample_id
            if sample_id not in served:
                served_by_candidates += 1
                continue
            sample_ids.append(sample_id)
            if len(sample_ids) == limit:
                return sample_ids, read_to, served_by_candidates
        if limit is None or len(rows) < limit:
            return sample_ids, read_to, served_by_candidates


CYCLE_LEASE_S = 300.0
LEASE_HOLDER_MAX = 256  # the length of locks.holder
# A run's driver lease lasts this many cycle-lease lengths from the driving cycle's last renewal: a live cycle whose
# route lease ran out unrenewed (a stall, the store briefly away) is not taken for gone before this.
RUN_DRIVER_LEASES = 2


class RouteBeingEvaluated(ShadowJudgeError):
    """Another cycle of the route is running: a second would shadow-test (and pay for) the same samples again."""


class CycleLeaseLost(ShadowJudgeError):
    """Another host took the route's cycle lease over (ours expired unrenewed): this cycle must not go on beside it."""


def cycle_lease_name(route: str) -> str:
    return f"cycle:{route}"


def run_driver_lease_name(run_key: str) -> str:
    return f"cycle-run:{run_key}"


def run_driver_lease(engine: Engine, run_key: str, holder: str | None = None, cycle_ttl_s: float = CYCLE_LEASE_S,
                     clock: Callable[[], datetime] | None = None) -> LeaseLock:
    """The lease a full cycle holds on the run it works on, beside the route's cycle lease (`CycleLease.drive`)."""
    return LeaseLock(engine, run_driver_lease_name(run_key), holder=holder, ttl_s=cycle_ttl_s * RUN_DRIVER_LEASES,
                     clock=clock)


class CycleLease(LeaseLock):
    """The route's cycle lease, held as `<host:pid:token:namespace>:<label>`; `relabel` renames it once the cycle
    knows which run it works on (another cycle's, resumed), so a cycle it turns away names that run.

    A full cycle also holds its run's driver lease (`drive`), as `<host:pid:token:namespace>`, renewed with the
    route's lease, and still renewed once that is lost: the process goes on with its current stage (it checks the
    route's lease only between stages), so its run is not interrupted, and no cycle may resume it, until the
    process has left it (released) or is known gone (killed on this host, or silent past the driver lease)."""

    def __init__(self, engine: Engine, route: str, label: str, ttl_s: float) -> None:
        self.identity = default_holder()
        super().__init__(engine, cycle_lease_name(route), holder=self._holder(label), ttl_s=ttl_s)
        self._naming = threading.Lock()  # a renewal by the old name once the store holds the new one finds it lost
        self.driver: LeaseLock | None = None  # the run's driver lease, once `drive` took it

    def _holder(self, label: str) -> str:
        return f"{self.identity}:{label}"[:LEASE_HOLDER_MAX]

    @property
    def driving(self) -> bool:
        return self.driver is not None and self.driver.held

    def drive(self, route: str, run_key: str, cycle_id: str) -> None:
        """Take the driver lease of run `run_key` before cycle `cycle_id` works on it; RouteBeingEvaluated while a
        live cycle still holds it (one that lost the route's lease, its current stage not over)."""
        driver = run_driver_lease(self.engine, run_key, self.identity, self.ttl.total_seconds(), self.clock)
        if not driver.acquire():
            raise RouteBeingEvaluated(still_driven(route, run_key, driver, f"cycle {cycle_id}"))
        with self._naming:
            if self.driver is not None:
                self.driver.release()
            self.driver = driver

    def renew(self) -> bool:
        """Renew the route's lease and the run's driver lease, in one transaction; False when the route's lease
        was lost (the driver lease is renewed all the same while it is ours)."""
        with self._naming, session_scope(self.engine) as s:
            if self.driving:
                self.driver.renew_in(s)
            return self.held and self.renew_in(s)

    def release(self) -> None:
        """The driver lease first: a cycle that takes the route's lease then finds the run left, not driven."""
        with self._naming:
            if self.driver is not None:
                self.driver.release()
        super().release()

    def relabel(self, label: str) -> None:
        """Rename the holder (renewing the lease) in the store and here, in one step for the renewer thread;
        CycleLeaseLost when the lease is no longer ours."""
        holder = self._holder(label)
        with self._naming:
            with session_scope(self.engine) as s:
                renamed = s.execute(update(Lock).where(Lock.name == self.name, Lock.holder == self.holder)
                                    .values(holder=holder, expires_at=self._now_in(s) + self.ttl)).rowcount == 1
            if not renamed:
                self.held = False
                raise lease_lost(self)
            self.holder = holder


@contextlib.contextmanager
def cycle_lease(engine: Engine, route: str, cycle_id: str, ttl_s: float = CYCLE_LEASE_S) -> Iterator[CycleLease]:
    """Hold the route's cycle lease while a cycle, or one stage flow of it, works on the route's run;
    RouteBeingEvaluated at once when another holds it (a scheduled cycle fails instead of piling up behind a long one).

    Runs are opened one at a time, so each takes samples no other run holds, and a run's stages (a cycle's, or the
    stage flows of a cycle run stage by stage) never interleave with another cycle's route step. A background thread
    renews the lease; the holder calls `ensure_lease` before each stage, which stops it once the lease was lost. The
    lease of a cycle killed on this host is taken over at once, elsewhere when it expires.
    """
    lease = CycleLease(engine, route, CycleRunChoice(cycle_id, cycle_id).lease_label, ttl_s)
    if not lease.acquire():
        holder = lease.current_holder()
        who = f"{holder[0]} (lease until {holder[1]:%Y-%m-%d %H:%M:%S} UTC)" if holder else "another cycle"
        raise RouteBeingEvaluated(f"route {route} is being evaluated by {who}: not starting cycle {cycle_id} "
                                  "beside it; run it again once that cycle has finished")
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_until, args=(lease, stop, ttl_s / 4), daemon=True,
                               name=f"cycle-lease-{route}")
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        lease.release()


def cycle_lease_holder(engine: Engine, route: str) -> str | None:
    """Who holds the route's cycle lease now (for `status`); None when it is free: never taken, released, expired
    by the store's clock, or held by a process of this host that is gone (the next cycle takes that over at once)."""
    held = LeaseLock(engine, cycle_lease_name(route)).live_holder()
    return held[0] if held else None


def run_driver(engine: Engine, run_key: str) -> str | None:
    """The live cycle holding the run's driver lease (`CycleLease.drive`), judged as `cycle_lease_holder` is."""
    held = run_driver_lease(engine, run_key).live_holder()
    return held[0] if held else None


def still_driven(route: str, run_key: str, driver: LeaseLock, not_starting: str) -> str:
    """Why `not_starting` does not start beside the live cycle that still drives run `run_key`."""
    held = driver.current_holder()
    who = f"{held[0]} (its lease on the run until {held[1]:%Y-%m-%d %H:%M:%S} UTC)" if held else "another cycle"
    return (f"route {route}: run {run_key} is still being worked on by {who}, a cycle that lost the route's lease "
            f"but has not stopped: not starting {not_starting} beside it (that would replay, and pay for, its samples "
            "again); the route's next cycle started without a cycle id resumes the run once that cycle has stopped")


def ensure_lease(lease: LeaseLock) -> None:
    """Renew the cycle lease now, or raise CycleLeaseLost: called before each stage, so a cycle whose lease another
    host took over stops instead of scoring, alerting, stepping the route or closing its run beside the new holder."""
    if not lease.renew():
        raise lease_lost(lease)


def lease_lost(lease: LeaseLock) -> CycleLeaseLost:
    holder = lease.current_holder()
    return CycleLeaseLost(f"lost the lease '{lease.name}' to {holder[0] if holder else 'another cycle'}: it "
                          f"went unrenewed for its whole length (the store out of reach, or this process stalled), "
                          f"so {lease.holder} stopped before its next stage; rerun that cycle id once the other "
                          "has finished: it resumes the same run")


@dataclass(frozen=True)
class CycleRunChoice:
    """The run a full cycle (or the shadow-test stage) of a route works on: the one its own cycle id names, or the
    route's newest run, failed or interrupted, resumed in its place (`choose_cycle_run`)."""

    cycle_id: str  # the cycle id of the run the cycle opens or resumes
    started_as: str  # the cycle id the cycle was started with
    resume_attempt: int = 0  # which automatic resume of the run this is (1-based); 0: none
    resume_limit: int = 0  # orchestration.resume_failed_runs when the choice was made
    given_up_cycle_id: str | None = None  # a run whose automatic resumes were used up: left to a person
    left_as: str = ""  # what the run resumed or given up was: "failed" or "interrupted" (`unfinished_state`)

    @property
    def resumed(self) -> bool:
        return self.resume_attempt > 0

    @property
    def lease_label(self) -> str:
        """The route's cycle lease's label: the cycle of the run worked on, and the cycle started in its place."""
        started_as = f" (resumed by cycle {self.started_as})" if self.started_as != self.cycle_id else ""
        return f"cycle {self.cycle_id}{started_as}"

    @property
    def note(self) -> str | None:
        """One line saying what the cycle did instead of the usual (None when it opened its own run as usual)."""
        if self.resumed:
            return (f"resumed {self.left_as} cycle {self.cycle_id} (automatic resume {self.resume_attempt} of "
                    f"{self.resume_limit}) instead of starting cycle {self.started_as}")
        if self.given_up_cycle_id:
            return (f"gave up on {self.left_as} cycle {self.given_up_cycle_id}, its automatic resumes used up "
                    f"(orchestration.resume_failed_runs: {self.resume_limit}), and started cycle {self.started_as}; "
                    f"its samples wait for `shadowjudge run --cycle-id {self.given_up_cycle_id}` "
                    "(`shadowjudge status` shows the command)")
        return None

    def outcome(self) -> dict[str, Any]:
        """What the cycle's outcome records of the choice."""
        out: dict[str, Any] = {"cycle_id": self.cycle_id}
        if self.resumed:
            resumed_key = "resumed_interrupted_cycle_id" if self.left_as == "interrupted" else "resumed_failed_cycle_id"
            out |= {resumed_key: self.cycle_id, "started_as_cycle_id": self.started_as,
                    "resume_attempt": self.resume_attempt, "resume_limit": self.resume_limit}
        if self.given_up_cycle_id:
            out["gave_up_cycle_id"] = self.given_up_cycle_id
        if self.note:
            out["note"] = self.note
        return out


RESUMED_SLOT_LOOKBACK = 20  # cycle runs of the route searched for one a retried slot resumed


def choose_cycle_run(engine: Engine, config: Config, route: RouteConfig, cycle_id: str, lease: LeaseLock, *,
                     cycle_id_given: bool) -> CycleRunChoice:
    """The run a full cycle (or the shadow-test stage flow) of the route works on, decided while holding the
    route's cycle `lease`.

    A cycle started without a cycle id (a scheduled one, `shadowjudge run` without --cycle-id) whose route's newest
    run failed, or was interrupted, resumes that run instead of opening a new one: a new run would take only samples
    past its samples, which no cycle would then evaluate. Interrupted is a full cycle's run still `running` whose
    driver lease (`CycleLease.drive`) is free or abandoned (see `unfinished_state`): the cycle that ran it is gone
    (killed, its host lost, silent past its driver lease, or stopped on a lost lease), or it stopped on RouteBusy,
    leaving the run open for a rerun of its route step, which the resume is (the step is idempotent per run, so a
    person's later rerun replays it); the abandoned driver lease is cleared in the deciding transaction. While a
    live cycle still holds it (it lost the route's lease to this cycle, as after a stall, but is not done with its
    current stage) this cycle fails with RouteBeingEvaluated: resuming would replay the run's samples beside it, and
    a run of its own would strand them behind it; the cycle stops before its next stage, releasing its driver
    lease, and the next cycle resumes the run. A run driven stage by stage, or stored before runs recorded their
    driver, is not resumed: it is `running` between its stage flows.

    Each run is resumed automatically at most `orchestration.resume_failed_runs` times, failed and interrupted alike
    (counted in its summary as `auto_resumes`; resumes of it interrupted are also listed in
    `auto_resumed_interrupted_by`); once they are used up, the cycle records in its summary that it was given up
    (`auto_resume_given_up`) and opens its own run, so a run that fails every time cannot hold the route still. A
    given cycle id is never redirected. The count is written in the same transaction as a renewal of the lease
    (CycleLeaseLost when that fails), so two cycles never both resume one run. A retry of a slot that resumed a run
    (Prefect's retry of the flow run) works on that run again, counting no new resume, as a retried slot is the same
    cycle.
    """
    as_usual = CycleRunChoice(cycle_id, cycle_id)
    limit = config.orchestration.resume_failed_runs
    if cycle_id_given or limit == 0:
        return as_usual
    with session_scope(engine) as s:
        recent = list(s.scalars(select(ShadowRun).where(ShadowRun.route == route.name, ShadowRun.kind == "cycle")
                                .order_by(ShadowRun.id.desc()).limit(RESUMED_SLOT_LOOKBACK)))
        for run in recent:  # a retried schedule slot is the same cycle: it goes on with the run it resumed
            resumed_by = run.summary.get("auto_resumed_by", [])
            if cycle_id in resumed_by:
                left_as = "interrupted" if cycle_id in run.summary.get("auto_resumed_interrupted_by", []) else "failed"
                return CycleRunChoice(cycle_id_of(route.name, run.run_key), cycle_id, resume_limit=limit,
                                      resume_attempt=resumed_by.index(cycle_id) + 1, left_as=left_as)
        newest = recent[0] if recent else None
        if newest is not None and left_running_by_full_cycle(newest):
            driver = run_driver_lease(engine, newest.run_key, clock=lease.clock)
            if not driver.clear_if_abandoned_in(s):
                raise RouteBeingEvaluated(still_driven(route.name, newest.run_key, driver, f"cycle {cycle_id}"))
        left_as = unfinished_state(newest, cycle_gone=True) if newest is not None else None
        if left_as is None:
            return as_usual
        left_cycle_id = cycle_id_of(route.name, newest.run_key)
        if left_cycle_id == cycle_id:  # a retry of the run's own slot: open_run resumes it by its key
            return as_usual
        resumes = int(newest.summary.get("auto_resumes", 0))
        if resumes >= limit:
            newest.summary = {**newest.summary,
                              "auto_resume_given_up": {"by_cycle": cycle_id, "after_resumes": resumes}}
            choice = CycleRunChoice(cycle_id, cycle_id, resume_limit=limit, given_up_cycle_id=left_cycle_id,
                                    left_as=left_as)
        else:
            interrupted_by = newest.summary.get("auto_resumed_interrupted_by", [])
            newest.summary = {**newest.summary, "auto_resumes": resumes + 1,
                              "auto_resumed_by": [*newest.summary.get("auto_resumed_by", []), cycle_id],
                              **({"auto_resumed_interrupted_by": [*interrupted_by, cycle_id]}
                                 if left_as == "interrupted" else {})}
            choice = CycleRunChoice(left_cycle_id, cycle_id, resume_attempt=resumes + 1, resume_limit=limit,
                                    left_as=left_as)
        if not lease.renew_in(s):
            s.rollback()  # the count is not ours to write: the cycle that took the lease over decides
            raise lease_lost(lease)
    return choice


def _renew_until(lease: CycleLease, stop: threading.Event, every_s: float) -> None:
    """Renew the lease every `every_s` until `stop`; a store that is briefly away is retried at the next tick. Once
    the route's lease is lost it goes on renewing the run's driver lease while that is ours: the cycle is still
    working on its run until its current stage ends."""
    while not stop.wait(every_s):
        held = lease.held
        try:
            if not lease.renew() and held:
                log.error("lost the cycle lease %s to another cycle: this cycle stops before its next stage",
                          lease.name)
        except Exception as exc:  # noqa: BLE001 - the cycle goes on; the lease lasts ttl_s from the last renewal
            log.warning("could not renew the cycle lease %s: %s", lease.name, exc)
        if not lease.held and not lease.driving:
            return


def load_samples(engine: Engine, sample_ids: list[int]) -> list[TrafficSample]:
    with session_scope(engine) as s:
        rows = list(s.scalars(select(TrafficSample).where(TrafficSample.id.in_(sample_ids)).order_by(TrafficSample.id)))
        s.expunge_all()
    return rows


def finish_run(engine: Engine, run_id: int, decision: str, summary: dict[str, Any],
               mlflow_run_id: str | None = None) -> None:
    """Record the cycle's decision; a rerun keeps the first `finished_at` (it changes no row that did not change)."""
    with session_scope(engine) as s:
        run = s.get(ShadowRun, run_id)
        run.status = "finished"
        run.decision = decision
        run.summary = {**{k: v for k, v in run.summary.items() if k != "error"}, **summary}
        if mlflow_run_id:
            run.mlflow_run_id = mlflow_run_id
        run.finished_at = run.finished_at or utcnow()


def fail_run(engine: Engine, run_id: int, error: BaseException) -> None:
    """Mark a run whose cycle failed before closing it `failed`, with the error, so `status` does not show it running
    for ever; rerunning its cycle id resumes it and `finish_run` closes it. A finished run is left as it is."""
    with session_scope(engine) as s:
        run = s.get(ShadowRun, run_id)
        if run is not None and run.status != "finished":
            run.status = "failed"
            run.summary = {**run.summary, "error": f"{type(error).__name__}: {error}"[:2000]}


def _pairs(run_id: int, evaluator: str | None, *columns: Any) -> Any:
    """The run's first-attempt results joined to their samples and to the evaluator's judgments, in table order."""
    return (select(*columns)
            .select_from(ShadowResult)
            .join(TrafficSample, TrafficSample.id == ShadowResult.sample_id)
            .outerjoin(Judgment, (Judgment.run_id == ShadowResult.run_id)
                       & (Judgment.sample_id == ShadowResult.sample_id) & (Judgment.target == ShadowResult.target)
                       & (Judgment.evaluator == (evaluator or "")))
            .where(ShadowResult.run_id == run_id, ShadowResult.attempt == 0)
            .order_by(ShadowResult.sample_id, ShadowResult.target))


def pair_outcomes(engine: Engine, run_id: int, evaluator: str | None) -> dict[str, list[Any]]:
    """Every pair's target, judge scores, preference and latency: what the cycle's win rates and plots are computed
    from (all pairs, where the logged table is capped)."""
    with session_scope(engine) as s:
        rows = s.execute(_pairs(run_id, evaluator, ShadowResult.target, Judgment.candidate_score,
                                Judgment.incumbent_score, Judgment.preference, ShadowResult.latency_ms)).all()
    names = ("target", "candidate_score", "incumbent_score", "preference", "latency_ms")
    return {name: [r[i] for r in rows] for i, name in enumerate(names)}


def samples_table(engine: Engine, run_id: int, evaluator: str | None, route: RouteConfig, redactor: Redactor,
                  limit: int = 2000) -> dict[str, list[Any]]:
    """The per-sample table logged to MLflow (its first `limit` rows): prompt, both answers (truncated; their full
    lengths beside them, for sorting by how much longer the candidate writes), scores and latency, one row per
    pair; `slice` is the value of the route's `slice_key`. Texts are redacted by `redactor` (the config's), then
    truncated: replayed answers are stored as the models returned them, and a cut finding is no longer found."""
    from shadowjudge.scoring import prompt_text

    def redacted(text: str | None, chars: int) -> str:
        return redactor.redact(text, {})[:chars] if text else ""

    with session_scope(engine) as s:
        rows = s.execute(_pairs(run_id, evaluator, TrafficSample.request_id, TrafficSample.messages,
                                TrafficSample.response_text, TrafficSample.meta, ShadowResult.target,
                                ShadowResult.output_text, ShadowResult.ttft_ms, ShadowResult.latency_ms,
                                ShadowResult.cost_usd, ShadowResult.error_class, Judgment.candidate_score,
                                Judgment.incumbent_score, Judgment.preference).limit(limit)).all()
    cols: dict[str, list[Any]] = {k: [] for k in (
        "request_id", "target", "slice", "prompt", "incumbent_answer", "candidate_answer", "incumbent_chars",
        "candidate_chars", "candidate_score", "incumbent_score", "preference", "ttft_ms", "latency_ms", "cost_usd",
        "error")}
    for r in rows:
        cols["request_id"].append(r.request_id)
        cols["target"].append(r.target)
        cols["slice"].append(str(r.meta.get(route.slice_key, ""))
                             if route.slice_key and isinstance(r.meta, dict) else "")
        cols["prompt"].append(redacted(prompt_text(r.messages), 2000))
        cols["incumbent_answer"].append(redacted(r.response_text, 4000))
        cols["candidate_answer"].append(redacted(r.output_text, 4000))
        cols["incumbent_chars"].append(None if r.response_text is None else len(r.response_text))
        cols["candidate_chars"].append(None if r.output_text is None else len(r.output_text))
        cols["candidate_score"].append(r.candidate_score)
        cols["incumbent_score"].append(r.incumbent_score)
        cols["preference"].append(r.preference)
        cols["ttft_ms"].append(r.ttft_ms)
        cols["latency_ms"].append(r.latency_ms)
        cols["cost_usd"].append(r.cost_usd)
        cols["error"].append(r.error_class)
    return cols


def count_rows(engine: Engine) -> dict[str, int]:
    """Row counts per table: what `status` shows and what idempotency tests compare."""
    from shadowjudge.store import Alert, QuarantinedRecord

    out = {}
    with session_scope(engine) as s:
        for model in (TrafficSample, QuarantinedRecord, ShadowRun, ShadowResult, Judgment, Alert, RouteWeightChange):
            out[model.__tablename__] = s.scalar(select(func.count()).select_from(model)) or 0
    return out


# --- stages the flow calls: each takes the engine and config, returns JSON-friendly data ---

def ingest(engine: Engine, config: Config, progress: bool = False) -> dict[str, Any]:
    from shadowjudge.traffic import ingest_sources

    return ingest_sources(engine, config, progress=progress).to_dict()


def shadow(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, progress: bool = False) -> dict[str, Any]:
    from shadowjudge.shadow.engine import run_shadow

    samples = load_samples(engine, handle.sample_ids)
    report = run_shadow(engine, handle.run_id, samples, route.targets, config.shadow, config.pricing,
                        progress=progress)
    return report.as_dict()


def score(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, progress: bool = False) -> dict[str, Any]:
    from dataclasses import asdict

    from evaluators import load_evaluator
    from shadowjudge.scoring import score_run

    evaluator = load_evaluator(config.judge, config.mlflow.tracking_uri)
    report = score_run(engine, handle.run_id, evaluator, [c.name for c in route.candidates],
                       batch_size=config.judge.batch_size, progress=progress)
    return asdict(report)


def analyse(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle,
            judge_version: str | None) -> dict[str, Any]:
    from shadowjudge.analysis import analyze_run

    from shadowjudge.traffic.redaction import Redactor

    return analyze_run(engine, handle.run_id, route, judge_version, accept_floor=config.judge.accept_floor,
                       redactor=Redactor.from_config(config.redaction) if route.checks else None).to_dict()


def calibrate(engine: Engine, config: Config, handle: RunHandle, judge_version: str | None) -> dict[str, Any] | None:
    """Send `judge.calibration_fraction` of the run's judged pairs to the teacher (None when calibration is off)."""
    from dataclasses import asdict

    from evaluators.calibration import calibrate_from_config

    if judge_version is None or config.judge.calibration_fraction <= 0:
        return None
    report = calibrate_from_config(engine, handle.run_id, config.judge, judge_version)
    if report is None:
        return None
    out = asdict(report)
    if report.agreement is not None:
        out["agreement"] = {k: v for k, v in out["agreement"].items() if k != "values"}
    return out


def golden_gate(config: Config, route: RouteConfig, judge_version: str | None = None) -> dict[str, Any]:
    """Ask every candidate the route's golden cases and check its answers: {candidate: report}, {} without a set.

    Cases with `min_score` are scored by the judge that scored the run (`judge_version`), even where the champion
    has moved since.
    """
    from shadowjudge.analysis.golden import load_golden_set, run_golden_set
    from shadowjudge.shadow.golden_answers import ask_golden_cases

    if not route.golden_set:
        return {}
    cases = load_golden_set(route.golden_set)
    scorer = None
    if any(c.min_score is not None for c in cases):
        from evaluators import load_evaluator_version

        scorer = load_evaluator_version(config.judge, config.mlflow.tracking_uri, judge_version)
    reports = {}
    for target in route.candidates:
        answers = ask_golden_cases(target, cases, config.shadow)
        reports[target.name] = run_golden_set(cases, answers, scorer, target.name).to_dict()
    return reports


_embedder = None


def drift_windows(engine: Engine, route: str, current_h: float, reference_h: float):
    """The current window ends just after the route's newest stored request (by request time), so a backfill is
    checked as it happened; the reference window is the span just before it. None when the route has no traffic."""
    from datetime import timedelta

    from shadowjudge.analysis import TimeWindow

    with session_scope(engine) as s:
        newest = s.scalar(select(func.max(TrafficSample.request_ts)).where(TrafficSample.route == route))
    if newest is None:
        return None
    end = newest + timedelta(microseconds=1)
    current = TimeWindow(end - timedelta(hours=current_h), end)
    return TimeWindow(current.start - timedelta(hours=reference_h), current.start), current


def drift_check(engine: Engine, config: Config, route: RouteConfig) -> dict[str, Any] | None:
    """Input, output and judge drift of the route, current window against reference window (None when off)."""
    global _embedder
    from shadowjudge.analysis import detect_drift
    from shadowjudge.analysis.embeddings import MiniLMEmbedder

    if not config.drift.enabled:
        return None
    windows = drift_windows(engine, route.name, config.drift.current_window_h, config.drift.reference_window_h)
    if windows is None:
        return None
    if config.drift.input_embeddings and _embedder is None:
        # Loaded once per process (a scheduled server runs many cycles); its cache holds both windows' subsamples.
        _embedder = MiniLMEmbedder(capacity=max(10_000, 5 * config.drift.max_embeddings))
    report = detect_drift(engine, route, *windows, config.drift,
                          embedder=_embedder if config.drift.input_embeddings else None)
    return report.to_dict()


# The numbers of a classified metric result that can only be missing (null in the analysis's JSON) as infinities.
INFINITE_WHEN_MISSING = ("effect", "ci_low", "ci_high", "candidate_value", "incumbent_value")


def _candidate_metrics(analysis: dict[str, Any], shadow_report: dict[str, Any],
                       target: str) -> dict[str, float | None]:
    """Flat MLflow metrics for one target: analysis effects with intervals, latency percentiles, spend (None where
    unknown: MLflow then shows no value, or NaN after an earlier one)."""
    out: dict[str, float | None] = {}
    for cand in analysis.get("candidates", []):
        if cand["target"] != target:
            continue
        if cand.get("score") is not None:
            out["canary_score"] = cand["score"]
        out["n_samples"] = cand["n"]
        out["n_judged"] = cand["n_judged"]
        for m in cand["metrics"]:
            classified = m.get("classification") != "nodata"
            for key in ("effect", "ci_low", "ci_high", "candidate_value", "incumbent_value", "p_value",
                        "effect_at_equal_length"):
                if m.get(key) is not None:
                    out[f"{m['metric']}.{key}"] = m[key]
                elif classified and key in INFINITE_WHEN_MISSING:  # as MetricResult.describe reads it: unbounded
                    out[f"{m['metric']}.{key}"] = math.inf
    report = shadow_report.get("targets", {}).get(target)
    if report:
        out["requests"] = report["requests"]
        out["error_rate"] = (report["requests"] - report["ok"]) / report["requests"] if report["requests"] else 0.0
        out["spend_usd"] = report["spend_usd"]
        if report.get("cost_per_request_usd") is not None:
            out["cost_per_request_usd"] = report["cost_per_request_usd"]
        for family in ("latency_ms", "ttft_ms", "tpot_ms", "itl_ms"):
            for pct, value in (report.get(family) or {}).items():
                if value is not None and pct != "count":
                    out[f"{family}.{pct}"] = value
    return out


def win_rate(preferences: list[float | None]) -> dict[str, float]:
    """Share of pairs the judge prefers the candidate (a tie counts half), with a 95% Wilson interval."""
    from evaluators.calibration import wilson_interval

    prefs = [p for p in preferences if p is not None]
    if not prefs:
        return {}
    wins = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in prefs)
    low, high = wilson_interval(wins, len(prefs))
    return {"win_rate": wins / len(prefs), "win_rate.ci_low": low, "win_rate.ci_high": high}


# The candidate metrics repeated on the cycle's run, so one run page compares the candidates.
SUMMARY_METRICS = ("canary_score", "win_rate", "win_rate.ci_low", "win_rate.ci_high", "quality.effect",
                   "quality.effect_at_equal_length", "cost_per_outcome.candidate_value", "error_rate",
                   "latency_ms.p95", "ttft_ms.p95")


def check_tracking_server(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, saying so, when an HTTP tracking server does not answer (refused, unknown host, no answer in
    `timeout_s`, a 5xx).

    MLflow's client retries every call with backoff (minutes per call by default), so a server that is down or hung
    would hold the stage for a long time before anything said why; the stage's own retries cover a brief outage.
    """
    from shadowjudge.tracking.reachability import check_tracking_reachable

    check_tracking_reachable(tracking_uri, timeout_s)


def track(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, analysis: dict[str, Any],
          reports: dict[str, Any]) -> str | None:
    """Log the cycle to MLflow; returns the run id (None when tracking is disabled)."""
    from shadowjudge.tracking import CandidateLog, CycleLog, log_cycle
    from shadowjudge.tracking.mlflow_tracking import latency_cdf, score_histogram
    from shadowjudge.traffic.redaction import Redactor

    if not config.mlflow.enabled:
        return None
    check_tracking_server(config.mlflow.tracking_uri)
    shadow_report = reports.get("shadow", {})
    evaluator = reports.get("score", {}).get("evaluator")
    table = samples_table(engine, handle.run_id, evaluator, route, Redactor.from_config(config.redaction))
    pairs = pair_outcomes(engine, handle.run_id, evaluator)
    candidates, summary = [], {}
    for target in route.candidates:
        verdict = next((c for c in analysis.get("candidates", []) if c["target"] == target.name), None)
        preferences = [p for p, t in zip(pairs["preference"], pairs["target"], strict=True) if t == target.name]
        metrics = {**_candidate_metrics(analysis, shadow_report, target.name), **win_rate(preferences)}
        golden = (analysis.get("golden") or {}).get(target.name)
        if golden:
            metrics |= {"golden.passed": float(golden["passed"]), "golden.n_failed": golden["n_failed"],
                        "golden.n_unanswered": golden.get("n_unanswered", 0)}
        summary |= {f"{target.name}.{k}": metrics[k] for k in SUMMARY_METRICS if k in metrics}
        candidates.append(CandidateLog(
            target=target.name,
            params={"model": target.model, "base_url": target.base_url},
            metrics=metrics,
            tags={"verdict": verdict["verdict"] if verdict else "none",
                  "reasons": "; ".join(verdict["reasons"])[:5000] if verdict else ""},
        ))
    first = route.candidates[0].name
    scores = {"incumbent": [s for s, t in zip(pairs["incumbent_score"], pairs["target"]) if t == first]}
    for target in route.candidates:
        scores[target.name] = [s for s, t in zip(pairs["candidate_score"], pairs["target"]) if t == target.name]
    latencies = {t.name: [v for v, tt in zip(pairs["latency_ms"], pairs["target"]) if tt == t.name]
                 for t in route.targets}
    figures = {"score_distributions.png": score_histogram(scores, f"{route.name}: judge scores"),
               "latency_cdf.png": latency_cdf(latencies, f"{route.name}: total latency")}
    incumbent_metrics = _candidate_metrics(analysis, shadow_report, route.incumbent.name)
    cycle_log = CycleLog(
        route=route.name, run_key=handle.run_key,
        params={"config_hash": config.fingerprint(), "judge_version": evaluator or "none",
                "sample_size": len(handle.sample_ids), "incumbent": route.incumbent.model,
                "candidates": ",".join(c.model for c in route.candidates), "sampling_rate": config.sampling.rate,
                "policy": route.policy.kind},
        metrics={"samples": len(handle.sample_ids), "spend_usd": shadow_report.get("spend_usd", 0.0),
                 "samples.served_by_candidates": served_by_candidates(engine, handle.run_id),
                 **ingest_metrics(None if handle.resumed else reports.get("ingest")),
                 **{f"incumbent.{k}": v for k, v in incumbent_metrics.items()}, **summary,
                 **drift_metrics(analysis.get("drift")), **calibration_metrics(reports.get("calibration"))},
        tags={"shadowjudge.route": route.name, "shadowjudge.store_run_id": str(handle.run_id),
              # empty once a rerun calibrates: the tag of a failed calibration must not outlive it
              "shadowjudge.calibration_failed": str(reports.get("score", {}).get("calibration_failed") or "")[:5000]},
        candidates=candidates, samples_table=table, figures=figures,
        # A stage flow has neither report, and a rerun's ingest is not the one its cycle started with (it took
        # traffic for later cycles): what the cycle logged for them stays.
        not_computed=tuple(f"{name}." for name in ("ingest", "calibration")
                           if not reports.get(name) or (name == "ingest" and handle.resumed)),
        json_artifacts={"analysis.json": analysis, "shadow_report.json": shadow_report,
                        **({"calibration.json": reports["calibration"]} if reports.get("calibration") else {})},
    )
    run_id = log_cycle(config.mlflow.tracking_uri, config.mlflow.experiment_prefix, cycle_log)
    with session_scope(engine) as s:
        s.get(ShadowRun, handle.run_id).mlflow_run_id = run_id
    return run_id


def served_by_candidates(engine: Engine, run_id: int) -> int:
    """How many new samples the run passed over because a candidate served them (open_run), for MLflow."""
    with session_scope(engine) as s:
        summary = s.scalar(select(ShadowRun.summary).where(ShadowRun.id == run_id)) or {}
    return int(summary.get("served_by_candidates", 0))


def drift_metrics(drift: dict[str, Any] | None) -> dict[str, float]:
    """MLflow metrics of a drift report: each check's effect and p-value, and how many alarmed."""
    if not drift:
        return {}
    out = {"drift.alarms": float(len(drift.get("drifted", [])))}
    for r in drift["results"]:
        key = f"drift.{r['kind']}.{r['metric']}" + (f".{r['target']}" if r.get("target") else "")
        for field in ("effect", "p_value"):
            if r.get(field) is not None:
                out[f"{key}.{field}"] = float(r[field])
    return out


def ingest_metrics(ingest: dict[str, Any] | None) -> dict[str, float]:
    """MLflow metrics of the ingest that preceded the cycle (none when a stage flow runs without one)."""
    if not ingest or "totals" not in ingest:
        return {}
    totals = ingest.get("totals", {})
    return {"ingest.stored": totals.get("stored", 0), "ingest.quarantined": totals.get("quarantined", 0)}


def calibration_metrics(calibration: dict[str, Any] | None) -> dict[str, float]:
    """MLflow metrics of the cycle's calibration: the run's pairs chosen for the teacher (the same on a rerun) and
    the student-teacher agreement with its length figures, so the judge's standing is charted run by run."""
    if not calibration:
        return {}
    out = {"calibration.pairs": float(calibration["selected"])}
    for key, value in (calibration.get("agreement") or {}).items():
        if isinstance(value, (int, float)):
            out[f"calibration.{key}"] = float(value)
    return out


def weight_history(engine: Engine, route: str) -> list[tuple[Any, dict[str, int]]]:
    with session_scope(engine) as s:
        rows = s.execute(select(RouteWeightChange.created_at, RouteWeightChange.before, RouteWeightChange.after)
                         .where(RouteWeightChange.route == route, RouteWeightChange.status == "applied")
                         .order_by(RouteWeightChange.id)).all()
    if not rows:
        return []
    return [(rows[0][0], rows[0][1])] + [(ts, after) for ts, _, after in rows]


def mlflow_link(config: Config, route: RouteConfig, mlflow_run_id: str | None) -> str | None:
    from shadowjudge.tracking import run_link

    return run_link(config.mlflow.tracking_uri, config.mlflow.ui_url, config.mlflow.experiment_prefix, route.name,
                    mlflow_run_id)


def alert(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, analysis: dict[str, Any],
          mlflow_run_id: str | None, config_path: str | None = None) -> list[dict[str, Any]]:
    """Raise (or recur) an alert for every regression, failed golden set and drift; delivery failures stay stored
    for the next cycle. All findings are stored first, then delivered in one pass: a dead sink costs one retry
    schedule per route and cycle, not one per kind of finding."""
    from shadowjudge.alerts.findings import drift_findings, golden_findings, regression_findings
    from shadowjudge.alerts.records import alert_to_dict, raise_findings
    from shadowjudge.alerts.sinks import build_sinks
    from shadowjudge.analysis import RunAnalysis
    from shadowjudge.analysis.drift import DriftReport
    from shadowjudge.analysis.golden import GoldenReport

    findings = regression_findings(RunAnalysis.from_dict(analysis), route)
    for report in (analysis.get("golden") or {}).values():
        findings += golden_findings(GoldenReport.from_dict(report), route, handle.run_id)
    if analysis.get("drift"):
        findings += drift_findings(DriftReport.from_dict(analysis["drift"]), route, handle.run_id)
    alerts = raise_findings(engine, findings, route, build_sinks(config.alerts),
                            mlflow_link(config, route, mlflow_run_id), config_path, config.alerts.max_examples,
                            redaction=config.redaction)
    return [alert_to_dict(a) for a in alerts]


def failed_golden(analysis: dict[str, Any]) -> set[str]:
    """Candidates that answered a golden case wrongly; unanswered cases (an outage) fail none."""
    return {target for target, report in (analysis.get("golden") or {}).items() if report["n_failed"]}


def update_routes(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, analysis: dict[str, Any],
                  alerts: list[dict[str, Any]], mlflow_run_id: str | None, now: datetime | None = None) -> dict[str, Any]:
    """Step the route's rollout once from this cycle's verdicts; a critical alert rolls its candidate back, and a
    candidate that fails its golden set counts as failed (never promoted, rolled back if it holds traffic)."""
    from shadowjudge.analysis import RunAnalysis
    from shadowjudge.gateways import get_gateway
    from shadowjudge.routing.step import step_route
    from shadowjudge.routing.verdicts import apply_golden_gate, verdicts_from_analysis

    critical = {a.get("target") for a in alerts if a.get("severity") == "critical" and a.get("target")}
    verdicts = apply_golden_gate(verdicts_from_analysis(RunAnalysis.from_dict(analysis), critical_targets=critical),
                                 analysis.get("golden") or {})
    outcome = step_route(engine, route, verdicts, gateway=get_gateway(route.gateway, route),
                         now=now or datetime.now(timezone.utc), run_id=handle.run_id,
                         analysis_link=mlflow_link(config, route, mlflow_run_id)).to_dict()
    refuse_busy_step(route, handle, outcome)
    return outcome


def refuse_busy_step(route: RouteConfig, handle: RunHandle, step: dict[str, Any]) -> None:
    """RouteBusy (a fault, so Prefect retries the stage) for a step that found the route's lock held by another
    writer: it applied none of the run's verdicts, and closing the run on it would record the old weights as the
    cycle's decision, over the record of a writer that did step the run."""
    from shadowjudge.routing.step import RouteBusy

    if step.get("status") == "busy":
        cycle_id = cycle_id_of(route.name, handle.run_key)
        raise RouteBusy(f"the weights of route {route.name} are being changed by another writer "
                        f"({step.get('reason')}); run {handle.run_key} stays open with its verdicts not applied: "
                        f"rerun the update-routes stage of cycle {cycle_id} (prefect deployment run "
                        f"'update-routes/update-routes' -p route={route.name} -p cycle_id={cycle_id}, or "
                        f"shadowjudge run --route {route.name} --cycle-id {cycle_id})")


def _quality_summary(candidate: dict[str, Any]) -> str:
    """'; quality 1.35x (answers 2.04x the incumbent's length; at equal length 0.816x)' for the verdict line."""
    quality = next((m for m in candidate.get("metrics", []) if m["metric"] == "quality"), None)
    if quality is None or quality.get("effect") is None:
        return ""
    unit = "x" if quality["effect_kind"] == "ratio" else ""
    return f"; quality {quality['effect']:.3g}{unit}" + (f" ({quality['note']})" if quality.get("note") else "")


def _checks_summary(candidate: dict[str, Any]) -> str:
    """'; checks fail: json 0% -> 38%, ...' for the verdict line, where the route's checks failed or were marginal
    (on a route without checks there is no such metric, and the line is as it always was)."""
    checks = next((m for m in candidate.get("metrics", []) if m["metric"] == "checks"), None)
    if checks is None or checks["classification"] not in ("fail", "marginal"):
        return ""
    per_check = (checks.get("note") or "").removeprefix("failing per check, incumbent -> candidate: ")
    return f"; checks {checks['classification']}" + (f": {per_check}" if per_check else "")


def _recorded_step(engine: Engine, handle: RunHandle, step: dict[str, Any]) -> dict[str, Any]:
    """The step a rerun of a finished run reports: a run older than the route's last stepped one gets an `unchanged`
    hold from the controller (its verdicts were applied, or passed over, when it closed), which is no decision of
    this run: the decision and weights it recorded then are kept, on the run, in MLflow and in the summary."""
    if step.get("status") != "unchanged" or not step.get("replayed"):
        return step
    with session_scope(engine) as s:
        run = s.get(ShadowRun, handle.run_id)
        if run is None or run.status != "finished" or run.decision is None:
            return step
        recorded = {"decision": run.decision, "weights_before": run.summary.get("weights_before"),
                    "weights_after": run.summary.get("weights_after")}
    return {**step, **recorded}


def close_cycle(engine: Engine, config: Config, route: RouteConfig, handle: RunHandle, analysis: dict[str, Any],
                step: dict[str, Any], alerts: list[dict[str, Any]], mlflow_run_id: str | None) -> dict[str, Any]:
    """Record the decision on the run and in MLflow, and render the cycle's markdown summary."""
    refuse_busy_step(route, handle, step)
    step = _recorded_step(engine, handle, step)
    decision = step.get("decision", "none")
    verdicts = [f"{c['target']}: {c['verdict']} (score {c['score'] if c['score'] is not None else '-'}, "
                f"n={c['n_judged']}/{c['n']}{_quality_summary(c)}{_checks_summary(c)})"
                for c in analysis.get("candidates", [])]
    link = mlflow_link(config, route, mlflow_run_id)
    finish_run(engine, handle.run_id, decision,
               {"verdicts": verdicts, "golden_failed": sorted(failed_golden(analysis)),
                "drifted": (analysis.get("drift") or {}).get("drifted", []), "weights_before": step.get("weights_before"),
                "weights_after": step.get("weights_after"), "alerts": [a.get("id") for a in alerts]},
               mlflow_run_id)
    if mlflow_run_id and config.mlflow.enabled:
        from shadowjudge.tracking.mlflow_tracking import set_tags

        set_tags(config.mlflow.tracking_uri, mlflow_run_id, {
            "shadowjudge.decision": decision, "shadowjudge.weights_after": str(step.get("weights_after"))})
        history = weight_history(engine, route.name)
        if history:  # drawn after the step, so the plot ends with this cycle's change
            from shadowjudge.tracking.mlflow_tracking import log_figures, weight_history_plot

            log_figures(config.mlflow.tracking_uri, mlflow_run_id,
                        {"weight_history.png": weight_history_plot(history, f"{route.name}: route weights")})
    markdown = render_cycle_markdown(handle, route, analysis, step, alerts, link)
    return {"run_id": handle.run_id, "run_key": handle.run_key, "decision": decision, "verdicts": verdicts,
            "weights_before": step.get("weights_before"), "weights_after": step.get("weights_after"),
            "step_status": step.get("status"), "reason": step.get("reason"), "alerts": len(alerts),
            "mlflow_run_id": mlflow_run_id, "mlflow_link": link, "markdown": markdown}


def render_cycle_markdown(handle: RunHandle, route: RouteConfig, analysis: dict[str, Any], step: dict[str, Any],
                          alerts: list[dict[str, Any]], link: str | None) -> str:
    """The Prefect artifact: decision, weights before and after, top regressions, links."""
    lines = [f"# Cycle `{handle.run_key}`", "",
             f"**Decision:** {step.get('decision')} ({step.get('status')}): {step.get('reason')}", "",
             "| target | before | after |", "|---|---|---|"]
    before, after = step.get("weights_before") or {}, step.get("weights_after") or {}
    for target in sorted(set(before) | set(after)):
        lines.append(f"| {target} | {before.get(target, 0)} | {after.get(target, 0)} |")
    lines += ["", "## Candidates", "", "| candidate | verdict | score | judged/replayed | reasons |", "|---|---|---|---|---|"]
    for c in analysis.get("candidates", []):
        reasons = "; ".join(c.get("reasons", []))[:300].replace("|", "/")
        lines.append(f"| {c['target']} | {c['verdict']} | {c['score'] if c['score'] is not None else '-'} "
                     f"| {c['n_judged']}/{c['n']} | {reasons} |")
    golden = analysis.get("golden") or {}
    if golden:
        lines += ["", "## Golden set", ""]
        for target, report in golden.items():
            failed = [f"{r['case_id']} ({'; '.join(r['failures'])})" for r in report["results"] if r["failures"]]
            parts = [f"**failed** {len(failed)}/{report['n_cases']}: " + ", ".join(failed[:5])] if failed else []
            if report.get("n_unanswered"):
                parts.append(f"{report['n_unanswered']}/{report['n_cases']} unanswered (an outage, not failed)")
            lines.append(f"- {target}: " + ("; ".join(parts) or "passed"))
    drift = analysis.get("drift")
    if drift:
        lines += ["", f"**Drift** ({drift.get('current_window')} vs {drift.get('reference_window')}): "
                  + (", ".join(drift["drifted"]) if drift.get("drifted") else "no check alarmed")]
    if alerts:
        lines += ["", "## Top regressions", ""]
        for a in alerts[:5]:
            lines.append(f"- **{a.get('severity')}** {a.get('message')}")
    if link:
        lines += ["", f"[MLflow run]({link})"]
    return "\n".join(lines)
