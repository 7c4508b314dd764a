"""LiteLLM proxy admin API: set deployment weights on a running proxy without a restart.

Reads `GET /model/info`, changes weights with `POST /model/update` (only `litellm_params.weight`, so keys and
other params stay as the proxy holds them), adds missing targets with `POST /model/new` (the key as an
`os.environ/<VAR>` reference, never its value) and, when restoring, removes deployments a failed push added with
`POST /model/delete`. The API has no transactions, so a push applies weight decreases before increases (a
target being rolled back stops taking traffic first) and a failed push is undone by the controller, which pushes
the snapshot it read first.

The admin key comes from the env var named by the gateway's `api_key_env`; error messages never include it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from shadowjudge.config import RouteConfig
from shadowjudge.gateways.base import (
    GatewayConfigInvalid,
    GatewayRejected,
    GatewaySnapshot,
    GatewayUnavailable,
    Weights,
    check_weights,
)
from shadowjudge.gateways.files import model_owner, route_targets
from shadowjudge.gateways.litellm import deployment_owner, new_deployment


@dataclass(frozen=True)
class Deployment:
    id: str
    owner: str
    weight: int


@dataclass(frozen=True)
class LiteLLMPlan:
    """A rendered push: weight updates for existing deployments, and deployments to create."""

    updates: list[Deployment] = field(default_factory=list)
    creates: list[dict[str, Any]] = field(default_factory=list)
    weights: Weights = field(default_factory=dict)


class LiteLLMApiGateway:
    kind = "litellm_api"

    def __init__(self, route: RouteConfig, url: str, *, api_key_env: str | None = None, timeout_s: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.route = route
        self.url = url.rstrip("/")
        self.name = f"litellm_api:{self.url}"
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.transport = transport

    # -- Gateway protocol --------------------------------------------------------------------------------------
    def read_current(self) -> GatewaySnapshot:
        deployments = self._deployments()
        return GatewaySnapshot(weights={d.owner: d.weight for d in deployments}, document=deployments)

    def render(self, current: GatewaySnapshot, weights: Mapping[str, int]) -> LiteLLMPlan:
        check_weights(weights, f"route '{self.route.name}'")
        existing = {d.owner: d for d in current.document or []}
        updates, creates = [], []
        for target in route_targets(self.route):
            w = int(weights.get(target.name, 0))
            if target.name in existing:
                updates.append(Deployment(existing[target.name].id, target.name, w))
            else:
                creates.append(new_deployment(self.route.name, target, w))
        old = {d.owner: d.weight for d in existing.values()}
        updates.sort(key=lambda d: d.weight - old.get(d.owner, 0))  # decreases first
        return LiteLLMPlan(updates, creates, dict(weights))

    def validate(self, rendered: LiteLLMPlan, weights: Mapping[str, int]) -> None:
        check_weights(weights, f"route '{self.route.name}'")
        planned = {d.owner: d.weight for d in rendered.updates}
        by_name = {t.name: t for t in route_targets(self.route)}
        planned.update({deployment_owner(by_name, c, lambda _: None): c["litellm_params"]["weight"]
                        for c in rendered.creates})
        if planned != dict(weights):
            raise GatewayRejected(f"{self.name}: plan sets {planned}, not the weights {dict(weights)}")
        for c in rendered.creates:
            key = c["litellm_params"].get("api_key")
            if key is not None and not str(key).startswith("os.environ/"):
                raise GatewayRejected(f"{self.name}: a new deployment would carry a literal key; refusing")

    def push(self, rendered: LiteLLMPlan | list[Deployment] | None) -> None:
        if rendered is None or isinstance(rendered, list):
            self._restore(rendered or [])
            return
        for d in rendered.updates:
            self._call("POST", "/model/update",
                       {"model_info": {"id": d.id}, "litellm_params": {"weight": d.weight}})
        for body in rendered.creates:
            self._call("POST", "/model/new", body)

    def read_back(self) -> Weights:
        return {d.owner: d.weight for d in self._deployments()}

    # -- helpers -----------------------------------------------------------------------------------------------
    def _restore(self, snapshot: list[Deployment]) -> None:
        keep = {d.id for d in snapshot}
        for d in sorted(snapshot, key=lambda d: d.weight):
            self._call("POST", "/model/update", {"model_info": {"id": d.id}, "litellm_params": {"weight": d.weight}})
        for d in self._deployments():
            if d.id not in keep:
                self._call("POST", "/model/delete", {"id": d.id})

    def _deployments(self) -> list[Deployment]:
        body = self._call("GET", "/model/info")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise GatewayUnavailable(f"{self.name}: /model/info did not return a 'data' list")
        by_name = {t.name: t for t in route_targets(self.route)}
        out: dict[str, Deployment] = {}
        for dep in data:
            if not isinstance(dep, dict) or dep.get("model_name") != self.route.name:
                continue
            ident = (dep.get("model_info") or {}).get("id")
            params = dep.get("litellm_params") or {}
            weight = params.get("weight", 0)
            if isinstance(weight, float) and weight.is_integer():
                weight = int(weight)
            if not isinstance(weight, int) or isinstance(weight, bool):
                raise GatewayConfigInvalid(f"{self.name}: deployment {ident}: weight {weight!r} is not an integer")
            owner = deployment_owner(by_name, dep, lambda m: model_owner(self.route, m))
            if owner is None:
                if weight:
                    raise GatewayConfigInvalid(
                        f"{self.name}: deployment {ident} of '{self.route.name}' is not a route target but holds "
                        f"weight {weight}")
                continue
            if not ident:
                raise GatewayConfigInvalid(f"{self.name}: deployment for '{owner}' has no model_info.id")
            if owner in out:
                raise GatewayConfigInvalid(f"{self.name}: two deployments for target '{owner}'")
            out[owner] = Deployment(str(ident), owner, weight)
        return list(out.values())

    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise GatewayConfigInvalid(f"{self.name}: env var {self.api_key_env} (the admin key) is not set")
        return value

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        key = self._key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            with httpx.Client(base_url=self.url, timeout=self.timeout_s, transport=self.transport) as client:
                response = client.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"{self.name}{path}: {type(exc).__name__}: {_redact(str(exc), key)}") from None
        if response.status_code >= 400:
            problem = f"{self.name}{path}: HTTP {response.status_code}: {_redact(response.text, key)[:300]}"
            raise (GatewayUnavailable if response.status_code >= 500 else GatewayRejected)(problem)
        try:
            return response.json()
        except ValueError:
            raise GatewayUnavailable(f"{self.name}{path}: response is not JSON") from None


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text
