"""Safe push: read, render, validate, push, read back; and restore the previous config if anything disagrees.

Nothing is written unless the rendering validates; once written, the gateway must report exactly the pushed
weights, or the document read first is pushed back, with one exception: what a rollback took away is never given
back. A gateway without transactions (the LiteLLM admin API) applies a push's decreases first, so a rollback that
failed part-way has already taken traffic from the failing candidate, and the snapshot would hand it its weight
again; what landed stays, and the rollback is retried next cycle. Either way the caller learns what the gateway
holds (read back after a failure), so the step records that instead of the weights it meant to leave in force.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shadowjudge.gateways.base import Gateway, GatewayError, GatewayReadBackMismatch, GatewaySnapshot, Weights
from shadowjudge.routing.weights import format_weights


@dataclass(frozen=True)
class PushResult:
    """`gateway_before`: what the gateway held before the push; `observed`: what it holds after, read back (None:
    not known); `written`: the push reached the gateway (a failure before that changed nothing)."""

    ok: bool
    gateway_before: Weights | None
    observed: Weights | None = None
    error: str | None = None
    restored: bool = False
    written: bool = False

    @property
    def changed(self) -> bool:
        """A failed push left the gateway other than it was (or unknown): it was written and not restored."""
        return self.written and not self.restored and self.observed != self.gateway_before

    @property
    def in_force(self) -> str:
        """What a failed push left in force, in the words of the step's reason."""
        if self.restored:
            return "previous config restored"
        if not self.changed:
            return "previous config kept"
        if self.observed is None:
            return "gateway left in an unknown state: it could not be read back"
        return f"gateway left partly updated: holds {format_weights(self.observed)}"


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def push_weights(gateway: Gateway, weights: Mapping[str, int], *, rollback: bool = False) -> PushResult:
    """Apply `weights` to the gateway. Never raises for gateway faults: the result says what happened.
    `rollback`: the push takes traffic from failing targets, and what of it lands is kept (see the module doc)."""
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
    except Exception as exc:  # noqa: BLE001 - the previous config must be put back (or a rollback's part kept)
        return _after_failed_push(gateway, current, describe_error(exc), rollback)
    return PushResult(True, current.weights, observed=observed, written=True)


def _after_failed_push(gateway: Gateway, snapshot: GatewaySnapshot, error: str, rollback: bool) -> PushResult:
    """Push the snapshot back, except after a rollback that lowered some target (or may have: the gateway could not
    be read back): restoring would raise it again, and for a rollback the lowered target is the failing one."""
    held = _read_back(gateway)
    lowered = held is None or any(held.get(n, 0) < w for n, w in snapshot.weights.items())
    if rollback and lowered:
        return PushResult(False, snapshot.weights, observed=held, error=error, written=True)
    restored = _restore(gateway, snapshot)
    observed = snapshot.weights if restored else _read_back(gateway)
    return PushResult(False, snapshot.weights, observed=observed, error=error, restored=restored, written=True)


def _read_back(gateway: Gateway) -> Weights | None:
    try:
        return gateway.read_back()
    except Exception:  # noqa: BLE001 - what the gateway holds is then unknown, and reported so
        return None


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
