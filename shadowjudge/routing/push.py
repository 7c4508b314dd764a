"""Safe push: read, render, validate, push, read back; and restore the previous config if anything disagrees.

Nothing is written unless the rendering validates; once written, the gateway must report exactly the pushed
weights, or the document read first is pushed back. Either way the caller learns what the gateway holds.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shadowjudge.gateways.base import Gateway, GatewayError, GatewayReadBackMismatch, GatewaySnapshot, Weights


@dataclass(frozen=True)
class PushResult:
    ok: bool
    gateway_before: Weights | None
    observed: Weights | None = None
    error: str | None = None
    restored: bool = False


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def push_weights(gateway: Gateway, weights: Mapping[str, int]) -> PushResult:
    """Apply `weights` to the gateway. Never raises for gateway faults: the result says what happened."""
    wanted = dict(weights)
    # Broad catches on purpose: whatever an adapter raises, nothing is half-applied and the caller can record it.
    try:
        current = gateway.read_current()
    except Exception as exc:  # noqa: BLE001
        return PushResult(False, None, error=describe_error(exc))
    try:
        rendered = gateway.render(current, wanted)
        gateway.validate(rendered, wanted)
    except Exception as exc:  # noqa: BLE001 - nothing has been written
        return PushResult(False, current.weights, error=describe_error(exc))
    try:
        gateway.push(rendered)
        observed = gateway.read_back()
        if observed != wanted:
            raise GatewayReadBackMismatch(f"{gateway.name}: pushed {wanted} but the gateway reports {observed}")
    except Exception as exc:  # noqa: BLE001 - the previous config must be put back
        return PushResult(False, current.weights, error=describe_error(exc), restored=_restore(gateway, current))
    return PushResult(True, current.weights, observed=observed)


def _restore(gateway: Gateway, snapshot: GatewaySnapshot) -> bool:
    try:
        gateway.push(snapshot.document)
        return gateway.read_back() == snapshot.weights
    except Exception:  # noqa: BLE001 - reported as restored=False; the next cycle reconciles
        return False


@dataclass(frozen=True)
class PushPreview:
    gateway_before: Weights | None
    config_diff: str | None
    error: str | None = None


def preview_push(gateway: Gateway, weights: Mapping[str, int]) -> PushPreview:
    """What a push would write, validated, without writing it (for --dry-run)."""
    try:
        current = gateway.read_current()
        rendered = gateway.render(current, dict(weights))
        gateway.validate(rendered, dict(weights))
    except GatewayError as exc:
        return PushPreview(None, None, describe_error(exc))
    return PushPreview(current.weights, document_diff(current.document, rendered, gateway.name))


def document_diff(before: Any, after: Any, name: str) -> str:
    a, b = _as_text(before), _as_text(after)
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                 fromfile=f"{name} (now)", tofile=f"{name} (after push)")
    return "".join(lines)


def _as_text(document: Any) -> str:
    if document is None:
        return ""
    if isinstance(document, str):
        return document
    return json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
