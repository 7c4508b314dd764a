"""The demo's config pointed at a test's store and replay server, with the model-free `lexical` judge (no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shadowjudge.demo import demo_config


def cycle_config(tmp: Path, store_url: str, base_url: str, *, max_samples: int = 40, **sections: Any) -> dict:
    """The config as a dict; `sections` replace top-level keys."""
    data = demo_config(tmp, base_url)
    data["store"]["url"] = store_url
    data["judge"] = {"evaluator": "lexical"}
    data["shadow"]["max_samples"] = max_samples
    data.update(sections)
    return data


def save_config(tmp: Path, data: dict) -> Path:
    """Written to a new file in `tmp` each time: a test may hold several configs at once."""
    path = tmp / f"shadowjudge-{len(list(tmp.glob('shadowjudge*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_cycle_config(tmp: Path, store_url: str, base_url: str, **kwargs: Any) -> str:
    return str(save_config(tmp, cycle_config(tmp, store_url, base_url, **kwargs)))
