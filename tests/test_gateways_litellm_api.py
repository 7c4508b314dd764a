"""The LiteLLM admin API adapter against a small stand-in proxy on loopback (same endpoints and payloads)."""

import copy
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shadowjudge.config import parse_config
from shadowjudge.gateways import GatewayConfigInvalid, GatewayRejected, GatewayUnavailable, get_gateway
from shadowjudge.routing import CandidateVerdict, step_route
from shadowjudge.routing.push import push_weights
from shadowjudge.store import get_engine

MASTER_KEY = "sk-master-test-123"


class StandInProxy:
    """In-memory LiteLLM proxy model registry: /model/info, /model/new, /model/update, /model/delete."""

    def __init__(self, deployments):
        self.deployments = copy.deepcopy(deployments)
        self.calls: list[tuple[str, dict]] = []
        self.fail_update_numbers: set[int] = set()  # these update calls (0-based) answer 500
        self.lie_after_writes = False  # once written to, /model/info reports other weights than it holds
        self.updates = 0
        self.written = False

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/model/info", self.info, methods=["GET"]),
            Route("/model/new", self.new, methods=["POST"]),
            Route("/model/update", self.update, methods=["POST"]),
            Route("/model/delete", self.delete, methods=["POST"]),
        ])

    def _denied(self, request: Request):
        if request.headers.get("authorization") != f"Bearer {MASTER_KEY}":
            return JSONResponse({"error": {"message": "Authentication Error, invalid proxy key"}}, status_code=401)
        return None

    async def info(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        data = []
        for d in self.deployments:
            shown = copy.deepcopy(d)
            shown["litellm_params"].pop("api_key", None)  # the proxy never returns keys
            if self.lie_after_writes and self.written:
                shown["litellm_params"]["weight"] = shown["litellm_params"].get("weight", 0) + 10
            data.append(shown)
        return JSONResponse({"data": data})

    async def new(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        self.calls.append(("new", body))
        self.written = True
        self.deployments.append(body)
        return JSONResponse({"model_id": body["model_info"]["id"]})

    async def update(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        self.calls.append(("update", body))
        number, self.updates = self.updates, self.updates + 1
        if number in self.fail_update_numbers:
            return JSONResponse({"error": "database write failed"}, status_code=500)
        self.written = True
        for d in self.deployments:
            if d["model_info"]["id"] == body["model_info"]["id"]:
                d["litellm_params"].update(body["litellm_params"])
                return JSONResponse({"ok": True})
        return JSONResponse({"error": "model not found"}, status_code=404)

    async def delete(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        self.calls.append(("delete", body))
        self.deployments = [d for d in self.deployments if d["model_info"]["id"] != body["id"]]
        return JSONResponse({"ok": True})

    def weights(self, route="chat"):
        return {d["model_info"]["id"]: d["litellm_params"].get("weight", 0)
                for d in self.deployments if d["model_name"] == route}


@contextmanager
def serve(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "stand-in server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def deployment(ident, model, weight=None, route="chat"):
    params = {"model": model, "api_base": "http://127.0.0.1:9000/v1", "api_key": "os.environ/UPSTREAM_KEY"}
    if weight is not None:
        params["weight"] = weight
    return {"model_name": route, "litellm_params": params, "model_info": {"id": ident}}


def make_route(url: str, key_env: str = "SJ_TEST_LITELLM_KEY"):
    cfg = parse_config({
        "sources": [{"name": "logs", "path": "x.jsonl"}],
        "routes": [{
            "name": "chat",
            "incumbent": {"name": "inc", "model": "gpt-4o", "base_url": "http://127.0.0.1:9000/v1"},
            "candidates": [{"name": "cand", "model": "Yi-34B-Chat", "base_url": "http://127.0.0.1:9001/v1",
                            "api_key_env": "CAND_KEY"}],
            "gateway": {"kind": "litellm_api", "url": url, "api_key_env": key_env},
        }],
    })
    route = cfg.routes[0]
    return route, get_gateway(route.gateway, route)


@pytest.fixture(autouse=True)
def admin_key(monkeypatch):
    monkeypatch.setenv("SJ_TEST_LITELLM_KEY", MASTER_KEY)
    monkeypatch.setenv("CAND_KEY", "sk-candidate-secret")


def test_push_updates_weights_adds_missing_targets_and_reads_back():
    proxy = StandInProxy([deployment("inc", "openai/gpt-4o", 100), deployment("emb", "openai/embed", route="embed")])
    with serve(proxy.app()) as url:
        _, gw = make_route(url)
        assert gw.read_current().weights == {"inc": 100}
        result = push_weights(gw, {"inc": 90, "cand": 10})
        assert result.ok and result.observed == {"inc": 90, "cand": 10}
        assert proxy.weights() == {"inc": 90, "chat/cand": 10}  # a new deployment's id is scoped by route
        created = [body for op, body in proxy.calls if op == "new"]
        assert created == [{"model_name": "chat", "model_info": {"id": "chat/cand"}, "litellm_params": {
            "model": "openai/Yi-34B-Chat", "api_base": "http://127.0.0.1:9001/v1", "api_key": "os.environ/CAND_KEY",
            "weight": 10}}]
        assert all("sk-candidate-secret" not in str(body) for _, body in proxy.calls)
        assert proxy.deployments[1]["litellm_params"] == {"model": "openai/embed", "api_base": "http://127.0.0.1:9000/v1",
                                                          "api_key": "os.environ/UPSTREAM_KEY"}  # untouched

        proxy.calls.clear()
        assert push_weights(gw, {"inc": 0, "cand": 100}).ok
        order = [(body["model_info"]["id"], body["litellm_params"]["weight"]) for op, body in proxy.calls]
        assert order == [("inc", 0), ("chat/cand", 100)]  # the decrease goes first


def test_a_proxy_that_fails_mid_push_is_restored_to_the_previous_weights():
    proxy = StandInProxy([deployment("inc", "openai/gpt-4o", 60), deployment("cand", "openai/Yi-34B-Chat", 40)])
    with serve(proxy.app()) as url:
        _, gw = make_route(url)
        proxy.fail_update_numbers = {1}  # the first update (cand 40→10) lands, the second (inc) gets a 500
        result = push_weights(gw, {"inc": 90, "cand": 10})
        assert not result.ok and result.error.startswith("GatewayUnavailable") and "HTTP 500" in result.error
        assert result.restored and proxy.weights() == {"inc": 60, "cand": 40}


def test_a_proxy_whose_deployments_had_no_weight_is_restored_to_the_split_it_served():
    """The snapshot read a missing weight as 0 and the restore wrote 0 on every deployment, leaving the route with
    no weight anywhere; /model/update cannot remove a weight, so the restore writes the split the proxy served."""
    proxy = StandInProxy([deployment("inc", "openai/gpt-4o"), deployment("cand", "openai/Yi-34B-Chat")])
    with serve(proxy.app()) as url:
        _, gw = make_route(url)
        assert gw.read_current().weights == {"inc": 50, "cand": 50}  # simple-shuffle: no weights, a uniform split
        proxy.fail_update_numbers = {1}  # the first update (inc, lowered) lands, the second (cand) gets a 500
        result = push_weights(gw, {"inc": 25, "cand": 75})
        assert not result.ok and result.restored, result.in_force
        assert gw.read_back() == {"inc": 50, "cand": 50} and proxy.weights() == {"inc": 50, "cand": 50}


def test_a_proxy_that_reports_other_weights_is_rolled_back_and_deployments_it_added_removed():
    proxy = StandInProxy([deployment("inc", "openai/gpt-4o", 100)])
    with serve(proxy.app()) as url:
        _, gw = make_route(url)
        proxy.lie_after_writes = True
        result = push_weights(gw, {"inc": 75, "cand": 25})
        assert not result.ok and result.error.startswith("GatewayReadBackMismatch")
        assert proxy.weights() == {"inc": 100}  # cand was created by the push and deleted by the restore
        assert result.restored  # a lone deployment serves every request, whatever weight the proxy reports for it
        assert ("delete", {"id": "chat/cand"}) in proxy.calls


def test_a_proxy_that_is_down_leaves_everything_as_it_was(store_url):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here
    route, gw = make_route(f"http://127.0.0.1:{port}")
    with pytest.raises(GatewayUnavailable, match="ConnectError"):
        gw.read_current()
    outcome = step_route(get_engine(store_url), route, [CandidateVerdict("cand", "pass", n=100)], gateway=gw,
                         now=datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert outcome.status == "failed" and outcome.weights_after == {"inc": 100, "cand": 0}


def test_a_wrong_admin_key_is_rejected_without_echoing_it(monkeypatch):
    proxy = StandInProxy([deployment("inc", "openai/gpt-4o", 100)])
    with serve(proxy.app()) as url:
        monkeypatch.setenv("SJ_TEST_LITELLM_KEY", "sk-wrong-key-456")
        _, gw = make_route(url)
        with pytest.raises(GatewayRejected, match="HTTP 401") as err:
            gw.read_current()
        assert "sk-wrong-key-456" not in str(err.value)
        monkeypatch.delenv("SJ_TEST_LITELLM_KEY")
        with pytest.raises(GatewayConfigInvalid, match="env var SJ_TEST_LITELLM_KEY"):
            gw.read_current()


def test_the_controller_steps_a_route_through_the_api(sqlite_url):
    proxy = StandInProxy([deployment("inc", "openai/gpt-4o", 100), deployment("cand", "openai/Yi-34B-Chat", 0)])
    with serve(proxy.app()) as url:
        route, gw = make_route(url)
        outcome = step_route(get_engine(sqlite_url), route, [CandidateVerdict("cand", "pass", n=100)], gateway=gw,
                             now=datetime(2025, 1, 1, tzinfo=timezone.utc))
        assert outcome.status == "applied" and proxy.weights() == {"inc": 99, "cand": 1}


def retried_gateway(url: str, model: str):
    """The route with its candidate shipped again under the same name with a new model (after a failure)."""
    route, _ = make_route(url)
    route = route.model_copy(update={"candidates": [route.candidates[0].model_copy(update={"model": model})]})
    return get_gateway(route.gateway, route)


def test_a_retried_target_is_pointed_at_its_new_model_and_a_failed_push_puts_the_old_one_back():
    """/model/update used to send only the weight, so the retried candidate ramped up on the rolled-back model."""
    proxy = StandInProxy([deployment("inc", "openai/gpt-4o", 100), deployment("chat/cand", "openai/Yi-34B-Chat", 0)])
    with serve(proxy.app()) as url:
        assert push_weights(retried_gateway(url, "Yi-34B-Chat-v2"), {"inc": 95, "cand": 5}).ok
        assert [body["litellm_params"] for op, body in proxy.calls] == [
            {"weight": 95},  # the incumbent still lives where its deployment points
            {"model": "openai/Yi-34B-Chat-v2", "api_base": "http://127.0.0.1:9001/v1",
             "api_key": "os.environ/CAND_KEY", "weight": 5}]
        assert proxy.deployments[1]["litellm_params"]["model"] == "openai/Yi-34B-Chat-v2"

    proxy = StandInProxy([deployment("inc", "openai/gpt-4o", 90), deployment("chat/cand", "openai/Yi-34B-Chat", 10)])
    with serve(proxy.app()) as url:
        proxy.fail_update_numbers = {1}  # cand's update (a decrease, so first) lands; the incumbent's fails
        result = push_weights(retried_gateway(url, "Yi-34B-Chat-v2"), {"inc": 100, "cand": 0})
        assert not result.ok and result.restored
        params = proxy.deployments[1]["litellm_params"]
        assert (params["model"], params["api_base"], params["weight"]) == (
            "openai/Yi-34B-Chat", "http://127.0.0.1:9000/v1", 10)


def test_a_deployment_of_the_route_that_is_no_target_and_has_no_weight_is_refused():
    """simple-shuffle ignores every weight when the deployment it tries first has none; it was read as weight 0."""
    proxy = StandInProxy([deployment("fallback", "openai/other-model"), deployment("inc", "openai/gpt-4o", 100)])
    with serve(proxy.app()) as url:
        _, gw = make_route(url)
        with pytest.raises(GatewayConfigInvalid, match="not one of its targets has no weight"):
            gw.read_current()
        assert not push_weights(gw, {"inc": 100, "cand": 0}).ok
        assert proxy.calls == []
