"""Route weights: the rollout controller (ladder, cost-aware, bandit), its guards, and the safe push to gateways.

The cycle flow calls `step_route` once per route per cycle; operators use `routes_cli` (`shadowjudge routes ...`).
"""

from shadowjudge.routing.controller import Decision, RolloutState, RoutingStateError, decide
from shadowjudge.store.lease import LeaseLock
from shadowjudge.routing.push import PushResult, push_weights
from shadowjudge.routing.step import (
    RouteBusy,
    StepOutcome,
    approve_step,
    load_rollout_state,
    manual_rollback,
    route_history,
    route_status,
    set_frozen,
    step_route,
)
from shadowjudge.routing.verdicts import CandidateVerdict, InvalidVerdict, verdicts_from_analysis

__all__ = [
    "CandidateVerdict", "Decision", "InvalidVerdict", "LeaseLock", "PushResult", "RolloutState", "RouteBusy",
    "RoutingStateError", "StepOutcome", "approve_step", "decide", "load_rollout_state", "manual_rollback",
    "push_weights", "route_history", "route_status", "set_frozen", "step_route", "verdicts_from_analysis",
]
