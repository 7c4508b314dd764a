"""TrueFoundry AI Gateway routing YAML: weight-based routing over `load_balance_targets`.

Two documented shapes hold the same routing block, and both are accepted:

- the gateway routing config (`type: gateway-load-balancing-config`, a list of `rules`): the route's block is the
  rule whose `id` is the route name; a file without one gets one, matching requests for the model named like the
  route (`when.models: [<route>]`). TrueFoundry applies the first rule whose `when` matches, so the new rule goes
  before the first rule that lists the route's model, and a push is refused while an earlier rule takes every
  request for one of the route rule's models (one with no `subjects` or `metadata` condition);
- a virtual-model group (`integrations`: virtual models with a `routing_config`): the route's block is the
  `routing_config` of the virtual model named like the route.

Each target entry is `{target: <model id>, weight: <0..100>}` plus whatever else the user wrote there
(`metadata_match`, `retry_config`, `override_params`, `fallback_*`, sticky routing): only `weight` (and, as below,
`target`) is touched, and comments, key order and other rules survive. A block, list or entry the route shares with
other rules through a YAML anchor (`&pool` ... `*pool`) or a merge key is copied into the route's rule first, so
the push changes the route's rule only and the others keep what they had; only what is shared is copied, and a merge
key inside the copy or in the route's own entries (`- <<: *retry`) stays one, so the entry keeps following the
shared defaults. An entry belongs to a route target when it
names the target's `name` or its `model` (TrueFoundry ids look like `provider-account/model`); one that names the
target's `name` is pointed at its `model`, so a target retried with a new model does not ramp up on the one that
was rolled back. An entry for a model the route does not know must hold weight 0, or the file is refused: its
traffic would silently disappear from the sum.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from copy import deepcopy
from typing import Any

from ruamel.yaml.comments import Comment, CommentedMap, CommentedSeq, Format, LineCol, Tag, merge_attrib
from ruamel.yaml.mergevalue import MergeValue

from shadowjudge.gateways.base import GatewayConfigInvalid, GatewayRejected, Weights
from shadowjudge.gateways.files import FileGateway, dump_yaml, load_yaml, model_owner, names_model

CONFIG_TYPE = "gateway-load-balancing-config"
WEIGHT_BASED = "weight-based-routing"


class TrueFoundryGateway(FileGateway):
    kind = "truefoundry"

    def parse_weights(self, text: str) -> Weights:
        doc = self._load(text)
        block = self._routing_block(doc)
        if block is None:
            return {}
        return self._weights_of(block)

    def render_text(self, text: str | None, weights: Mapping[str, int]) -> str:
        doc = self._load(text) if text and text.strip() else _new_document()
        block = self._routing_block(doc)
        shared = _shared_nodes(doc)
        if block is None:
            block = self._add_rule(doc)
        elif id(block) in shared:
            block = self._detach(doc, block)
        block.setdefault("type", WEIGHT_BASED)
        self._own_entries(block, shared)
        entries = block["load_balance_targets"]
        owned = self._owned_entries(block)
        for target in self.route.targets:
            entry = owned.get(target.name)
            if entry is None:
                entry = CommentedMap(target=target.model)
                entries.append(entry)
            elif not names_model(entry["target"], target.model):  # named by the target's name
                entry["target"] = target.model
            entry["weight"] = int(weights.get(target.name, 0))
        return dump_yaml(doc)

    def check_rendered(self, text: str) -> None:
        doc = self._load(text)
        if "rules" in doc:
            if doc.get("type") != CONFIG_TYPE:
                raise GatewayRejected(f"{self.path}: top-level 'type' must be '{CONFIG_TYPE}'")
            if not doc.get("name"):
                raise GatewayRejected(f"{self.path}: top-level 'name' is required")
            ids = [r.get("id") for r in doc["rules"] if isinstance(r, dict)]
            if len(ids) != len(doc["rules"]) or None in ids or len(set(ids)) != len(ids):
                raise GatewayRejected(f"{self.path}: every rule needs a unique 'id', got {ids}")
            block = self._routing_block(doc)
            models = _when_models(block or {})
            if not models:
                raise GatewayRejected(f"{self.path}: rule '{self.route.name}' needs 'when.models'")
            shadowing = _shadowing_rule(doc["rules"], block, models)
            if shadowing is not None:
                raise GatewayRejected(
                    f"{self.path}: rule '{shadowing}' comes before rule '{self.route.name}' and takes every request "
                    f"for a model of it ({models}); TrueFoundry applies the first rule that matches, so these weights "
                    f"would never apply: move rule '{self.route.name}' above it or narrow its 'when'")

    # -- document navigation -----------------------------------------------------------------------------------
    def _load(self, text: str) -> Any:
        doc = load_yaml(text, str(self.path))
        if doc is None:
            return _new_document()
        if not isinstance(doc, dict):
            raise GatewayConfigInvalid(f"{self.path}: the top level must be a mapping, got {type(doc).__name__}")
        return doc

    def _routing_block(self, doc: Any) -> Any | None:
        """The mapping that holds this route's `load_balance_targets`, or None if the file has none yet."""
        found = []
        for i, rule in enumerate(_as_list(doc.get("rules"), f"{self.path}: 'rules'")):
            if isinstance(rule, dict) and rule.get("id") == self.route.name:
                found.append((f"rules[{i}]", rule))
        for i, model in enumerate(_as_list(doc.get("integrations"), f"{self.path}: 'integrations'")):
            if isinstance(model, dict) and model.get("name") == self.route.name:
                config = model.get("routing_config")
                if not isinstance(config, dict):
                    raise GatewayConfigInvalid(
                        f"{self.path}: integrations[{i}] '{self.route.name}' has no 'routing_config'")
                found.append((f"integrations[{i}].routing_config", config))
        if len(found) > 1:
            raise GatewayConfigInvalid(
                f"{self.path}: route '{self.route.name}' is defined more than once: {[w for w, _ in found]}")
        if not found:
            return None
        where, block = found[0]
        kind = block.get("type", WEIGHT_BASED)
        if kind != WEIGHT_BASED:
            raise GatewayConfigInvalid(
                f"{self.path}: {where} routes '{self.route.name}' with '{kind}'; route weights need '{WEIGHT_BASED}'")
        return block

    def _own_entries(self, block: Any, shared: set[int]) -> None:
        """Makes the `load_balance_targets` list of `block`, and each entry of it, the route's own where another
        part of the file shares it (`shared`: see `_shared_nodes`) or it comes through a merge key: the weights are
        this route's only. What is not shared stays as written, anchors and merge keys included."""
        key = "load_balance_targets"
        entries = block.get(key, CommentedSeq())
        if entries is None:
            raise GatewayConfigInvalid(f"{self.path}: rule '{self.route.name}' has an empty '{key}' "
                                       "(null): make it a list, [] or its targets")
        if id(entries) in shared or key not in _own_keys(block):
            block[key] = _private_copy(entries)
            return
        for i, entry in enumerate(_as_list(entries, f"{self.path}: rule '{self.route.name}' {key}")):
            if id(entry) in shared:
                entries[i] = _private_copy(entry)

    def _detach(self, doc: Any, block: Any) -> Any:
        """A private copy of the route's `block`, put in its place: an alias elsewhere (another virtual model's
        `routing_config: *shared`) or a merge key (`<<: *chat_rule`) refers to the same mapping, and would change
        with it."""
        private = _private_copy(block)
        rules = _as_list(doc.get("rules"), f"{self.path}: 'rules'")
        for i, rule in enumerate(rules):
            if rule is block:
                rules[i] = private
        for model in _as_list(doc.get("integrations"), f"{self.path}: 'integrations'"):
            if isinstance(model, dict) and model.get("name") == self.route.name:
                if model.get("routing_config") is block:
                    model["routing_config"] = private
        return private

    def _add_rule(self, doc: Any) -> Any:
        if "integrations" in doc and "rules" not in doc:
            raise GatewayConfigInvalid(
                f"{self.path}: no virtual model named '{self.route.name}' in this group; "
                "create it (weight-based) first")
        rules = doc.setdefault("rules", CommentedSeq())
        rule = CommentedMap(id=self.route.name, type=WEIGHT_BASED)
        rule["when"] = CommentedMap(models=CommentedSeq([self.route.name]))
        rule["load_balance_targets"] = CommentedSeq()
        # TrueFoundry applies the first matching rule: after a rule for the same model, ours would never apply.
        first_match = next((i for i, r in enumerate(_as_list(rules, f"{self.path}: 'rules'"))
                            if self.route.name in _when_models(r)), len(rules))
        rules.insert(first_match, rule)
        return rule

    def _owned_entries(self, block: Any) -> dict[str, Any]:
        """Route target name -> its entry; refuses duplicates and unknown models that carry weight."""
        where_list = f"{self.path}: rule '{self.route.name}' load_balance_targets"
        entries = _as_list(block.get("load_balance_targets"), where_list)
        owned: dict[str, Any] = {}
        for i, entry in enumerate(entries):
            where = f"{self.path}: rule '{self.route.name}' load_balance_targets[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("target"), str):
                raise GatewayConfigInvalid(f"{where}: needs a 'target' string")
            weight = entry.get("weight", 0)
            if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
                raise GatewayConfigInvalid(f"{where}: 'weight' must be an integer in [0, 100], got {weight!r}")
            owner = model_owner(self.route, entry["target"])
            if owner is None:
                if weight:
                    raise GatewayConfigInvalid(
                        f"{where}: '{entry['target']}' holds weight {weight} but is not a target of route "
                        f"'{self.route.name}'; add it to the route or set its weight to 0")
                continue
            if owner in owned:
                raise GatewayConfigInvalid(f"{where}: a second entry for target '{owner}'")
            owned[owner] = entry
        return owned

    def _weights_of(self, block: Any) -> Weights:
        return {name: int(entry.get("weight", 0)) for name, entry in self._owned_entries(block).items()}


def _new_document() -> CommentedMap:
    doc = CommentedMap(name="shadowjudge-routing", type=CONFIG_TYPE)
    doc["rules"] = CommentedSeq()
    return doc


def _shared_nodes(doc: Any) -> set[int]:
    """The ids of the mappings and lists the document reaches more than once: through an alias (`*pool`), or as a
    merge key's source and through every mapping that merges it (`<<: *defaults` reaches the defaults and each
    value in them again). Changing one of these in place changes what other rules read."""
    seen: Counter[int] = Counter()
    pending = [doc]
    while pending:
        node = pending.pop()
        if not isinstance(node, (dict, list)):
            continue
        seen[id(node)] += 1
        if seen[id(node)] > 1:
            continue
        if isinstance(node, dict):
            pending.extend(node.values())  # a CommentedMap's values include the merged ones
            pending.extend(getattr(node, merge_attrib, None) or [])
        else:
            pending.extend(node)
    return {node_id for node_id, count in seen.items() if count > 1}


def _own_keys(node: Any) -> set[Any]:
    """The keys a mapping spells out itself, not those it takes from a merge key."""
    return {k for k, _ in node.non_merged_items()} if isinstance(node, CommentedMap) else set(node)


def _private_copy(node: Any) -> Any:
    """A copy of `node` whose mappings and lists are new, with their comments and layout and without anchors (the
    originals, still referenced by their aliases, keep their names, and a copy must not define one a second time).
    A merge key in the copy still refers to the shared mapping it merges (`<<: *retry` stays `<<: *retry`); a
    deep copy would write the merged keys out and stop following them. Scalars are immutable and shared as is."""
    if isinstance(node, CommentedMap):
        copy = CommentedMap()
        for key, value in node.non_merged_items():
            copy[key] = _private_copy(value)
        _copy_layout(node, copy)
        merged = getattr(node, merge_attrib, None)
        if merged:
            merge = MergeValue()
            merge.extend(merged.value)
            merge.merge_pos = merged.merge_pos
            if merged.sequence is not None:
                merge.set_sequence(merged.sequence)
            copy.add_yaml_merge(merge)
        return copy
    if isinstance(node, CommentedSeq):
        copy = CommentedSeq(_private_copy(item) for item in node)
        _copy_layout(node, copy)
        return copy
    if isinstance(node, dict):
        return {key: _private_copy(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_private_copy(item) for item in node]
    return node


def _copy_layout(node: Any, copy: Any) -> None:
    """Comments, flow or block style, positions and tag of `node` onto `copy` (not its anchor, not its merge)."""
    for attrib in (Comment.attrib, Format.attrib, LineCol.attrib, Tag.attrib):
        if hasattr(node, attrib):
            setattr(copy, attrib, deepcopy(getattr(node, attrib)))


def _shadowing_rule(rules: list[Any], block: Any, models: list[str]) -> str | None:
    """The id of a rule before `block` that matches every request for one of `models` (it has no other condition),
    so TrueFoundry, which applies the first matching rule, never reaches `block` for that model."""
    for rule in rules:
        if rule is block:
            return None
        when = rule.get("when") if isinstance(rule, dict) else None
        unconditional = isinstance(when, dict) and not (when.get("subjects") or when.get("metadata"))
        if unconditional and set(_when_models(rule)) & set(models):
            return str(rule.get("id"))
    return None


def _when_models(rule: Any) -> list[str]:
    """The models a rule's `when` lists ([] when it lists none or has an odd shape)."""
    when = rule.get("when") if isinstance(rule, dict) else None
    models = when.get("models") if isinstance(when, dict) else None
    return [m for m in models if isinstance(m, str)] if isinstance(models, list) else []


def _as_list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise GatewayConfigInvalid(f"{where} must be a list, got {type(value).__name__}")
    return value
