"""LiteLLM proxy config.yaml: the route is a `model_name` with one deployment per target in `model_list`.

LiteLLM's default router (`simple-shuffle`) weighs a model name's deployments by `litellm_params.weight` only when
the deployment it looks at first carries one (a deployment without one then counts 0); otherwise it ignores every
weight and picks by `rpm`, `tpm` or uniformly. So the route's weights are read as the shares simple-shuffle gives
the model name's deployments in listed order, every push writes `weight` on each target's deployment, and a
deployment of the route's model name that is not one of its targets must say `weight: 0`: one holding traffic, or
one without a weight (if it came first, every weight would be ignored), is refused until it is added to the route
or given weight 0.

A deployment belongs to a route target when its `model_info.id` is `<route>/<target>` (or, as older versions wrote
it, the target's name), or failing that when its `litellm_params.model` names the target's model. Scoping the id by
route lets routes share one proxy config even when their targets share names, since LiteLLM wants deployment ids
unique across the file. A deployment named by id that points at another model or `api_base` than its target is
pointed at the target (a failed candidate retried with a new model gets its traffic, not the rolled-back one).
Targets without a deployment get one. Either way the target is reached as ShadowJudge measured it: an
OpenAI-compatible `openai/<model>` at its `base_url`, with the key as LiteLLM's `os.environ/<VAR>` reference (the
secret itself is never written; a target without `api_key_env` keeps the key its deployment has). Everything else
in the file is kept as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from shadowjudge.config import RouteConfig, TargetConfig
from shadowjudge.gateways.base import GatewayConfigInvalid, GatewayRejected, Weights
from shadowjudge.gateways.files import FileGateway, dump_yaml, load_yaml, model_owner, names_model

WEIGHTED_STRATEGY = "simple-shuffle"
SHUFFLE_KEYS = ("weight", "rpm", "tpm")  # simple-shuffle weighs by the first of these its first deployment sets


def id_owner(targets_by_name: Mapping[str, TargetConfig], deployment: Mapping[str, Any]) -> str | None:
    """The route target a deployment's `model_info.id` names (`<route>/<target>`, or the bare target name)."""
    info = deployment.get("model_info") or {}
    ident = info.get("id") if isinstance(info, Mapping) else None
    if isinstance(ident, str):
        for name in (ident.removeprefix(f"{deployment.get('model_name')}/"), ident):
            if name in targets_by_name:
                return name
    return None


def deployment_owner(route: RouteConfig, deployment: Mapping[str, Any]) -> str | None:
    """The route target a LiteLLM deployment serves (by `model_info.id`, else by model)."""
    owner = id_owner({t.name: t for t in route.targets}, deployment)
    if owner is not None:
        return owner
    params = deployment.get("litellm_params") or {}
    model = params.get("model") if isinstance(params, Mapping) else None
    return model_owner(route, model) if isinstance(model, str) else None


def target_params(target: TargetConfig) -> dict[str, Any]:
    """Where a target's traffic goes: the endpoint ShadowJudge measured, the key only as a reference."""
    params: dict[str, Any] = {"model": f"openai/{target.model}", "api_base": target.base_url}
    if target.api_key_env:
        params["api_key"] = f"os.environ/{target.api_key_env}"
    return params


def new_deployment(route_name: str, target: TargetConfig, weight: int) -> dict[str, Any]:
    return {"model_name": route_name, "litellm_params": {**target_params(target), "weight": weight},
            "model_info": {"id": deployment_id(route_name, target)}}


def repointed_params(params: Mapping[str, Any], target: TargetConfig) -> dict[str, Any]:
    """What a deployment named for `target` must change to send traffic where the target now is ({} if it does):
    a target retried with a new model or endpoint must not ramp up on the revision that was rolled back."""
    model = params.get("model")
    if isinstance(model, str) and names_model(model, target.model) and params.get("api_base") == target.base_url:
        return {}
    return target_params(target)


def deployment_id(route_name: str, target: TargetConfig) -> str:
    return f"{route_name}/{target.name}"


def owned_deployments(route: RouteConfig, model_list: Sequence[Any], where: str) -> dict[str, Any]:
    """Route target name -> its deployment in `model_list`. Refuses a second deployment for one target, and a
    deployment of the route that is no target unless it says weight 0 (see the module docstring)."""
    owned: dict[str, Any] = {}
    for i, dep in enumerate(model_list):
        if not isinstance(dep, dict) or dep.get("model_name") != route.name:
            continue
        here = f"{where}[{i}]"
        weight = deployment_weight(dep, here)
        owner = deployment_owner(route, dep)
        if owner is None:
            if weight is None:
                raise GatewayConfigInvalid(
                    f"{here}: a deployment of '{route.name}' that is not one of its targets has no weight, and "
                    "LiteLLM ignores every weight of a model name when the deployment it tries first has none; "
                    "add it to the route or set its weight to 0")
            if weight:
                raise GatewayConfigInvalid(
                    f"{here}: a deployment of '{route.name}' that is not one of its targets holds weight; "
                    "add it to the route or set its weight to 0")
            continue
        if owner in owned:
            raise GatewayConfigInvalid(f"{here}: a second deployment for target '{owner}'")
        owned[owner] = dep
    return owned


def served_weights(route_name: str, model_list: Sequence[Any], owned: Mapping[str, Any], where: str) -> Weights:
    """The percentage of the route's requests simple-shuffle sends to each owned deployment (all healthy)."""
    deployments = [d for d in model_list if isinstance(d, dict) and d.get("model_name") == route_name]
    if not deployments:
        return {}
    first = _params(deployments[0])
    key = next((k for k in SHUFFLE_KEYS if first.get(k) is not None), None)
    shares = {id(d): 1.0 if key is None else _share(_params(d).get(key), f"{where}: litellm_params.{key}")
              for d in deployments}
    total = sum(shares.values())
    return {name: round(100 * shares[id(dep)] / total) if total else 0 for name, dep in owned.items()}


def deployment_weight(deployment: Mapping[str, Any], where: str) -> float | None:
    """`litellm_params.weight` (None when missing); any non-negative number, since LiteLLM normalises by the sum."""
    value = _params(deployment).get("weight")
    return None if value is None else _share(value, f"{where}: litellm_params.weight")


def _params(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    params = deployment.get("litellm_params")
    return params if isinstance(params, Mapping) else {}


def _share(value: Any, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise GatewayConfigInvalid(f"{where} must be a non-negative number, got {value!r}")
    return float(value)


class LiteLLMFileGateway(FileGateway):
    kind = "litellm"

    def parse_weights(self, text: str) -> Weights:
        doc = self._load(text)
        self._check_strategy(doc)
        models = doc.get("model_list") or []
        return served_weights(self.route.name, models, self._owned(doc), f"{self.path}: model_list")

    def render_text(self, text: str | None, weights: Mapping[str, int]) -> str:
        doc = self._load(text) if text and text.strip() else CommentedMap()
        self._check_strategy(doc)
        models = doc.setdefault("model_list", CommentedSeq())
        owned = self._owned(doc)
        by_name = {t.name: t for t in self.route.targets}
        for target in self.route.targets:
            weight = int(weights.get(target.name, 0))
            dep = owned.get(target.name)
            if dep is None:
                fresh = new_deployment(self.route.name, target, weight)
                entry = CommentedMap(model_name=fresh["model_name"])
                entry["litellm_params"] = CommentedMap(fresh["litellm_params"])
                entry["model_info"] = CommentedMap(fresh["model_info"])
                models.append(entry)
                continue
            params = dep.setdefault("litellm_params", CommentedMap())
            if id_owner(by_name, dep) is not None:
                params.update(repointed_params(params, target))
            params["weight"] = weight
        return dump_yaml(doc)

    def check_rendered(self, text: str) -> None:
        doc = self._load(text)
        ids = []
        for i, dep in enumerate(doc.get("model_list") or []):
            where = f"{self.path}: model_list[{i}]"
            if not isinstance(dep, dict) or not dep.get("model_name"):
                raise GatewayRejected(f"{where}: needs 'model_name'")
            params = dep.get("litellm_params")
            if not isinstance(params, dict) or not params.get("model"):
                raise GatewayRejected(f"{where}: needs 'litellm_params.model'")
            info = dep.get("model_info") or {}
            if isinstance(info, dict) and info.get("id") is not None:
                ids.append(info["id"])
        if len(ids) != len(set(ids)):
            raise GatewayRejected(f"{self.path}: model_info.id values must be unique, got {ids}")

    # -- helpers -----------------------------------------------------------------------------------------------
    def _load(self, text: str) -> Any:
        doc = load_yaml(text, str(self.path))
        if doc is None:
            return CommentedMap()
        if not isinstance(doc, dict):
            raise GatewayConfigInvalid(f"{self.path}: the top level must be a mapping, got {type(doc).__name__}")
        if not isinstance(doc.get("model_list", []), list):
            raise GatewayConfigInvalid(f"{self.path}: 'model_list' must be a list")
        return doc

    def _check_strategy(self, doc: Any) -> None:
        settings = doc.get("router_settings") or {}
        strategy = settings.get("routing_strategy") if isinstance(settings, dict) else None
        if strategy not in (None, WEIGHTED_STRATEGY):
            raise GatewayConfigInvalid(
                f"{self.path}: router_settings.routing_strategy is '{strategy}'; deployment weights only apply with "
                f"'{WEIGHTED_STRATEGY}'")

    def _owned(self, doc: Any) -> dict[str, Any]:
        return owned_deployments(self.route, doc.get("model_list") or [], f"{self.path}: model_list")
