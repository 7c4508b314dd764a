"""Gateway adapters: where route weights are pushed. One module per gateway, all behind `Gateway`."""

from __future__ import annotations

from shadowjudge.config import GatewayConfig, RouteConfig
from shadowjudge.errors import InputError
from shadowjudge.gateways.base import (
    Gateway,
    GatewayConfigInvalid,
    GatewayError,
    GatewayReadBackMismatch,
    GatewayRejected,
    GatewaySnapshot,
    GatewayUnavailable,
    Weights,
    check_weights,
)

__all__ = [
    "Gateway",
    "GatewayConfigInvalid",
    "GatewayError",
    "GatewayReadBackMismatch",
    "GatewayRejected",
    "GatewaySnapshot",
    "GatewayUnavailable",
    "Weights",
    "check_weights",
    "get_gateway",
]

_FILE_KINDS = ("truefoundry", "litellm", "portkey", "nginx")


def get_gateway(cfg: GatewayConfig, route: RouteConfig) -> Gateway:
    """The adapter `cfg.kind` names, bound to one route. Raises InputError when the config lacks what it needs."""
    if cfg.kind in _FILE_KINDS and not cfg.path:
        raise InputError(f"route '{route.name}': gateway kind '{cfg.kind}' needs 'path' (the config file to write)")
    if cfg.kind == "truefoundry":
        from shadowjudge.gateways.truefoundry import TrueFoundryGateway

        return TrueFoundryGateway(route, cfg.path, cfg.reload_command)  # type: ignore[arg-type]
    if cfg.kind == "litellm":
        from shadowjudge.gateways.litellm import LiteLLMFileGateway

        return LiteLLMFileGateway(route, cfg.path, cfg.reload_command)  # type: ignore[arg-type]
    if cfg.kind == "portkey":
        from shadowjudge.gateways.portkey import PortkeyGateway

        return PortkeyGateway(route, cfg.path, cfg.reload_command)  # type: ignore[arg-type]
    if cfg.kind == "nginx":
        from shadowjudge.gateways.nginx import NginxGateway

        return NginxGateway(route, cfg.path, cfg.reload_command, status_url=cfg.url)  # type: ignore[arg-type]
    if cfg.kind == "litellm_api":
        from shadowjudge.gateways.litellm_api import LiteLLMApiGateway

        if not cfg.url:
            raise InputError(f"route '{route.name}': gateway kind 'litellm_api' needs 'url' (the proxy's base URL)")
        return LiteLLMApiGateway(route, cfg.url, api_key_env=cfg.api_key_env)
    raise InputError(f"route '{route.name}': unknown gateway kind '{cfg.kind}'")
