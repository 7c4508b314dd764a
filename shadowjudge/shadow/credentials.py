"""API keys for replay targets: resolved at the last moment, and scrubbed from anything that gets written."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from shadowjudge.config import ConfigError, TargetConfig

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_KEY_LIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-]{8,}")


def load_prefect_secret(block_name: str) -> str:
    """The value of a Prefect Secret block (needs a reachable Prefect API or a local ephemeral one)."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except Exception as exc:  # missing block, unreachable API: either way the target cannot authenticate
        raise ConfigError(f"Prefect Secret block '{block_name}' cannot be loaded: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"Prefect Secret block '{block_name}' does not hold a non-empty string")
    return value


def resolve_api_key(target: TargetConfig, load_secret: Callable[[str], str] = load_prefect_secret) -> str:
    """The target's key: from its Prefect Secret block when it names one, else from its env var."""
    if target.api_key_secret:
        return load_secret(target.api_key_secret)
    return target.api_key()


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """Replace every known secret, bearer token and key-shaped string with '***'."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", text)
    return _KEY_LIKE.sub("***", text)
