"""Portkey gateway config JSON: `strategy.mode: loadbalance` over weighted `targets`.

Portkey normalises target weights by their sum, so weights are written as fractions of 1 (0.25 for 25%), as in
Portkey's own examples, and read back as percentages. A target entry belongs to a route target when its
`virtual_key` is the target's name or its `override_params.model` is the target's model (and, where targets share
a model, its `custom_host` the target's `base_url`); targets without an entry
get one pointing at the target's OpenAI-compatible `base_url` (`custom_host`). Keys live in Portkey (virtual keys),
never in this file. Other keys (retry, cache, hooks, per-target settings) are kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shadowjudge.gateways.base import GatewayConfigInvalid, GatewayRejected, Weights
from shadowjudge.gateways.files import FileGateway, route_targets

MODE = "loadbalance"


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
        for target in route_targets(self.route):
            entry = owned.get(target.name)
            if entry is None:
                entry = {"provider": "openai", "custom_host": target.base_url,
                         "override_params": {"model": target.model}}
                entries.append(entry)
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
        targets = route_targets(self.route)
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
                    raise GatewayConfigInvalid(
                        f"{where}: holds weight {weight} but is not one target of route '{self.route.name}' "
                        "(match by virtual_key = target name, or override_params.model = target model)")
                others.append(weight)
                continue
            if owners[0] in owned:
                raise GatewayConfigInvalid(f"{where}: a second entry for target '{owners[0]}'")
            owned[owners[0]] = entry
        return owned, others


def _weight(entry: Mapping[str, Any], where: str) -> float:
    value = entry.get("weight", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise GatewayConfigInvalid(f"{where}: 'weight' must be a non-negative number, got {value!r}")
    return float(value)
