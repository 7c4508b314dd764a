"""The one protocol every gateway adapter implements, and the errors a push can end in.

A push is five moves, in this order, and the routing controller is the only caller that strings them together
(shadowjudge.routing.push): read what the gateway holds now, render the new weights into that (keeping everything
else the user wrote), validate the rendering before anything is written, push it, and read back what the gateway
then holds. If the read-back disagrees, the controller pushes the document it read first, so the previous config
stays in force.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from shadowjudge.errors import InputError, ShadowJudgeError


class GatewayError(ShadowJudgeError):
    """A push that did not happen; the gateway still holds its previous config."""


class GatewayUnavailable(GatewayError):
    """The gateway could not be read or written (down, unreachable, file system error)."""


class GatewayRejected(GatewayError):
    """The rendered config failed validation, or the gateway refused it; nothing new is in force."""


class GatewayReadBackMismatch(GatewayError):
    """After a push the gateway reported other weights than the ones pushed."""


class GatewayConfigInvalid(GatewayError, InputError):
    """The gateway's current config cannot be used as a base (unparseable, wrong routing type, unknown target)."""


Weights = dict[str, int]


@dataclass(frozen=True)
class GatewaySnapshot:
    """What a gateway holds for one route.

    `weights` maps the route's target names to their weight ({} when the gateway has nothing for the route yet);
    `document` is what a restore pushes back: the file's exact text (None when there was no file), or the API's
    deployment list.
    """

    weights: Weights
    document: Any = None
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Gateway(Protocol):
    """A place route weights live. `name` identifies it in history rows (kind plus where, never a secret)."""

    kind: str
    name: str

    def read_current(self) -> GatewaySnapshot:
        """What the gateway holds now; raises GatewayUnavailable or GatewayConfigInvalid."""
        ...

    def render(self, current: GatewaySnapshot, weights: Mapping[str, int]) -> Any:
        """`current.document` with the route's weights replaced and everything else kept."""
        ...

    def validate(self, rendered: Any, weights: Mapping[str, int]) -> None:
        """Raise GatewayRejected if the rendering must not be pushed (it must also hold exactly `weights`)."""
        ...

    def push(self, rendered: Any) -> None:
        """Make `rendered` (or a snapshot's document, to restore it) the gateway's config, atomically."""
        ...

    def read_back(self) -> Weights:
        """The weights the gateway now serves with, read from the gateway itself."""
        ...


def check_weights(weights: Mapping[str, int], where: str) -> None:
    """Weights are integers in [0, 100] summing to 100: the one invariant every gateway must be handed."""
    bad = {k: v for k, v in weights.items() if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 100}
    if bad:
        raise GatewayRejected(f"{where}: weights must be integers in [0, 100], got {bad}")
    total = sum(weights.values())
    if total != 100:
        raise GatewayRejected(f"{where}: weights must sum to 100, got {total} ({dict(weights)})")
