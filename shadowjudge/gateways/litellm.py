"""LiteLLM proxy config.yaml: the route is a `model_name` with one deployment per target in `model_list`.

LiteLLM's default router (`simple-shuffle`) picks among a model name's deployments in proportion to
`litellm_params.weight`, so a route's weights are those numbers. A deployment belongs to a route target when its
`model_info.id` is `<route>/<target>` (or, as older versions wrote it, the target's name), or failing that when its
`litellm_params.model` names the target's model. Scoping the id by route lets routes share one proxy config even
when their targets share names, since LiteLLM wants deployment ids unique across the file.
Targets without a deployment get one (an OpenAI-compatible `openai/<model>` at the target's `base_url`, with the
key as LiteLLM's `os.environ/<VAR>` reference: the secret itself is never written). Everything else in the file is
kept as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from shadowjudge.config import TargetConfig
from shadowjudge.gateways.base import GatewayConfigInvalid, GatewayRejected, Weights
from shadowjudge.gateways.files import FileGateway, dump_yaml, load_yaml, model_owner, route_targets

WEIGHTED_STRATEGY = "simple-shuffle"


def deployment_owner(route_targets_by_name: Mapping[str, TargetConfig], deployment: Mapping[str, Any],
                     owner_by_model: Any) -> str | None:
    """The route target a LiteLLM deployment serves (by `model_info.id`, else by model)."""
    info = deployment.get("model_info") or {}
    ident = info.get("id") if isinstance(info, Mapping) else None
    if isinstance(ident, str):
        for name in (ident.removeprefix(f"{deployment.get('model_name')}/"), ident):
            if name in route_targets_by_name:
                return name
    params = deployment.get("litellm_params") or {}
    model = params.get("model") if isinstance(params, Mapping) else None
    return owner_by_model(model) if isinstance(model, str) else None


def new_deployment(route_name: str, target: TargetConfig, weight: int) -> dict[str, Any]:
    params: dict[str, Any] = {"model": f"openai/{target.model}", "api_base": target.base_url}
    if target.api_key_env:
        params["api_key"] = f"os.environ/{target.api_key_env}"
    params["weight"] = weight
    return {"model_name": route_name, "litellm_params": params, "model_info": {"id": deployment_id(route_name, target)}}


def deployment_id(route_name: str, target: TargetConfig) -> str:
    return f"{route_name}/{target.name}"


class LiteLLMFileGateway(FileGateway):
    kind = "litellm"

    def parse_weights(self, text: str) -> Weights:
        doc = self._load(text)
        self._check_strategy(doc)
        return {name: _weight(dep, f"{self.path}: deployment '{name}'") for name, dep in self._owned(doc).items()}

    def render_text(self, text: str | None, weights: Mapping[str, int]) -> str:
        doc = self._load(text) if text and text.strip() else CommentedMap()
        self._check_strategy(doc)
        models = doc.setdefault("model_list", CommentedSeq())
        owned = self._owned(doc)
        for target in route_targets(self.route):
            weight = int(weights.get(target.name, 0))
            dep = owned.get(target.name)
            if dep is None:
                fresh = new_deployment(self.route.name, target, weight)
                entry = CommentedMap(model_name=fresh["model_name"])
                entry["litellm_params"] = CommentedMap(fresh["litellm_params"])
                entry["model_info"] = CommentedMap(fresh["model_info"])
                models.append(entry)
            else:
                dep.setdefault("litellm_params", CommentedMap())["weight"] = weight
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
        by_name = {t.name: t for t in route_targets(self.route)}
        owned: dict[str, Any] = {}
        for i, dep in enumerate(doc.get("model_list") or []):
            if not isinstance(dep, dict) or dep.get("model_name") != self.route.name:
                continue
            where = f"{self.path}: model_list[{i}]"
            owner = deployment_owner(by_name, dep, lambda m: model_owner(self.route, m))
            if owner is None:
                if _weight(dep, where):
                    raise GatewayConfigInvalid(
                        f"{where}: a deployment of '{self.route.name}' that is not one of its targets holds weight; "
                        "add it to the route or set its weight to 0")
                continue
            if owner in owned:
                raise GatewayConfigInvalid(f"{where}: a second deployment for target '{owner}'")
            owned[owner] = dep
        return owned


def _weight(deployment: Mapping[str, Any], where: str) -> int:
    params = deployment.get("litellm_params") or {}
    value = params.get("weight", 0) if isinstance(params, Mapping) else 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
        raise GatewayConfigInvalid(f"{where}: litellm_params.weight must be an integer in [0, 100], got {value!r}")
    return value
