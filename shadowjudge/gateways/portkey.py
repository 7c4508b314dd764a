"""Portkey gateway config JSON: `strategy.mode: loadbalance` over weighted `targets`.

Portkey normalises target weights by their sum, counting a target without `weight` as 1, so weights are written
as fractions of 1 (0.25 for 25%), as in Portkey's own examples, and read back as percentages of that sum; an entry
that is no route target must say `weight: 0`, or the file is refused (its traffic would be missing from the sum).
A target entry belongs to a route target when its `virtual_key` is the target's name or its `override_params.model`
is the target's model (and, where targets share a model, its `custom_host` the target's `base_url`). An entry named
by `virtual_key` whose `override_params.model` or `custom_host` differ from the target's is pointed at the target
(a failed candidate retried with a new model gets its traffic, not the rolled-back one).

Keys are never written here: a Portkey config cannot reference an env var, and the secret itself must not land in
the file. An entry that needs a key gets it from Portkey, through its `virtual_key`, so the user writes the entry
for a target that has a key (`api_key_env` or `api_key_secret`); ShadowJudge adds entries only for keyless targets
(`{provider: openai, custom_host: <base_url>, override_params: {model}}`), and refuses to add one that would send
traffic unauthenticated. Other keys (retry, cache, hooks, per-target settings) are kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shadowjudge.config import TargetConfig
from shadowjudge.gateways.base import GatewayConfigInvalid, GatewayRejected, Weights
from shadowjudge.gateways.files import FileGateway

MODE = "loadbalance"
MISSING_WEIGHT = 1  # what Portkey's selectProviderByWeight counts a target without `weight` as


class PortkeyGateway(FileGateway):
    kind = "portkey"

    def parse_weights(self, text: str) -> Weights:
        doc = self._load(text)
        if not doc:
            return {}
        owned, others = self._owned(doc)
        raw = {name: _weight(entry, f"{self.path}: target '{name}'") for name, entry in owned.items()}
        total = sum(raw.values()) + sum(others)
        if total <= 0:
            return {name: 0 for name in raw}
        # Exact for what we write (hundredths); a hand-written file may not sum to 100, which reads as drift.
        return {name: round(w * 100 / total) for name, w in raw.items()}

    def render_text(self, text: str | None, weights: Mapping[str, int]) -> str:
        doc = self._load(text) if text and text.strip() else {}
        doc.setdefault("strategy", {"mode": MODE})
        entries = doc.setdefault("targets", [])
        owned, _ = self._owned(doc)
        for target in self.route.targets:
            entry = owned.get(target.name)
            if entry is None:
                entry = self._new_entry(target)
                entries.append(entry)
            elif entry.get("virtual_key") == target.name:
                _repoint(entry, target)
            entry["weight"] = round(int(weights.get(target.name, 0)) / 100, 2)
        return json.dumps(doc, indent=2) + "\n"

    def check_rendered(self, text: str) -> None:
        doc = self._load(text)
        entries = doc.get("targets") or []
        if not entries:
            raise GatewayRejected(f"{self.path}: 'targets' must not be empty")
        if not any(_weight(e, f"{self.path}: targets") > 0 for e in entries):
            raise GatewayRejected(f"{self.path}: at least one target needs a positive weight")

    # -- helpers -----------------------------------------------------------------------------------------------
    def _new_entry(self, target: TargetConfig) -> dict[str, Any]:
        """An entry for a keyless target; one with a key is refused, since the entry would reach it without one."""
        if target.api_key_env or target.api_key_secret:
            raise GatewayRejected(
                f"{self.path}: no entry for target '{target.name}', which needs a key; ShadowJudge never writes keys "
                f"into a Portkey config, so add its entry with the key's virtual_key and override_params.model "
                f"'{target.model}' (weight 0)")
        return {"provider": "openai", "custom_host": target.base_url, "override_params": {"model": target.model}}

    def _load(self, text: str | None) -> dict[str, Any]:
        if not text or not text.strip():
            return {}
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GatewayConfigInvalid(f"{self.path}: not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise GatewayConfigInvalid(f"{self.path}: the top level must be an object")
        mode = (doc.get("strategy") or {}).get("mode") if isinstance(doc.get("strategy"), dict) else None
        if doc.get("strategy") is not None and mode != MODE:
            raise GatewayConfigInvalid(f"{self.path}: strategy.mode is '{mode}'; route weights need '{MODE}'")
        if not isinstance(doc.get("targets", []), list):
            raise GatewayConfigInvalid(f"{self.path}: 'targets' must be a list")
        return doc

    def _owned(self, doc: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[float]]:
        targets = self.route.targets
        owned: dict[str, dict[str, Any]] = {}
        others: list[float] = []
        for i, entry in enumerate(doc.get("targets") or []):
            where = f"{self.path}: targets[{i}]"
            if not isinstance(entry, dict):
                raise GatewayConfigInvalid(f"{where}: must be an object")
            model = (entry.get("override_params") or {}).get("model")
            owners = [t.name for t in targets if entry.get("virtual_key") == t.name]
            if not owners:
                same_model = [t for t in targets if model is not None and model == t.model]
                if len(same_model) > 1:  # one model behind several endpoints: the host tells them apart
                    same_model = [t for t in same_model if entry.get("custom_host") == t.base_url]
                owners = [t.name for t in same_model]
            if len(owners) != 1:
                weight = _weight(entry, where)
                if weight:
                    missing = "" if "weight" in entry else f" (no 'weight', which Portkey counts as {MISSING_WEIGHT})"
                    raise GatewayConfigInvalid(
                        f"{where}: holds weight {weight:g}{missing} but is not one target of route '{self.route.name}' "
                        "(match by virtual_key = target name, or override_params.model = target model); "
                        "add it to the route or set its weight to 0")
                others.append(weight)
                continue
            if owners[0] in owned:
                raise GatewayConfigInvalid(f"{where}: a second entry for target '{owners[0]}'")
            owned[owners[0]] = entry
        return owned, others


def _repoint(entry: dict[str, Any], target: TargetConfig) -> None:
    """Point an entry named for `target` at the target's model and host where it names others, so a target retried
    with a new model or endpoint does not ramp up on the revision that was rolled back."""
    overrides = entry.get("override_params")
    if isinstance(overrides, dict) and overrides.get("model") not in (None, target.model):
        overrides["model"] = target.model
    if entry.get("custom_host") not in (None, target.base_url):
        entry["custom_host"] = target.base_url


def _weight(entry: Mapping[str, Any], where: str) -> float:
    value = entry.get("weight", MISSING_WEIGHT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise GatewayConfigInvalid(f"{where}: 'weight' must be a non-negative number, got {value!r}")
    return float(value)
