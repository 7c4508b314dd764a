"""LiteLLM proxy admin API: set deployment weights on a running proxy without a restart.

Reads `GET /model/info`, changes weights with `POST /model/update` (`litellm_params.weight`, plus the model,
`api_base` and key reference of a deployment named for a target that now lives elsewhere; other params stay as the
proxy holds them), adds missing targets with `POST /model/new` (the key as an `os.environ/<VAR>` reference, never
its value) and, when restoring, puts back each deployment's weight, model and `api_base` and removes deployments a
failed push added with `POST /model/delete` (a key reference a push changed stays: the proxy never shows keys;
a weight the proxy had none of cannot be removed either, so the split is restored as weights instead).
The API has no transactions, so a push applies weight decreases before increases (a target being rolled back stops
taking traffic first) and a failed push is undone by the controller, which pushes the snapshot it read first.
Weights are read, and deployments matched to targets, as in a config.yaml (see shadowjudge.gateways.litellm).

The admin key comes from the env var named by the gateway's `api_key_env`; error messages never include it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
from shadowjudge.gateways.litellm import (
    deployment_weight,
    id_owner,
    new_deployment,
    owned_deployments,
    repointed_params,
    served_weights,
)

ENDPOINT_KEYS = ("model", "api_base")  # what a restore puts back besides the weight


@dataclass(frozen=True)
class Deployment:
    """A target's deployment: as the proxy holds it (`weight`: None when it sets none; `endpoint`: its model and
    api_base; `named`: matched by its model_info.id; `served`: the percentage of the route it served), or as a push
    sets it (`endpoint`: what it changes besides the weight, {} for nothing)."""

    id: str
    owner: str
    weight: float | None
    endpoint: dict[str, Any] = field(default_factory=dict)
    named: bool = False
    served: int = 0


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
        weights, deployments = self._read()
        return GatewaySnapshot(weights=weights, document=deployments)

    def render(self, current: GatewaySnapshot, weights: Mapping[str, int]) -> LiteLLMPlan:
        check_weights(weights, f"route '{self.route.name}'")
        existing = {d.owner: d for d in current.document or []}
        updates, creates = [], []
        for target in self.route.targets:
            w = int(weights.get(target.name, 0))
            held = existing.get(target.name)
            if held is not None:
                endpoint = repointed_params(held.endpoint, target) if held.named else {}
                updates.append(Deployment(held.id, target.name, w, endpoint))
            else:
                creates.append(new_deployment(self.route.name, target, w))
        updates.sort(key=lambda d: d.weight - current.weights.get(d.owner, 0))  # decreases first
        return LiteLLMPlan(updates, creates, dict(weights))

    def validate(self, rendered: LiteLLMPlan, weights: Mapping[str, int]) -> None:
        check_weights(weights, f"route '{self.route.name}'")
        planned = {d.owner: d.weight for d in rendered.updates}
        by_name = {t.name: t for t in self.route.targets}
        planned.update({id_owner(by_name, c): c["litellm_params"]["weight"] for c in rendered.creates})
        if planned != dict(weights):
            raise GatewayRejected(f"{self.name}: plan sets {planned}, not the weights {dict(weights)}")
        written = [c["litellm_params"] for c in rendered.creates] + [d.endpoint for d in rendered.updates]
        for params in written:
            key = params.get("api_key")
            if key is not None and not str(key).startswith("os.environ/"):
                raise GatewayRejected(f"{self.name}: a deployment would carry a literal key; refusing")

    def push(self, rendered: LiteLLMPlan | list[Deployment] | None) -> None:
        if rendered is None or isinstance(rendered, list):
            self._restore(rendered or [])
            return
        for d in rendered.updates:
            self._update(d)
        for body in rendered.creates:
            self._call("POST", "/model/new", body)

    def read_back(self) -> Weights:
        return self._read()[0]

    # -- helpers -----------------------------------------------------------------------------------------------
    def _update(self, d: Deployment) -> None:
        self._call("POST", "/model/update", {"model_info": {"id": d.id},
                                             "litellm_params": {**d.endpoint, "weight": d.weight}})

    def _restore(self, snapshot: list[Deployment]) -> None:
        """Put the snapshot's deployments back. /model/update keeps a param sent as null, so a missing weight cannot
        be removed again: when any deployment had none, each gets the percentage it served, the same split."""
        keep = {d.id for d in snapshot}
        if any(d.weight is None for d in snapshot):
            snapshot = [replace(d, weight=d.served) for d in snapshot]
        for d in sorted(snapshot, key=lambda d: d.weight):
            self._update(d)
        for d in self._read()[1]:
            if d.id not in keep:
                self._call("POST", "/model/delete", {"id": d.id})

    def _read(self) -> tuple[Weights, list[Deployment]]:
        """The weights the proxy serves the route with, and the route targets' deployments."""
        body = self._call("GET", "/model/info")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise GatewayUnavailable(f"{self.name}: /model/info did not return a 'data' list")
        where = f"{self.name}: /model/info data"
        owned = owned_deployments(self.route, data, where)
        by_name = {t.name: t for t in self.route.targets}
        served = served_weights(self.route.name, data, owned, where)
        deployments = []
        for owner, dep in owned.items():
            ident = (dep.get("model_info") or {}).get("id")
            if not ident:
                raise GatewayConfigInvalid(f"{self.name}: deployment for '{owner}' has no model_info.id")
            params = dep.get("litellm_params") or {}
            weight = deployment_weight(dep, f"{where} '{ident}'")
            endpoint = {k: params[k] for k in ENDPOINT_KEYS if params.get(k) is not None}
            named = id_owner(by_name, dep) is not None
            deployments.append(Deployment(str(ident), owner, weight, endpoint, named, served[owner]))
        return served, deployments

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
