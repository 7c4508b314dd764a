"""Apply the controller's decision: under the route's lock, push through the gateway, record history and state.

Two leases guard a push: the route's (its state row) and the gateway's (its config: several routes may share one
TrueFoundry or nginx file, and a read-render-write must not interleave with another route's).

Order of writes for a change: a `pending` history row claims the next revision, the gateway is pushed (and read
back), then one transaction marks the row applied or failed and stores the new state. A crash after the push but
before that transaction leaves the row `pending` and the state behind the gateway; the next cycle sees that the
gateway holds that push's weights and decides from the state again, which re-derives the same push from the same
verdicts instead of stepping twice (and a hold pushes the state's weights again: the conservative direction). Any
other difference between the gateway and the state is drift: the controller decides from the gateway's weights.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select, update

from shadowjudge.config import RouteConfig, TargetConfig
from shadowjudge.errors import InputError, ShadowJudgeError
from shadowjudge.gateways.base import Gateway, GatewayError
from shadowjudge.routing.controller import (
    Decision,
    Posterior,
    RolloutState,
    decide,
    target_fingerprint,
)
from shadowjudge.store.lease import LeaseLock, LockSet, default_holder
from shadowjudge.store.models import as_utc
from shadowjudge.routing.push import PushResult, describe_error, preview_push, push_weights
from shadowjudge.routing.verdicts import CandidateVerdict, index_verdicts
from shadowjudge.routing.weights import Weights, format_weights, percentages, weights_diff
from shadowjudge.store import RouteState, RouteWeightChange, session_scope


class RouteBusy(ShadowJudgeError):
    """Another writer holds the route's lock."""


@dataclass(frozen=True)
class StepOutcome:
    """What one step did. `weights_after` is what the route's state now records (the gateway holds it when
    `pushed`, or already held it, or was left holding it by a push that failed part-way); `proposed` is what the
    decision wanted, which differs when a push failed."""

    route: str
    decision: str
    weights_before: Weights
    weights_after: Weights
    proposed: Weights
    reason: str
    pushed: bool
    status: str  # applied | failed | unchanged | dry_run | busy
    phase: str
    serving: str
    revision: int | None = None
    error: str | None = None
    config_diff: str | None = None
    replayed: bool = False

    @property
    def diff(self) -> str:
        return weights_diff(self.weights_before, self.proposed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GatewayReading:
    """What the gateway held when read for a step: `weights` is None when it could not be read (`error` says why)."""

    weights: Weights | None
    error: str | None = None


def read_gateway(gateway: Gateway) -> GatewayReading:
    try:
        return GatewayReading(gateway.read_current().weights)
    except GatewayError as exc:
        return GatewayReading(None, describe_error(exc))


def lock_name(route: str) -> str:
    return f"route:{route}"


def gateway_lock_name(gateway_name: str) -> str:
    name = f"gateway:{gateway_name}"
    return name if len(name) <= 240 else "gateway:" + hashlib.sha256(gateway_name.encode()).hexdigest()


def writer_locks(engine: Engine, route: str, gateway: Gateway | None) -> LockSet:
    holder = default_holder()
    names = [lock_name(route)] + ([gateway_lock_name(gateway.name)] if gateway is not None else [])
    return LockSet([LeaseLock(engine, n, holder=holder) for n in names])


def step_route(engine: Engine, route: RouteConfig,
               verdicts: Iterable[CandidateVerdict] | Mapping[str, CandidateVerdict], *, gateway: Gateway,
               now: datetime, run_id: int | None = None, analysis_link: str | None = None,
               dry_run: bool = False) -> StepOutcome:
    """One controller iteration for one route: decide from this cycle's verdicts, push, record.

    Idempotent per `run_id`: stepping the same run again returns the recorded outcome (`replayed=True`) and
    changes nothing. A gateway fault never raises: the outcome says `failed` and what the gateway was left holding
    (the previous config, restored or never changed, or part of the push), the state records that and is not
    advanced, so the next cycle retries. The decision is taken from what the gateway holds (see
    shadowjudge.routing.controller). Raises InputError for verdicts or state that do not fit the route config.
    """
    now = as_utc(now)
    by_target = index_verdicts(route, verdicts)
    if dry_run:
        reading = read_gateway(gateway)
        decision = decide(route, load_rollout_state(engine, route), by_target, now,
                          gateway_weights=_weights_to_decide_from(engine, route, reading))
        return _preview(route, gateway, decision)
    locks = writer_locks(engine, route.name, gateway)
    busy = locks.acquire()
    if busy is not None:
        holder = busy.current_holder()
        state = load_rollout_state(engine, route)
        who = f"{holder[0]} until {holder[1].isoformat()}" if holder else "another writer"
        whose = "" if busy.name == lock_name(route.name) else (
            " (the gateway's lock: every route that pushes to the same gateway config shares it)")
        return StepOutcome(route.name, "busy", state.weights, state.weights, state.weights,
                           f"busy: {who} holds the lock '{busy.name}'{whose}", pushed=False,
                           status="busy", phase=state.phase, serving=state.serving)
    try:
        retrying = False
        with session_scope(engine) as s:
            row = s.get(RouteState, route.name)
            last_run = row.last_run_id if row is not None else None
            if run_id is not None and last_run is not None and run_id <= last_run:
                last = row.last_outcome or {}
                recorded = _recorded_outcome(last) if last.get("run_id", last_run) == run_id else None
                # A failed push changed nothing, so stepping the run again retries it instead of replaying it; its
                # samples and posteriors are in the state already and are not counted twice.
                retrying = recorded is not None and recorded.status == "failed"
                if recorded is not None and not retrying:
                    return replace(recorded, replayed=True)
                if not retrying:
                    state = load_rollout_state(engine, route)
                    return StepOutcome(
                        route.name, "hold", state.weights, state.weights, state.weights,
                        f"run {run_id} was stepped already or is older than run {last_run}, whose verdicts were "
                        "applied last: nothing changed", pushed=False, status="unchanged", phase=state.phase,
                        serving=state.serving, replayed=True)
        state = load_rollout_state(engine, route)
        reading = read_gateway(gateway)
        decision = decide(route, state, by_target, now, observe=not retrying,
                          gateway_weights=_weights_to_decide_from(engine, route, reading))
        return _apply(engine, route, gateway, decision, now=now, run_id=run_id, analysis_link=analysis_link,
                      reading=reading)
    finally:
        locks.release()


def _weights_to_decide_from(engine: Engine, route: RouteConfig, reading: GatewayReading) -> Weights | None:
    """The gateway's weights for `decide`, except when they are those of the route's last push whose outcome was
    never recorded: that push is the controller's own, and deciding from the state again re-derives it from the
    same verdicts, where deciding from the gateway's weights would step twice on one cycle's evidence."""
    if reading.weights is None:
        return None
    with session_scope(engine) as s:
        pending = s.scalar(select(RouteWeightChange.after)
                           .where(RouteWeightChange.route == route.name, RouteWeightChange.status == "pending")
                           .order_by(RouteWeightChange.revision.desc()).limit(1))
    names = [t.name for t in route.targets]
    if pending is not None and percentages(pending, names) == percentages(reading.weights, names):
        return None
    return reading.weights


def _recorded_outcome(data: dict[str, Any] | None) -> StepOutcome | None:
    """The stored outcome of the last step, if it still reads as one (fields may change between versions)."""
    if not data:
        return None
    known = {f.name for f in fields(StepOutcome)}
    try:
        return StepOutcome(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        return None


def _apply(engine: Engine, route: RouteConfig, gateway: Gateway, decision: Decision, *, now: datetime,
           run_id: int | None, analysis_link: str | None, label: str | None = None,
           reading: GatewayReading | None = None) -> StepOutcome:
    """Push the decision if the gateway does not already hold it; record history and state. Caller holds the lock.
    `reading`: what the gateway held when the decision was taken (read here when not given)."""
    action = label or decision.action
    reason = decision.reason
    names = [t.name for t in route.targets]
    push_needed = decision.changes_weights
    held: Weights | None = None
    if not push_needed:
        reading = reading or read_gateway(gateway)
        held = reading.weights
        if reading.error is not None:
            reason += f"; gateway not checked: {reading.error}"
        elif percentages(held or {}, names) != decision.after:
            push_needed = True
            action = "reconcile" if action == "hold" else action
            reason += f"; gateway held {format_weights(held) if held else 'nothing'}, pushing the recorded weights"

    revision: int | None = None
    result: PushResult | None = None
    if push_needed:
        revision = _claim_revision(engine, route, gateway, decision, action, reason, run_id, analysis_link, now,
                                   before=held)
        result = push_weights(gateway, decision.after, rollback=decision.action == "rollback")
    new_state, status = decision.applied, "unchanged" if result is None else "applied"
    if result is not None and not result.ok:
        reason += f"; push failed ({result.in_force})"
        new_state, status = _state_after_failed_push(decision, result, names)
        if status == "applied":
            reason += ", which sends traffic as decided"
    outcome = StepOutcome(
        route=route.name, decision=action, weights_before=decision.before, weights_after=dict(new_state.weights),
        proposed=decision.after, reason=reason, pushed=status == "applied", status=status,
        phase=new_state.phase, serving=new_state.serving, revision=revision,
        error=None if result is None else result.error)
    with session_scope(engine) as s:
        if revision is not None:
            change = s.scalar(select(RouteWeightChange).where(RouteWeightChange.route == route.name,
                                                              RouteWeightChange.revision == revision))
            change.status = outcome.status
            if result is not None and result.gateway_before is not None:
                change.before = result.gateway_before  # what the gateway held, where it differs from the state
            change.error = outcome.error
            change.reason = reason
        row = s.get(RouteState, route.name)
        if row is None:
            row = RouteState(route=route.name)
            s.add(row)
        _store_state(row, new_state)
        if revision is not None:
            row.revision = revision
        if run_id is not None:
            row.last_run_id = run_id
        row.last_outcome = {**outcome.to_dict(), "run_id": run_id}
    return outcome


def _state_after_failed_push(decision: Decision, result: PushResult, names: list[str]) -> tuple[RolloutState, str]:
    """The state to record after a failed push, and the step's status: what the gateway was left holding decides.

    Left as before (restored, or never changed): the refused state. Left partly updated: the refused state with the
    weights the gateway now holds, so the state never claims weights no gateway serves; and where those send
    traffic as the decision wanted (LiteLLM's {inc: 50, a: 0} after a rollback whose last update failed), the
    decision is in force: its applied state, status `applied`, so a retry of the run does not step again.
    """
    in_force = percentages(result.observed, names) if result.changed and result.observed is not None else None
    if in_force is None:
        return decision.refused, "failed"
    if in_force == decision.after:
        return decision.applied, "applied"
    return replace(decision.refused, weights=in_force), "failed"


def _claim_revision(engine: Engine, route: RouteConfig, gateway: Gateway, decision: Decision, action: str, reason: str,
                    run_id: int | None, analysis_link: str | None, now: datetime, before: Weights | None = None) -> int:
    with session_scope(engine) as s:
        # We hold the route's lock: a change still pending belongs to a writer that died (or lost the store) between
        # its push and recording the outcome. Whatever it left, this push now decides what the gateway holds.
        s.execute(update(RouteWeightChange)
                  .where(RouteWeightChange.route == route.name, RouteWeightChange.status == "pending")
                  .values(status="interrupted", error="the writer stopped before recording this push's outcome; "
                                                      "a later step pushed the weights in force"))
        last = s.scalar(select(func.max(RouteWeightChange.revision)).where(RouteWeightChange.route == route.name))
        revision = (last or 0) + 1
        s.add(RouteWeightChange(route=route.name, revision=revision,
                                before=decision.before if before is None else before, after=decision.after,
                                reason=reason, status="pending", decision=action, gateway=_short(gateway.name),
                                analysis_link=analysis_link, run_id=run_id, created_at=now))
    return revision


def _short(name: str, limit: int = 64) -> str:
    """The history column is 64 characters: keep the kind and the end of the location."""
    if len(name) <= limit:
        return name
    kind = name.split(":", 1)[0]
    return f"{kind}:…{name[-(limit - len(kind) - 2):]}"


def _preview(route: RouteConfig, gateway: Gateway, decision: Decision) -> StepOutcome:
    preview = preview_push(gateway, decision.after)
    reason = decision.reason
    if preview.error:
        reason += f"; the push would fail: {preview.error}"
    elif preview.gateway_before is not None and preview.gateway_before != decision.before:
        reason += f"; note: the gateway holds {preview.gateway_before or 'nothing'}"
    return StepOutcome(route.name, decision.action, decision.before, decision.before, decision.after, reason,
                       pushed=False, status="dry_run", phase=decision.applied.phase, serving=decision.applied.serving,
                       error=preview.error, config_diff=preview.config_diff)


# -- state row <-> RolloutState ---------------------------------------------------------------------------------

def load_rollout_state(engine: Engine, route: RouteConfig) -> RolloutState:
    with session_scope(engine) as s:
        row = s.get(RouteState, route.name)
        return RolloutState.initial(route) if row is None else _from_row(row, route)


def _from_row(row: RouteState, route: RouteConfig) -> RolloutState:
    policy_state = row.policy_state or {}
    by_name = {t.name: t for t in route.targets}
    weights = {k: int(v) for k, v in (row.weights or {}).items()}
    if not weights:
        return replace(RolloutState.initial(route), frozen=bool(row.frozen), approved_step=row.approved_step,
                       revision=row.revision)
    return RolloutState(
        route=row.route, weights=weights, serving=row.serving or route.incumbent.name, candidate=row.candidate,
        step_index=row.step_index, step_started_at=row.step_started_at,
        phase=row.phase, frozen=bool(row.frozen), approved_step=row.approved_step,
        samples_in_step=row.samples_in_step or 0,
        samples_for=policy_state.get("samples_for", row.candidate if route.policy.kind == "ladder" else None),
        failed=dict(policy_state.get("failed", {})), revision=row.revision,
        posteriors={n: _posterior_from_row(v, by_name.get(n)) for n, v in policy_state.get("posteriors", {}).items()},
        pending_rollback=policy_state["pending_rollback"] if "pending_rollback" in policy_state
        else _pending_rollback_before_it_was_kept(row))


def _pending_rollback_before_it_was_kept(row: RouteState) -> str | None:
    """A row stored before `pending_rollback` was: the serving target's rollback is pending when the last outcome
    is the controller's rollback that failed and took all traffic off the serving target. A failed manual
    `routes rollback` (decision `manual_rollback`) leaves the same phase and is not one."""
    last = row.last_outcome or {}
    proposed = last.get("proposed") or {}
    if (row.phase == "rolling_back" and row.serving and last.get("decision") == "rollback"
            and last.get("status") == "failed" and proposed.get(row.serving, 0) == 0):
        return row.serving
    return None


def _posterior_from_row(value: Any, target: TargetConfig | None) -> Posterior:
    """Stored as {alpha, beta, fingerprint}. A row written before fingerprints were kept holds [alpha, beta]: taken
    as judged on the target as configured now, since dropping it would restart every bandit rollout under way."""
    if isinstance(value, dict):
        return Posterior(float(value["alpha"]), float(value["beta"]), str(value["fingerprint"]))
    alpha, beta = value
    return Posterior(float(alpha), float(beta), target_fingerprint(target) if target is not None else "")


def _store_state(row: RouteState, state: RolloutState) -> None:
    row.weights = dict(state.weights)
    row.serving = state.serving
    row.candidate = state.candidate
    row.step_index = state.step_index
    row.step_started_at = state.step_started_at
    row.phase = state.phase
    row.frozen = state.frozen
    row.approved_step = state.approved_step
    row.samples_in_step = state.samples_in_step
    row.policy_state = {"failed": state.failed, "samples_for": state.samples_for,
                        "posteriors": {n: asdict(p) for n, p in state.posteriors.items()},
                        "pending_rollback": state.pending_rollback}


# -- operator actions (the `shadowjudge routes` commands) --------------------------------------------------------

def _locked(engine: Engine, route: str, gateway: Gateway | None = None, wait_s: float = 10.0) -> LockSet:
    locks = writer_locks(engine, route, gateway)
    deadline = time.monotonic() + wait_s
    while (busy := locks.acquire()) is not None:
        if time.monotonic() > deadline:
            holder = busy.current_holder()
            raise RouteBusy(f"route '{route}': '{busy.name}' is locked by "
                            f"{holder[0] if holder else 'another writer'}; try again")
        time.sleep(0.2)
    return locks


def _update_state(engine: Engine, route: RouteConfig, change: Any) -> RolloutState:
    lock = _locked(engine, route.name)
    try:
        state = change(load_rollout_state(engine, route))
        with session_scope(engine) as s:
            row = s.get(RouteState, route.name)
            if row is None:
                row = RouteState(route=route.name, revision=0)
                s.add(row)
            _store_state(row, state)
        return state
    finally:
        lock.release()


def approve_step(engine: Engine, route: RouteConfig) -> RolloutState:
    """Let the next gated step proceed (the manual gate); the approval is consumed by that step."""
    return _update_state(engine, route, lambda st: replace(st, approved_step=st.step_index + 1))


def set_frozen(engine: Engine, route: RouteConfig, frozen: bool) -> RolloutState:
    """Freeze stops every advance (rollbacks still happen); unfreeze lets the controller continue."""
    return _update_state(engine, route, lambda st: replace(st, frozen=frozen))


def manual_rollback(engine: Engine, route: RouteConfig, *, gateway: Gateway, now: datetime, to: str | None = None,
                    reason: str = "manual rollback", dry_run: bool = False) -> StepOutcome:
    """Send all traffic to `to` (default: the serving target) now, and mark the candidates it takes traffic from
    as failed. With `to` set to the config's incumbent after a promotion, this undoes the promotion. `dry_run`
    renders and validates the push and writes nothing. Decided from what the gateway holds, as the controller is."""
    now = as_utc(now)
    if dry_run:
        reading = read_gateway(gateway)
        return _preview(route, gateway, rollback_decision(route, load_rollout_state(engine, route), to, reason, now,
                                                          gateway_weights=reading.weights))
    lock = _locked(engine, route.name, gateway)
    try:
        reading = read_gateway(gateway)
        decision = rollback_decision(route, load_rollout_state(engine, route), to, reason, now,
                                     gateway_weights=reading.weights)
        return _apply(engine, route, gateway, decision, now=now, run_id=None, analysis_link=None,
                      label="manual_rollback", reading=reading)
    finally:
        lock.release()


def rollback_decision(route: RouteConfig, state: RolloutState, to: str | None, reason: str, now: datetime,
                      gateway_weights: Weights | None = None) -> Decision:
    """All traffic to `to` (default: the serving target); the candidates it takes traffic from are marked failed.

    `gateway_weights` (what the gateway holds; None: unknown) win over the state's, as in the controller: a
    candidate a hand edit gave traffic is marked failed too, or the next cycle would ramp it back up. A failed push
    leaves the refused state marked and `rolling_back`, so the controller retries the rollback next cycle (undoing a
    promotion that fails leaves the state as it was: rerun the command). Either way the person has chosen which
    target serves: a rollback of the serving target the controller left pending is dropped when it goes through,
    and when it is refused if it keeps the serving target."""
    names = [t.name for t in route.targets]
    target = to or state.serving
    if target not in names:
        raise InputError(f"route '{route.name}': cannot roll back to '{target}': not a target (targets: {names})")
    held = percentages(gateway_weights, names) if gateway_weights is not None else None
    before = dict(held or state.weights)
    after = {n: (100 if n == target else 0) for n in names}
    by_name = {t.name: t for t in route.targets}
    failed = dict(state.failed)
    for n in names:
        holding = state.weights.get(n, 0) > 0 or before.get(n, 0) > 0 or n == state.candidate
        if n != target and holding and n != route.incumbent.name:
            failed.setdefault(n, {"fingerprint": target_fingerprint(by_name[n]), "reason": reason,
                                  "at": now.isoformat()})
    applied = replace(state, weights=after, serving=target, candidate=None, step_index=-1, step_started_at=now,
                      phase="rolled_back", samples_in_step=0, approved_step=None, failed=failed, pending_rollback=None)
    # Refused, a rollback of the serving target's candidates is left marked for the controller to retry; undoing a
    # promotion (`to` another target than the serving one) is not the controller's to retry: state stays as it was.
    refused = replace(state, failed=failed, phase="rolling_back", pending_rollback=None) \
        if target == state.serving else state
    text = f"{reason}: all traffic to '{target}' ({weights_diff(before, after)})"
    return Decision("rollback", before, after, text, applied, refused)


def route_history(engine: Engine, route: str, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first: every change pushed or attempted for the route."""
    with session_scope(engine) as s:
        rows = s.scalars(select(RouteWeightChange).where(RouteWeightChange.route == route)
                         .order_by(RouteWeightChange.revision.desc()).limit(limit))
        return [{"revision": r.revision, "at": r.created_at.isoformat(), "decision": r.decision,
                 "status": r.status, "before": r.before, "after": r.after, "reason": r.reason, "error": r.error,
                 "gateway": r.gateway, "analysis_link": r.analysis_link, "run_id": r.run_id} for r in rows]


def route_status(engine: Engine, route: RouteConfig) -> dict[str, Any]:
    """The state `routes show` prints, with whether the config's incumbent is stale."""
    with session_scope(engine) as s:
        row = s.get(RouteState, route.name)
        last = dict(row.last_outcome or {}) if row is not None else {}
    state = load_rollout_state(engine, route)
    return {
        "route": route.name, "policy": route.policy.kind, "weights": state.weights, "serving": state.serving,
        "config_incumbent": route.incumbent.name, "config_stale": state.serving != route.incumbent.name,
        "candidate": state.candidate, "phase": state.phase, "step_index": state.step_index,
        "step_started_at": state.step_started_at.isoformat() if state.step_started_at else None,
        "samples_in_step": state.samples_in_step, "frozen": state.frozen or route.policy.frozen,
        "manual_gate": route.policy.manual_gate, "approved_step": state.approved_step,
        "failed": state.failed, "revision": state.revision, "last_decision": last.get("decision"),
        "last_reason": last.get("reason"),
    }
