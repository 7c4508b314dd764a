"""The rollout controller: one pure decision per cycle, from the route config, its state and the cycle's verdicts.

Stepped one iteration at a time, like Flagger's or Argo Rollouts' canary controllers:

1. Rollback first. A candidate holding traffic whose verdict fails, that has a critical alert, or that was already
   marked failed, goes to 0 in this cycle, whatever the freeze switch, the gate, the dwell time or the step limit
   say: holding a failing candidate in traffic is what none of those guards may cause. That includes a candidate
   that was promoted and serves the route while the config still names the old incumbent: its traffic goes back
   to the config's incumbent, unless that incumbent is itself marked failed: then nothing is safer to roll back
   onto, the traffic stays where it is and the controller holds until a person decides (config stale). A
   rolled-back candidate stays failed until its target config (model, endpoint) changes, as Flagger retries a
   canary only on a new revision.
2. Then the state must agree with the config: after a promotion the config's incumbent is stale, and the
   controller holds until the config names the promoted target as incumbent.
3. Then freeze, the policy's proposal, and the guards on every advance: minimum dwell time and sample count since
   the last change, the manual gate, the per-step change limit and the incumbent's minimum weight. Under every
   policy a candidate gains weight only on a `pass` verdict in this cycle: too little data (inconclusive), a
   marginal result or no verdict never adds weight (the ladder and cost_aware hold it; the bandit may still take
   weight away), and a failing one never gains.

Every step is measured from what the gateway holds, as Flagger reads the router's weights each iteration: when the
caller passes the gateway's weights and they differ from the state's (a hand edit, a redeploy of the gateway
config), the controller decides from the gateway's, warns, and restarts the step (dwell, sample count and approval
start again: the evidence behind the next move was gathered under a split that is no longer in force).

`decide` never touches the store or a gateway; shadowjudge.routing.step applies its decision.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import numpy as np

from shadowjudge.config import RouteConfig, TargetConfig
from shadowjudge.errors import InputError
from shadowjudge.routing.verdicts import CandidateVerdict
from shadowjudge.routing.weights import (
    Weights,
    apportion,
    format_weights,
    limit_change,
    percentages,
    step_toward,
    weights_diff,
)

Action = Literal["advance", "promote", "rollback", "hold"]
BANDIT_DRAWS = 4000
log = logging.getLogger(__name__)


class RoutingStateError(InputError):
    """The stored route state and the route config cannot be reconciled without a person."""


@dataclass(frozen=True)
class Posterior:
    """The bandit's Beta posterior for one candidate, and the target revision (`target_fingerprint`) it was judged
    on: a new model or endpoint is a new revision and starts from the prior, as a failed mark is dropped."""

    alpha: float
    beta: float
    fingerprint: str


@dataclass
class RolloutState:
    """A route's rollout as the controller sees it (the `route_state` row, as plain data). `samples_for` is the
    candidate `samples_in_step` counts for (the ladder's; None for the other policies). `pending_rollback` is the
    serving target whose rollback was decided but whose push failed: the next cycle pushes it again. Kept apart
    from the phase, which a failed manual `routes rollback` (traffic to the serving target) leaves the same."""

    route: str
    weights: Weights
    serving: str
    candidate: str | None = None
    step_index: int = -1
    step_started_at: datetime | None = None
    phase: str = "idle"
    frozen: bool = False
    approved_step: int | None = None
    samples_in_step: int = 0
    samples_for: str | None = None
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    posteriors: dict[str, Posterior] = field(default_factory=dict)
    revision: int = 0
    pending_rollback: str | None = None

    @classmethod
    def initial(cls, route: RouteConfig) -> "RolloutState":
        weights = {t.name: 0 for t in route.targets}
        weights[route.incumbent.name] = 100
        return cls(route=route.name, weights=weights, serving=route.incumbent.name)


@dataclass(frozen=True)
class Decision:
    """What to do this cycle. `applied` is the state once the gateway holds `after`; `refused` the state if the push
    fails: not advanced, except that a rollback stays decided (it is retried next cycle even if verdicts change)."""

    action: Action
    before: Weights
    after: Weights
    reason: str
    applied: RolloutState
    refused: RolloutState

    @property
    def changes_weights(self) -> bool:
        return self.after != self.before


def target_fingerprint(target: TargetConfig) -> str:
    """A failed candidate is retried only when this changes (a new model or endpoint is a new revision)."""
    return hashlib.sha256(f"{target.model}\n{target.base_url}".encode()).hexdigest()[:16]


def decide(route: RouteConfig, state: RolloutState, verdicts: dict[str, CandidateVerdict], now: datetime,
           *, seed: int | None = None, observe: bool = True, gateway_weights: Weights | None = None) -> Decision:
    """One controller iteration. `verdicts` maps candidate names to this cycle's verdict (missing = no evidence).
    `observe=False` when `state` already counts these verdicts' samples and posteriors (a failed push retried).
    `gateway_weights`: what the gateway holds (None: unknown, or the state's weights stand); see the module doc."""
    names = [t.name for t in route.targets]
    state = _reconciled(route, state, names)
    observed = _observe(route, state, verdicts) if observe else state
    observed, drift = _drifted(route, observed, gateway_weights, names, now)
    decision = _decide(route, observed, verdicts, names, now, seed)
    return decision if drift is None else replace(decision, reason=f"{decision.reason}; {drift}")


def _decide(route: RouteConfig, observed: RolloutState, verdicts: dict[str, CandidateVerdict], names: list[str],
            now: datetime, seed: int | None) -> Decision:
    before = dict(observed.weights)
    rollback = _rollback(route, observed, verdicts, names, now)
    if rollback is not None:
        return rollback

    serving = observed.serving
    if serving != route.incumbent.name:
        incumbent = route.incumbent.name
        if incumbent in observed.failed:
            what = (f"'{serving}' serves route '{route.name}' but the config names '{incumbent}' as incumbent, which "
                    f"is marked failed ({observed.failed[incumbent].get('reason', '')}): name '{serving}' as "
                    f"incumbent again, or give '{incumbent}' a new revision (model or endpoint)")
        elif observed.phase == "promoted":
            what = (f"'{serving}' was promoted and now serves route '{route.name}', but the config still names "
                    f"'{incumbent}' as incumbent: make '{serving}' the incumbent to start a new rollout")
        else:
            what = (f"'{serving}' serves route '{route.name}' but the config names '{incumbent}' as incumbent; "
                    f"roll back to it (`shadowjudge routes rollback {route.name} --to {incumbent}`) "
                    "or update the config")
        return _hold(observed, before, f"config stale: {what}")
    if observed.phase == "promoted":
        observed = replace(observed, phase="idle")

    if observed.frozen or route.policy.frozen:
        where = "state" if observed.frozen else "config"
        return _hold(observed, before, f"frozen ({where}): weights stay {format_weights(before)}")

    kind = route.policy.kind
    if kind == "ladder":
        proposal = _ladder(route, observed, verdicts)
    elif kind == "cost_aware":
        proposal = _cost_aware(route, observed, verdicts)
    else:
        proposal = _bandit(route, observed, verdicts, seed)
    if isinstance(proposal, str):
        return _hold(observed, before, proposal)
    unearned = [n for n, w in proposal.desired.items()
                if n != observed.serving and w > before[n] and not _passed(verdicts.get(n))]
    if unearned:  # every policy promises this; held here too, so no policy can break it
        return _hold(observed, before, f"{proposal.why}; refused: {unearned} would gain weight without passing "
                                       f"this cycle ({_verdict_summary(unearned, verdicts, {})})")
    return _guarded_move(route, observed, proposal, names, now)


# -- state preparation -----------------------------------------------------------------------------------------

def _reconciled(route: RouteConfig, state: RolloutState, names: list[str]) -> RolloutState:
    """State restricted to the config's targets; failed marks and posteriors dropped for targets whose config changed
    (a new revision is judged afresh); no moving candidate that failed (it is rolled back, never advanced)."""
    orphans = {n: w for n, w in state.weights.items() if n not in names and w > 0}
    if orphans:
        raise RoutingStateError(
            f"route '{route.name}': {orphans} hold traffic but are not targets in the config; put them back in the "
            f"config, roll back (`shadowjudge routes rollback {route.name}`), then remove them")
    weights = {n: int(state.weights.get(n, 0)) for n in names}
    if sum(weights.values()) != 100:
        raise RoutingStateError(f"route '{route.name}': stored weights {state.weights} do not sum to 100")
    if state.serving not in names:
        raise RoutingStateError(
            f"route '{route.name}': serving target '{state.serving}' is not in the config (targets: {names})")
    fingerprints = {t.name: target_fingerprint(t) for t in route.targets}
    failed = {n: mark for n, mark in state.failed.items()
              if n in fingerprints and mark.get("fingerprint") == fingerprints[n]}
    posteriors = {n: p for n, p in state.posteriors.items() if n in fingerprints and p.fingerprint == fingerprints[n]}
    candidate = state.candidate if state.candidate in names and state.candidate != state.serving else None
    candidate = None if candidate in failed else candidate
    # a rollback is pending only for the target that still serves, is still marked failed and is not the incumbent
    pending = state.pending_rollback
    if pending != state.serving or pending not in failed or pending == route.incumbent.name:
        pending = None
    return replace(state, weights=weights, failed=failed, posteriors=posteriors, candidate=candidate,
                   pending_rollback=pending)


def _observe(route: RouteConfig, state: RolloutState, verdicts: dict[str, CandidateVerdict]) -> RolloutState:
    """Evidence this cycle adds whatever is decided: samples toward the dwell, and the bandit's posteriors."""
    fingerprints = {t.name: target_fingerprint(t) for t in route.targets}
    posteriors = dict(state.posteriors)
    for name, v in verdicts.items():
        if v.score is not None and v.n > 0:
            prior = posteriors.get(name, Posterior(1.0, 1.0, fingerprints[name]))
            posteriors[name] = Posterior(prior.alpha + v.score * v.n, prior.beta + (1.0 - v.score) * v.n,
                                         fingerprints[name])
    counted_for, samples = _step_samples(route, state, verdicts)
    carried = state.samples_in_step if counted_for == state.samples_for else 0
    return replace(state, samples_in_step=carried + samples, samples_for=counted_for, posteriors=posteriors)


def _step_samples(route: RouteConfig, state: RolloutState,
                  verdicts: dict[str, CandidateVerdict]) -> tuple[str | None, int]:
    """Whom the step's sample count is for, and this cycle's samples toward it.

    The ladder counts its moving candidate's samples (or those of the one it would start); when that candidate
    changes the count starts again, so a candidate never starts on another's samples. The other policies count the
    fewest samples of any candidate that has some and has not failed: a candidate that is down (no samples) must
    not hold the others back forever.
    """
    if route.policy.kind == "ladder":
        name = state.candidate or _ladder_start(route, state, verdicts)
        v = verdicts.get(name) if name is not None else None
        return name, (v.n if v else 0)
    counts = [v.n for name, v in verdicts.items() if name != state.serving and name not in state.failed and v.n > 0]
    return None, min(counts, default=0)


def _drifted(route: RouteConfig, state: RolloutState, gateway_weights: Weights | None, names: list[str],
             now: datetime) -> tuple[RolloutState, str | None]:
    """The state to decide from when the gateway holds other weights than it records, and the note saying so.

    The gateway's weights win: they are what serves traffic, so the step limit and the ladder are measured from
    them (from the stored ones, a gateway reset by hand to 100/0 saw its candidate jump to 100% in one push). The
    step restarts: dwell, sample count and approval start again from this cycle.
    """
    held = percentages(gateway_weights, names) if gateway_weights is not None else None
    if held is None or held == state.weights:
        return state, None
    note = (f"gateway drift: it holds {format_weights(held)} where the state recorded {format_weights(state.weights)};"
            " decided from the gateway's weights and the step restarts")
    log.warning("route '%s': %s", route.name, note)
    return replace(state, weights=held, step_started_at=now, samples_in_step=0, approved_step=None), note


# -- rollback --------------------------------------------------------------------------------------------------

def _rollback(route: RouteConfig, state: RolloutState, verdicts: dict[str, CandidateVerdict], names: list[str],
              now: datetime) -> Decision | None:
    """Every candidate holding traffic that fails goes to 0, its traffic to the serving target. A serving target
    the config does not name as incumbent (promoted, or sent all traffic by hand) is still a candidate the cycle
    judges: when it fails, all its traffic goes back to the config's incumbent, which serves the route again.
    Never onto an incumbent marked failed: that is no safer than the target serving now, so the traffic stays
    where it is and the controller holds, saying so, until a person decides (`_stranded`)."""
    by_name = {t.name: t for t in route.targets}
    incumbent = route.incumbent.name
    reasons: dict[str, str] = {}
    for name in names:
        if name == incumbent:
            continue
        serving = name == state.serving
        holding = serving or state.weights.get(name, 0) > 0 or name == state.candidate
        if not holding:
            continue
        v = verdicts.get(name)
        # A failed mark means a rollback not yet in force: for a candidate, while it holds traffic; for the serving
        # target, only when its own rollback's push failed (a person may serve a failed target again on purpose).
        pending = name == state.pending_rollback if serving else state.weights.get(name, 0) > 0
        if v is not None and v.critical_alert:
            reasons[name] = "critical alert"
        elif v is not None and v.verdict == "fail":
            reasons[name] = f"analysis failed (preference={_num(v.score)}, quality={_num(v.quality)}, n={v.n})"
        elif name in state.failed and pending:
            reasons[name] = f"marked failed earlier ({state.failed[name].get('reason', '')}); rollback not yet in force"
    stranded = None
    if state.serving in reasons and incumbent in state.failed:
        stranded = _stranded(route, state, reasons.pop(state.serving))
    if not reasons:
        return None if stranded is None else _hold(state, dict(state.weights), stranded)
    after = dict(state.weights)
    for name in reasons:
        after[name] = 0
    serving = incumbent if state.serving in reasons else state.serving
    after[serving] += 100 - sum(after.values())
    failed = dict(state.failed)
    for name, why in reasons.items():
        failed.setdefault(name, {"fingerprint": target_fingerprint(by_name[name]), "reason": why,
                                 "at": now.isoformat()})
    text = "; ".join(f"{n}: {why}" for n, why in reasons.items())
    reason = f"rollback {', '.join(reasons)} to 0 ({weights_diff(state.weights, after)}): {text}"
    if serving != state.serving:
        reason += (f"; '{state.serving}' served route '{route.name}' while the config names '{incumbent}' as "
                   f"incumbent: '{incumbent}' serves it again, as `shadowjudge routes rollback {route.name} --to "
                   f"{incumbent}` would")
    if stranded is not None:
        reason += f"; {stranded}"
    keep_candidate = state.candidate if state.candidate not in reasons else None
    phase = "progressing" if keep_candidate else "rolled_back"
    applied = replace(state, weights=after, serving=serving, failed=failed, candidate=keep_candidate, phase=phase,
                      step_index=-1 if not keep_candidate else state.step_index, step_started_at=now,
                      samples_in_step=0, approved_step=None, pending_rollback=None)
    refused = replace(state, failed=failed, phase="rolling_back",
                      pending_rollback=state.serving if serving != state.serving else state.pending_rollback)
    return Decision("rollback", dict(state.weights), after, reason, applied, refused)


def _stranded(route: RouteConfig, state: RolloutState, why: str) -> str:
    """Why the serving target that fails keeps its traffic: the config's incumbent, where a rollback would send it,
    was rolled back itself. Sending everything to a target known to fail is no rollback; which target is safe now
    (the serving one, the incumbent after all, another candidate) is a person's call."""
    incumbent = route.incumbent.name
    note = (f"config stale: '{state.serving}' serves route '{route.name}' and fails ({why}), but the config's "
            f"incumbent '{incumbent}' is marked failed ({state.failed[incumbent].get('reason', '')}), so there is "
            f"nothing safe to roll back to: traffic stays on '{state.serving}' until a person sends it to a target "
            f"they trust (`shadowjudge routes rollback {route.name} --to <target>`) or fixes the config")
    log.warning("route '%s': %s", route.name, note)
    return note


# -- policies: each proposes where the weights should go, or says why they stay ------------------------------

@dataclass(frozen=True)
class Proposal:
    desired: Weights
    candidate: str | None
    why: str
    completes: bool  # desired hands the route to `candidate` entirely: reaching it is a promotion


def _eligible(route: RouteConfig, state: RolloutState) -> list[str]:
    return [c.name for c in route.candidates if c.name != state.serving and c.name not in state.failed]


def _passed(v: CandidateVerdict | None) -> bool:
    """Whether this cycle's verdict lets a candidate gain weight: a pass without a critical alert. Too little data
    (inconclusive), a marginal result or no verdict at all is never a pass."""
    return v is not None and v.verdict == "pass" and not v.critical_alert


def _ladder_start(route: RouteConfig, state: RolloutState, verdicts: dict[str, CandidateVerdict]) -> str | None:
    """The candidate a ladder with none moving starts: the first in config order that passed and never failed."""
    return next((n for n in _eligible(route, state) if _passed(verdicts.get(n))), None)


def _ladder(route: RouteConfig, state: RolloutState, verdicts: dict[str, CandidateVerdict]) -> Proposal | str:
    active = state.candidate or _ladder_start(route, state, verdicts)
    if active is None:
        return f"no candidate to start: {_verdict_summary(_eligible(route, state), verdicts, state.failed)}"
    v = verdicts.get(active)
    if v is None:
        return f"'{active}' at {state.weights[active]}%: no verdict this cycle, weights held"
    if v.verdict != "pass":
        return f"'{active}' at {state.weights[active]}%: verdict {v.verdict} (n={v.n}), weights held"
    current = state.weights[active]
    if current == 100 and 100 in route.policy.steps:  # the gateway already gives it everything: promote, no push
        return Proposal(dict(state.weights), active, f"'{active}' passed (preference={_num(v.score)}, n={v.n}) and "
                                                     "already holds 100%", completes=True)
    floor = route.policy.incumbent_min_weight
    rungs = [s for s in route.policy.steps if s == 100 or 100 - s >= floor]
    higher = [s for s in rungs if s > current]
    if not higher:
        return f"'{active}' at {current}%: top of the ladder {route.policy.steps} without 100, weights held"
    rung = higher[0]
    desired = {n: 0 for n in state.weights}
    desired[active] = rung
    desired[state.serving] = 100 - rung
    return Proposal(desired, active, f"'{active}' passed (preference={_num(v.score)}, n={v.n}): ladder step {rung}%",
                    completes=rung == 100)


def _cost_aware(route: RouteConfig, state: RolloutState, verdicts: dict[str, CandidateVerdict]) -> Proposal | str:
    floor = route.policy.quality_floor
    holding_unsettled = [n for n, w in state.weights.items()
                         if w > 0 and n != state.serving and not _passed(verdicts.get(n))]
    if holding_unsettled:
        n = holding_unsettled[0]
        kind = verdicts[n].verdict if n in verdicts else "missing"
        return f"'{n}' holds {state.weights[n]}% with verdict {kind}: weights held"
    serving_costs = {v.incumbent_cost_per_outcome for v in verdicts.values()
                     if v.incumbent_cost_per_outcome is not None}
    if not serving_costs:
        return f"no incumbent cost_per_outcome in this cycle's verdicts: cannot compare cost with '{state.serving}'"
    costs: dict[str, float] = {state.serving: min(serving_costs)}
    for c in route.candidates:
        v = verdicts.get(c.name)
        if c.name == state.serving or c.name in state.failed or not _passed(v):
            continue
        if v.cost_per_outcome is None or (floor is not None and (v.quality is None or v.quality < floor)):
            continue
        costs[c.name] = v.cost_per_outcome
    cheapest = min(costs, key=lambda n: (costs[n], n != state.serving))
    desired = {n: 0 for n in state.weights}
    desired[cheapest] = 100
    if cheapest == state.serving:
        if state.weights[state.serving] == 100:
            return f"'{state.serving}' is the cheapest passing target (${costs[cheapest]:.4g}/outcome): weights held"
        return Proposal(desired, None, f"'{state.serving}' is the cheapest passing target: traffic returns to it",
                        completes=False)
    return Proposal(desired, cheapest, f"'{cheapest}' is the cheapest passing target (${costs[cheapest]:.4g} vs "
                                       f"${costs[state.serving]:.4g}/outcome for '{state.serving}')", completes=True)


def _bandit(route: RouteConfig, state: RolloutState, verdicts: dict[str, CandidateVerdict],
            seed: int | None) -> Proposal | str:
    """Thompson sampling over the candidates with judge scores, against the incumbent: each gets its share of the
    draws it wins. Only an arm that passed this cycle may gain. One that did not (inconclusive, marginal, no
    verdict, or failing while it holds no traffic) gets the smaller of its weight and its share: a cycle without
    a pass is no evidence to give it more, but a posterior that sinks (quality slipping, `marginal`) still takes
    its traffic away. The serving target takes back whatever the arms give up. An arm that holds traffic without a
    score for its current revision has no share."""
    arms = _eligible(route, state)
    fed = [n for n in arms if n in state.posteriors]
    if not fed and not any(state.weights[n] for n in arms):
        return "bandit: no judge scores yet for any candidate"
    rng = np.random.default_rng(seed if seed is not None else bandit_seed(route.name, state.revision))
    draws = [rng.beta(state.posteriors[n].alpha, state.posteriors[n].beta, size=BANDIT_DRAWS) for n in fed]
    # The incumbent is the reference: a preference of 0.5 is "as good as the incumbent".
    winners = np.argmax(np.vstack([np.full((1, BANDIT_DRAWS), 0.5), *draws]), axis=0)
    shares = {state.serving: float(np.mean(winners == 0))}
    for i, n in enumerate(fed):
        shares[n] = float(np.mean(winners == i + 1))
    desired = apportion(shares, list(state.weights))
    unpassed = [n for n in arms if not _passed(verdicts.get(n))]
    for n in unpassed:
        desired[n] = min(desired[n], state.weights[n])
    desired[state.serving] = 100 - sum(w for n, w in desired.items() if n != state.serving)
    summary = ", ".join(f"{n}={shares[n]:.2f}" for n in shares)
    if len(unpassed) == len(arms):
        kept = f"; no candidate passed this cycle ({_verdict_summary(arms, verdicts, state.failed)}): none gains"
    elif unpassed:
        kept = f"; no gain without a pass: {_verdict_summary(unpassed, verdicts, {})}"
    else:
        kept = ""
    return Proposal(desired, None, f"bandit: P(best) {summary}{kept}", completes=False)


def bandit_seed(route: str, revision: int) -> int:
    """Reproducible draws: the same route at the same revision always proposes the same weights."""
    return int.from_bytes(hashlib.sha256(f"{route}:{revision}".encode()).digest()[:8], "big")


# -- guards ----------------------------------------------------------------------------------------------------

def _guarded_move(route: RouteConfig, state: RolloutState, proposal: Proposal, names: list[str],
                  now: datetime) -> Decision:
    policy = route.policy
    before = dict(state.weights)
    if proposal.desired == before and not proposal.completes:
        return _hold(state, before, f"{proposal.why}; weights already there")
    if state.step_started_at is not None and policy.min_dwell_s > 0:
        dwelt = (now - state.step_started_at).total_seconds()
        if dwelt < policy.min_dwell_s:
            return _hold(state, before,
                         f"{proposal.why}; dwell {dwelt:.0f}s of {policy.min_dwell_s:.0f}s since the last change")
    if state.samples_in_step < policy.min_samples_per_step:
        return _hold(state, before, f"{proposal.why}; {state.samples_in_step} of {policy.min_samples_per_step} samples "
                                    "since the last change")
    gate = state.step_index + 1
    if policy.manual_gate and (state.approved_step is None or state.approved_step < gate):
        return _hold(state, before, f"{proposal.why}; waiting for approval of step {gate} "
                                    f"(`shadowjudge routes approve {route.name}`)")

    # A promotion the step limit allows in one change ignores the floor; any other move keeps both (step_toward).
    completes = proposal.completes and limit_change(
        before, proposal.desired, policy.max_step_change, names) == proposal.desired
    moved = dict(proposal.desired) if completes else step_toward(
        before, proposal.desired, policy.max_step_change, state.serving, policy.incumbent_min_weight, names)
    if moved == before and not completes:
        return _hold(state, before, f"{proposal.why}; the step limit ({policy.max_step_change}) and the incumbent's "
                                    f"minimum ({policy.incumbent_min_weight}%) allow no move")

    limited = "" if moved == proposal.desired else f" (limited to {weights_diff(before, moved)})"
    common = dict(weights=moved, step_started_at=now, samples_in_step=0)
    if completes and proposal.candidate is not None:
        applied = replace(state, **common, serving=proposal.candidate, candidate=None, phase="promoted",
                          step_index=-1, approved_step=None)
        reason = (f"promote '{proposal.candidate}': {proposal.why}; it now serves route '{route.name}' "
                  f"({weights_diff(before, moved)}); the config's incumbent '{route.incumbent.name}' is now stale")
        action: Action = "promote"
    else:
        step_index = state.step_index + 1
        if policy.kind == "ladder" and proposal.candidate is not None:
            step_index = max([i for i, s in enumerate(policy.steps) if s <= moved[proposal.candidate]], default=-1)
        applied = replace(state, **common, candidate=proposal.candidate, step_index=step_index,
                          phase="progressing" if any(w for n, w in moved.items() if n != state.serving) else "idle")
        reason = f"advance: {proposal.why}{limited}: {weights_diff(before, moved)}"
        action = "advance"
    return Decision(action, before, moved, reason, applied, state)


def _hold(state: RolloutState, before: Weights, reason: str) -> Decision:
    return Decision("hold", before, dict(before), f"hold: {reason}", state, state)


def _verdict_summary(names: list[str], verdicts: dict[str, CandidateVerdict], failed: dict[str, Any]) -> str:
    if not names:
        return "every candidate failed earlier (" + ", ".join(failed) + ")" if failed else "no candidates"
    parts = [f"{n}={verdicts[n].verdict}" if n in verdicts else f"{n}=no verdict" for n in names]
    return ", ".join(parts)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
