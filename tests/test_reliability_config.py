"""Every field of the config, given a value of the wrong type, is refused with a message that names it.

The fields are walked from the pydantic model itself, so a field added later is covered without editing this file.
Each bad config is written to a YAML file and loaded as the CLI loads it.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from shadowjudge.config import Config, ConfigError, load_config
from shadowjudge.demo import demo_config

Path_ = tuple[str | int, ...]


def full_config() -> dict[str, Any]:
    """The demo config with every optional section filled in, so the walk reaches every nested field."""
    data = demo_config(Path("/tmp/sj-config-test"), "http://127.0.0.1:9/v1")
    data["judge"] = {"evaluator": "lexical", "teacher": {"name": "teacher", "model": "gpt-4o", "base_url":
                                                         "http://127.0.0.1:9/v1", "api_key_env": "TEACHER_KEY"}}
    data["alerts"] = {"sinks": [{"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/hook"}]}
    data["redaction"] = {"extra_patterns": {"ticket": r"TICKET-\d+"}}
    data["routes"][0]["gateway"]["reload_command"] = ["true"]
    return data


def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of a union (None dropped), or the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return alt
    return None


def wrong_value(annotation: Any) -> Any:
    """A value of a type the field cannot take: a number for a section, a list for a mapping, else a mapping."""
    alternatives = _unwrap(annotation)
    if _model_of(annotation) is not None:
        return 42
    if any(typing.get_origin(a) is dict or a is dict for a in alternatives):
        return [1, 2]
    return {"unexpected": ["value"]}


def field_paths(model: type[BaseModel], data: dict[str, Any],
                prefix: Path_ = ()) -> list[tuple[Path_, Any, bool]]:
    """(path, annotation, required) of every field under `model`, into sections, list items and mapping values."""
    out = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        out.append((path, info.annotation, info.is_required()))
        value = data.get(name)
        sub = _model_of(info.annotation)
        origin = typing.get_origin(_unwrap(info.annotation)[0])
        if sub is not None:
            out += field_paths(sub, value if isinstance(value, dict) else {}, path)
        elif origin is list and isinstance(value, list) and value:
            item = _model_of(typing.get_args(_unwrap(info.annotation)[0])[0])
            if item is not None:
                out += field_paths(item, value[0], (*path, 0))
        elif origin is dict and isinstance(value, dict) and value:
            item = _model_of(typing.get_args(_unwrap(info.annotation)[0])[1])
            if item is not None:
                key = next(iter(value))
                out += field_paths(item, value[key], (*path, key))
    return out


def location(path: Path_) -> str:
    """As the config error prints it: `routes[0].candidates[0].rpm`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def set_path(data: dict[str, Any], path: Path_, value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        if isinstance(node, dict) and part not in node:
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def drop_path(data: dict[str, Any], path: Path_) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


FULL = full_config()
FIELDS = field_paths(Config, FULL)
REQUIRED = [path for path, _, required in FIELDS if required]


def test_the_walk_reaches_nested_sections_list_items_and_mapping_values():
    locations = {location(p) for p, _, _ in FIELDS}
    for expected in ("store.url", "routes[0].candidates[0].rpm", "routes[0].policy.steps", "judge.teacher.tpm",
                     "pricing.claude-instant-1.2.input_per_mtok", "alerts.sinks[0].timeout_s", "drift.alpha",
                     "routes[0].criteria.weights", "orchestration.score_batches", "sources[0].mapping"):
        assert expected in locations
    assert len(FIELDS) > 120
    assert load_config_from(FULL)  # the base itself is valid


def load_config_from(data: dict[str, Any], tmp: Path | None = None) -> Config:
    import tempfile

    folder = Path(tmp or tempfile.mkdtemp(prefix="sj-config-"))
    path = folder / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ={})


@pytest.mark.parametrize("path,annotation", [f[:2] for f in FIELDS], ids=[location(f[0]) for f in FIELDS])
def test_a_wrong_type_in_any_field_is_refused_and_named(tmp_path, path, annotation):
    data = copy.deepcopy(FULL)
    set_path(data, path, wrong_value(annotation))
    with pytest.raises(ConfigError) as err:
        load_config_from(data, tmp_path)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "shadowjudge.yaml")) and "invalid config" in message
    assert f"  {location(path)}" in message, message  # the offending field, as the user wrote it
    assert "Traceback" not in message


@pytest.mark.parametrize("path", REQUIRED, ids=[location(p) for p in REQUIRED])
def test_a_missing_required_field_is_named(tmp_path, path):
    data = copy.deepcopy(FULL)
    drop_path(data, path)
    with pytest.raises(ConfigError) as err:
        load_config_from(data, tmp_path)
    assert f"  {location(path)}: Field required" in str(err.value)


def test_a_wrong_type_from_an_env_override_is_named(tmp_path):
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(FULL))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"SHADOWJUDGE__ROUTES__0__CANDIDATES__1__CONCURRENCY": "many"})
    assert "routes[0].candidates[1].concurrency" in str(err.value)
