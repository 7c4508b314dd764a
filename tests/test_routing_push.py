"""A push that fails part-way on a gateway without transactions (the LiteLLM admin API, one update per deployment):
what is put back, what is kept, and what the step records. Stepped one cycle at a time against a stand-in proxy."""

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from shadowjudge.config import RouteConfig
from shadowjudge.gateways.litellm_api import LiteLLMApiGateway
from shadowjudge.routing import CandidateVerdict, load_rollout_state, route_history, step_route
from shadowjudge.routing.controller import RolloutState
from shadowjudge.routing.step import _store_state
from shadowjudge.store import RouteState, get_engine, session_scope

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=timezone.utc)


class Proxy:
    """/model/info and /model/update of a LiteLLM proxy; updates of the deployments in `failing` answer 500
    (`times` times, then they succeed; None: always)."""

    def __init__(self, weights: dict[str, int]) -> None:
        self.deployments = {f"d-{n}": {"model_name": "chat", "model_info": {"id": f"d-{n}"},
                                       "litellm_params": {"model": f"openai/acct/m-{n}", "weight": w}}
                            for n, w in weights.items()}
        self.failing: dict[str, int | None] = {}
        self.updates: list[tuple[str, int, str]] = []

    def weights(self) -> dict[str, int]:
        return {k[2:]: d["litellm_params"]["weight"] for k, d in self.deployments.items()}

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/model/info":
            return httpx.Response(200, json={"data": list(self.deployments.values())})
        body = json.loads(request.content)
        ident, weight = body["model_info"]["id"], body["litellm_params"]["weight"]
        if ident in self.failing:
            left = self.failing[ident]
            if left is None or left > 0:
                self.failing[ident] = None if left is None else left - 1
                self.updates.append((ident, weight, "500"))
                return httpx.Response(500, json={"error": "database write failed"})
        self.updates.append((ident, weight, "ok"))
        self.deployments[ident]["litellm_params"]["weight"] = weight
        return httpx.Response(200, json={})


def make_route(targets: tuple[str, ...] = ("inc", "a")) -> RouteConfig:
    spec = [{"name": n, "model": f"acct/m-{n}", "base_url": f"http://127.0.0.1:{9000 + i}/v1"}
            for i, n in enumerate(targets)]
    return RouteConfig.model_validate({
        "name": "chat", "incumbent": spec[0], "candidates": spec[1:], "policy": {"steps": [5, 25, 50, 100]},
        "gateway": {"kind": "litellm_api", "url": "http://proxy:4000"}})


def start(store_url: str, route: RouteConfig, weights: dict[str, int], proxy: Proxy):
    """A route under way at `weights` (the state and the proxy agree), and a gateway talking to the proxy."""
    engine = get_engine(store_url)
    state = replace(RolloutState.initial(route), weights=weights, candidate="a", step_index=1, phase="progressing",
                    step_started_at=T0)
    with session_scope(engine) as s:
        row = RouteState(route=route.name, revision=0)
        s.add(row)
        _store_state(row, state)
    return engine, LiteLLMApiGateway(route, "http://proxy:4000", transport=httpx.MockTransport(proxy.handle))


@pytest.mark.parametrize("times", [1, None], ids=["transient", "persistent"])
def test_a_rollback_that_fails_part_way_keeps_the_failing_candidate_at_zero(sqlite_url, times):
    route, proxy = make_route(), Proxy({"inc": 50, "a": 50})
    engine, gateway = start(sqlite_url, route, {"inc": 50, "a": 50}, proxy)
    proxy.failing = {"d-inc": times}  # a -> 0 lands (decreases go first), then inc -> 100 fails
    outcome = step_route(engine, route, [CandidateVerdict("a", "fail", score=0.1, n=300, critical_alert=True)],
                         gateway=gateway, now=T0 + timedelta(hours=1))
    assert outcome.decision == "rollback"
    assert proxy.weights() == {"inc": 50, "a": 0}  # not restored: a would get 50% again
    assert proxy.updates[:2] == [("d-a", 0, "ok"), ("d-inc", 100, "500")] and ("d-a", 50, "ok") not in proxy.updates
    # {inc: 50, a: 0} sends every request to inc: the rollback is in force, and recorded so
    assert "push failed (gateway left partly updated: holds inc=" in outcome.reason
    assert outcome.reason.endswith("a=0), which sends traffic as decided") and outcome.status == "applied"
    state = load_rollout_state(engine, route)
    assert state.weights == {"inc": 100, "a": 0} and state.phase == "rolled_back" and "a" in state.failed
    assert route_history(engine, "chat")[0]["before"] == {"inc": 50, "a": 50}
    # the next cycle leaves it: the proxy's weights send traffic as the state says
    held = step_route(engine, route, [], gateway=gateway, now=T0 + timedelta(hours=2))
    assert held.status == "unchanged" and proxy.weights() == {"inc": 50, "a": 0}


def test_a_push_that_fails_part_way_and_cannot_be_restored_records_what_the_gateway_holds(sqlite_url):
    route, proxy = make_route(), Proxy({"inc": 95, "a": 5})
    engine, gateway = start(sqlite_url, route, {"inc": 95, "a": 5}, proxy)
    proxy.failing = {"d-a": None}  # inc 95 -> 75 lands; a -> 25 fails, and so does the restore's a -> 5
    outcome = step_route(engine, route, [CandidateVerdict("a", "pass", score=0.7, n=300)], gateway=gateway,
                         now=T0 + timedelta(hours=1))
    assert outcome.decision == "advance" and outcome.status == "failed" and outcome.proposed == {"inc": 75, "a": 25}
    assert proxy.weights() == {"inc": 75, "a": 5}
    assert "push failed (gateway left partly updated: holds inc=" in outcome.reason  # 75:5, or the 94:6 it sends
    assert "previous config" not in outcome.reason
    # the state records the split the gateway now sends (75:5 is 94:6), not the 95:5 it no longer holds
    assert outcome.weights_after == {"inc": 94, "a": 6} == load_rollout_state(engine, route).weights
    last = route_history(engine, "chat")[0]
    assert last["status"] == "failed" and last["before"] == {"inc": 95, "a": 5}
    assert "gateway left partly updated" in last["reason"] and "HTTP 500" in last["error"]


def test_an_advance_that_fails_part_way_is_restored(sqlite_url):
    route, proxy = make_route(), Proxy({"inc": 95, "a": 5})
    engine, gateway = start(sqlite_url, route, {"inc": 95, "a": 5}, proxy)
    proxy.failing = {"d-a": 1}  # inc 95 -> 75 lands, a -> 25 fails once: the restore puts inc back
    outcome = step_route(engine, route, [CandidateVerdict("a", "pass", score=0.7, n=300)], gateway=gateway,
                         now=T0 + timedelta(hours=1))
    assert outcome.status == "failed" and "push failed (previous config restored)" in outcome.reason
    assert proxy.weights() == {"inc": 95, "a": 5} and load_rollout_state(engine, route).weights == {"inc": 95, "a": 5}
