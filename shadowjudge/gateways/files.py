"""Gateways whose config is a file: atomic writes that keep the previous revision, and an optional reload command.

A file gateway's push writes a temp file next to the target, fsyncs it, saves the current file as `<name>.prev`,
renames the temp over the target (atomic on POSIX) and fsyncs the folder; a crash leaves either the old or the new
file, never half of one. Both files keep the current file's mode, and its owner where we may set it (as root). If
the reload command then fails, or the push is restored after a failed read-back, the previous text is written back,
so the file on disk matches the config the gateway still runs, and `.prev` gets its own earlier revision back: a
rejected rendering is never left where a person would look for the last good one.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from shadowjudge.config import RouteConfig
from shadowjudge.gateways.base import (
    GatewayConfigInvalid,
    GatewayRejected,
    GatewaySnapshot,
    GatewayUnavailable,
    Weights,
    check_weights,
)

RELOAD_TIMEOUT_S = 60.0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What format code raises on a hand-edited file of a shape it does not expect (a null list, a string for a map).
_ODD_SHAPE = (AttributeError, TypeError, ValueError, KeyError)
NEW_FILE_MODE = 0o644  # a gateway process often runs as another user; the files hold no secrets (env references)


def _replace_atomically(path: Path, text: str, like: Path | None = None) -> None:
    """Write a temporary file beside `path` and rename it over: a reader sees the old or the new text, never half.
    A symlinked config keeps its link (the file it points to is replaced); the new file takes the access of `like`
    (default: the file it replaces), see `_copy_access`."""
    if path.is_symlink():
        path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            _copy_access(fh.fileno(), like or path)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _copy_access(fd: int, like: Path) -> None:
    """Give the open file `like`'s mode and, where we may (as root), its owner and group: a gateway running as
    another user can still read its config after root pushed it, and a copy of a private file stays private.
    A new file (no `like` on disk) gets NEW_FILE_MODE."""
    try:
        st = like.stat()
    except FileNotFoundError:
        os.fchmod(fd, NEW_FILE_MODE)
        return
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        pass  # not root: the file stays ours, as any file we create
    os.fchmod(fd, st.st_mode & 0o777)  # after the chown, which may clear mode bits


def previous_revision_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def write_config_file(path: Path, text: str | None, keep_previous: bool = True) -> None:
    """Make `text` the file's content atomically (None removes the file), keeping the current one as `.prev`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_previous and path.exists():
            _replace_atomically(previous_revision_path(path), path.read_text(encoding="utf-8"), like=path)
        if text is None:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        else:
            _replace_atomically(path, text)
    except OSError as exc:
        raise GatewayUnavailable(f"{path}: cannot write gateway config: {exc.strerror or exc}") from None


def load_yaml(text: str, where: str) -> Any:
    """Round-trip YAML: comments, key order and keys we do not know survive a render."""
    try:
        return _yaml().load(text)
    except YAMLError as exc:
        raise GatewayConfigInvalid(f"{where}: not valid YAML: {exc}") from None


def dump_yaml(doc: Any) -> str:
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    return buf.getvalue()


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def names_model(ident: str, model: str) -> bool:
    """Whether a gateway's model id is `model`, with or without a `provider/` prefix."""
    return ident == model or ident.split("/", 1)[-1] == model


def model_owner(route: RouteConfig, ident: str) -> str | None:
    """The route target an entry names, by target name or by model (with or without a `provider/` prefix)."""
    targets = route.targets
    for t in targets:
        if ident == t.name:
            return t.name
    matches = [t.name for t in targets if names_model(ident, t.model)]
    return matches[0] if len(matches) == 1 else None


_UNREADABLE = object()


@dataclass(frozen=True)
class _Push:
    """What one push replaced: the file's text and its `.prev` (None: there was none)."""

    pushed: str | None
    replaced: str | None
    prev: str | None | object


class FileGateway:
    """Shared push/read mechanics; a subclass says how its format stores weights (parse_weights, render_text)."""

    kind = "file"

    def __init__(self, route: RouteConfig, path: str | Path, reload_command: Sequence[str] | None = None) -> None:
        self.route = route
        self.path = Path(os.path.abspath(path))
        self.reload_command = list(reload_command) if reload_command else None
        self.name = f"{self.kind}:{os.path.realpath(path)}"  # one name per file, however spelled: it keys its lock
        self._last_push: _Push | None = None

    # -- format-specific ---------------------------------------------------------------------------------------
    def parse_weights(self, text: str) -> Weights:
        raise NotImplementedError

    def render_text(self, text: str | None, weights: Mapping[str, int]) -> str:
        raise NotImplementedError

    def check_rendered(self, text: str) -> None:
        """Format rules beyond the weights (schema, external validator). Raise GatewayRejected."""

    # -- Gateway protocol --------------------------------------------------------------------------------------
    def read_current(self) -> GatewaySnapshot:
        text = self._read_text()
        if text is None:
            return GatewaySnapshot(weights={}, document=None)
        return GatewaySnapshot(weights=self._parse(text), document=text)

    def render(self, current: GatewaySnapshot, weights: Mapping[str, int]) -> str:
        check_weights(weights, f"route '{self.route.name}'")
        try:
            return self.render_text(current.document, weights)
        except _ODD_SHAPE as exc:
            raise self._odd_shape(exc) from None

    def validate(self, rendered: str, weights: Mapping[str, int]) -> None:
        check_weights(weights, f"route '{self.route.name}'")
        try:
            parsed = self._parse(rendered)
        except GatewayConfigInvalid as exc:
            raise GatewayRejected(f"{self.path}: rendered config does not parse back: {exc}") from None
        if parsed != dict(weights):
            raise GatewayRejected(f"{self.path}: rendered config holds {parsed}, not the weights {dict(weights)}")
        self.check_rendered(rendered)

    def push(self, rendered: str | None) -> None:
        """Write `rendered`, keeping the current file as `.prev`. Pushing back what the last push replaced (a failed
        push being restored) undoes that push instead: `.prev` gets its earlier revision back, so it never holds a
        rejected rendering a person might restore by hand; and pushing what the file already holds writes nothing
        (the reload still runs). A failed reload undoes only what this call wrote: an earlier push's revision is
        the config the gateway runs, not one to roll back."""
        last, current = self._last_push, self._read_text()
        written: _Push | None = None
        if last is not None and rendered == last.replaced and current == last.pushed:
            self._undo(last)
        elif rendered != current:  # the text the file holds already (a push its reload undid) is not written again
            written = _Push(pushed=rendered, replaced=current, prev=self._read_prev())
            write_config_file(self.path, rendered)
        self._last_push = written
        if self.reload_command:
            try:
                self._reload()
            except GatewayRejected:
                if written is not None:
                    self._undo(written)
                raise

    def read_back(self) -> Weights:
        text = self._read_text()
        return {} if text is None else self._parse(text)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _undo(self, push: _Push) -> None:
        write_config_file(self.path, push.replaced, keep_previous=False)
        if push.prev is not _UNREADABLE:
            prev: Any = push.prev
            write_config_file(previous_revision_path(self.path), prev, keep_previous=False)
        self._last_push = None

    def _read_prev(self) -> str | None | object:
        try:
            return previous_revision_path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return _UNREADABLE  # left as the push leaves it

    def _parse(self, text: str) -> Weights:
        """`parse_weights`, with a hand-edited file of an unexpected shape as GatewayConfigInvalid: a gateway fault
        is reported, never raised out of a controller step."""
        try:
            return self.parse_weights(text)
        except _ODD_SHAPE as exc:
            raise self._odd_shape(exc) from None

    def _odd_shape(self, exc: Exception) -> GatewayConfigInvalid:
        return GatewayConfigInvalid(f"{self.path}: a hand edit left a shape this gateway's format does not have "
                                    f"({type(exc).__name__}: {exc})")

    def _read_text(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as exc:
            raise GatewayConfigInvalid(f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise GatewayUnavailable(f"{self.path}: cannot read gateway config: {exc.strerror or exc}") from None

    def _reload(self) -> None:
        argv = [arg.replace("{path}", str(self.path)) for arg in self.reload_command or []]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=RELOAD_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise GatewayRejected(f"{self.name}: reload command not found: {argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise GatewayRejected(f"{self.name}: reload command timed out after {RELOAD_TIMEOUT_S:.0f}s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-500:]
            raise GatewayRejected(f"{self.name}: reload command exited {proc.returncode}: {tail}")
