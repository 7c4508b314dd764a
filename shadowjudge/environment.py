"""Process-wide defaults: offline model loading, telemetry off, and room for Prefect's ephemeral server to start."""

import ctypes
import ctypes.util
import gc
import logging
import os
import re
import signal
import threading

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # A judge is a few small files: MLflow's download bar only clutters cycle logs and bench output.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # The in-process server takes 10-15 s on an idle 2-core machine; the default 20 s fails under load.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def apply_defaults() -> None:
    """Set each default unless the user already chose a value, and keep URL paths out of HTTP client logs."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, UrlPathRedactor) for f in logger.filters):
            logger.addFilter(UrlPathRedactor())


# The host ends at '/', '?' or '#': a URL with no path (https://hooks.example.com?token=...) keeps its query secret.
_URL = re.compile(r"(https?://)(?:[^@/?#\s\"']*@)?([^/?#\s\"']+)[^\s\"']*")


class UrlPathRedactor(logging.Filter):
    """httpx logs every request's full URL at INFO; webhook URLs (Slack, PagerDuty routing) carry their secret in
    the path or query, so only scheme, host and port are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_URL.sub(r"\1\2/...", str(a)) if "://" in str(a) else a for a in record.args)
        if "://" in str(record.msg):
            record.msg = _URL.sub(r"\1\2/...", str(record.msg))
        return True


class ExpectedFailureTraceback(logging.Filter):
    """Drop the traceback Prefect logs with a task or flow that failed on a ShadowJudge error: its message already
    says what went wrong and what to do (`shadowjudge run` prints it as its last line), and fourteen lines of engine
    frames above it read like a crash. Any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from shadowjudge.errors import ShadowJudgeError

        if record.exc_info and isinstance(record.exc_info[1], ShadowJudgeError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_failures() -> None:
    """Install ExpectedFailureTraceback on Prefect's flow and task run loggers (unless SHADOWJUDGE_DEBUG is set)."""
    if os.environ.get("SHADOWJUDGE_DEBUG"):
        return
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedFailureTraceback) for f in logger.filters):
            logger.addFilter(ExpectedFailureTraceback())


def start_prefect_server_apart() -> None:
    """Start Prefect's temporary API server (used when PREFECT_API_URL is not set) so that Ctrl-C leaves it running.

    The terminal sends SIGINT to its whole foreground process group, the server included: the server died at once
    and the interrupted flow then spent a minute retrying to record its crash, ending in 'Connection refused'. Started
    from a thread that blocks SIGINT, the server process inherits the blocked signal (uvicorn installs handlers but
    does not unblock it); Prefect still stops it with SIGTERM at exit, and Ctrl-C during the start interrupts the
    waiting main thread.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    failures: list[BaseException] = []

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            SubprocessASGIServer().start()  # the instance Prefect's clients use; a no-op once it runs
        except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
            failures.append(exc)

    starter = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    starter.start()
    starter.join()
    if failures:
        raise failures[0]


def release_memory() -> None:
    """Collect reference cycles, then hand freed heap back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A serving process runs cycles for weeks, each on Prefect's worker threads: glibc keeps a heap arena per thread
    and returns little of it on its own, so without the trim the resident size creeps up cycle after cycle
    although live memory does not (bench/soak.py).
    """
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_libc = _load_libc()
