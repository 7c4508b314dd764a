"""A quick "is anything answering?" check of an HTTP MLflow tracking server, made before slow or paid work.

MLflow's client retries every call (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default, with backoff, each attempt
waiting up to MLFLOW_HTTP_REQUEST_TIMEOUT, 120 s), so a tracking URI where nothing listens, or where something
accepts connections and never answers, holds a command for minutes before a generic error. One GET of the
server's `/health` (which `mlflow server` answers with "OK") tells the same within seconds. MLflow's retries are
left as they are: once the server has answered, they are what carries a run over a brief outage or rate limit.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from shadowjudge.tracking.mlflow_tracking import TrackingError, redact_uri

if TYPE_CHECKING:
    from shadowjudge.config import Config

CHECK_TIMEOUT_S = 5.0
WHAT_TO_DO = ("start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or point the tracking URI "
              "(mlflow.tracking_uri in the config, --tracking-uri or MLFLOW_TRACKING_URI) at a running one")

_answered: set[str] = set()  # URIs whose server answered a check in this process


class TrackingUnreachable(TrackingError):
    """Nothing (or nothing healthy) answers at an HTTP tracking URI; the message names the URI and what to do."""


def health_url(tracking_uri: str) -> str | None:
    """`<tracking URI>/health` without credentials, or None for a URI that is not http(s) (sqlite:, file:,
    postgresql:, databricks, ...)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))


def _tls_failure(exc: BaseException) -> bool:
    """The handshake failed (a certificate this check cannot verify, a client certificate wanted): something
    answers there, and MLflow has its own TLS settings (MLFLOW_TRACKING_INSECURE_TLS, ..._CERT_PATH)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_tracking_reachable(tracking_uri: str, timeout_s: float = CHECK_TIMEOUT_S, *, once: bool = False) -> None:
    """Return when the MLflow server at an http(s) tracking URI answers `GET /health` within `timeout_s`; raise
    TrackingUnreachable when the connection is refused, the host is unknown, nothing answers in time, or it answers
    with a server error (5xx). Other URIs return at once. With `once`, a URI that already answered in this
    process is not checked again."""
    where = f"MLflow tracking server at {redact_uri(tracking_uri)}"
    try:
        url = health_url(tracking_uri)
    except ValueError as exc:  # a port that is not a number 0-65535
        raise TrackingUnreachable(f"{where} is unreachable: not a usable URL ({exc}); {WHAT_TO_DO}") from None
    if url is None or (once and tracking_uri in _answered):
        return
    import httpx

    try:
        # No credentials are sent: /health needs none. Proxy settings from the environment apply, as to MLflow.
        response = httpx.get(url, timeout=timeout_s, follow_redirects=False)
    except httpx.TimeoutException:
        raise TrackingUnreachable(f"{where} is unreachable: no answer to GET /health within {timeout_s:g} s; "
                                  f"{WHAT_TO_DO}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        if _tls_failure(exc):
            _answered.add(tracking_uri)
            return
        raise TrackingUnreachable(f"{where} is unreachable: {_reason(exc)}; {WHAT_TO_DO}") from None
    if response.status_code >= 500:
        raise TrackingUnreachable(f"{where} is unreachable: GET /health answered HTTP {response.status_code}; "
                                  f"{WHAT_TO_DO}")
    # 2xx is MLflow's answer; 401/403/404 may be a proxy or a managed service without /health, whose own errors
    # MLflow reports at once (it retries only 429 and 5xx).
    _answered.add(tracking_uri)


def _reason(exc: BaseException) -> str:
    """The innermost OS-level reason ('Connection refused', 'Name or service not known'), else the error's text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror[:1].lower() + seen.strerror[1:]
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def registry_in_use(config: "Config") -> bool:
    """Whether a cycle of `config` reads its judge from the MLflow model registry at the tracking URI."""
    judge = config.judge
    return judge.evaluator == "small-judge" and (not judge.model_uri or judge.model_uri.startswith("models:/"))


def check_config_tracking(config: "Config", timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Check the tracking URI of a config whose cycle logs to MLflow or loads its judge from the registry."""
    if config.mlflow.enabled or registry_in_use(config):
        check_tracking_reachable(config.mlflow.tracking_uri, timeout_s)
