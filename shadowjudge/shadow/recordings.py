"""Recorded model outputs in AlpacaEval's outputs format, indexed for the replay server.

Rows are JSON lines `{"prompt_id", "model", "output"}`, plain or gzipped. A request finds its answer by
`prompt_id_for(last user message)`, the same SHA-1 prefix AlpacaEval uses for its prompt ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from shadowjudge.errors import InputError


class RecordingsError(InputError):
    """A recordings file that cannot be served; the message names the file and line."""


def prompt_id_for(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


class Recordings:
    """Outputs by model and prompt id, plus a stable fallback order for prompts that were never recorded."""

    def __init__(self, outputs: dict[str, dict[str, str]]):
        if not outputs:
            raise RecordingsError("no recorded outputs to serve")
        self._outputs = outputs
        self._fallback = {m: [by_id[k] for k in sorted(by_id)] for m, by_id in outputs.items()}

    @classmethod
    def load(cls, paths: Path | str | Iterable[Path | str], models: Iterable[str] | None = None) -> "Recordings":
        """Read one or more recordings files; `models` keeps only those models (all when None)."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        wanted = set(models) if models else None
        outputs: dict[str, dict[str, str]] = {}
        for path in map(Path, paths):
            for row in _read_rows(path):
                model = row["model"]
                if wanted is None or model in wanted:
                    outputs.setdefault(model, {})[row["prompt_id"]] = row["output"]
        if wanted is not None and (missing := wanted - set(outputs)):
            raise RecordingsError(f"models not in the recordings: {sorted(missing)}")
        return cls(outputs)

    @property
    def models(self) -> list[str]:
        return sorted(self._outputs)

    def __contains__(self, model: str) -> bool:
        return model in self._outputs

    def answer(self, model: str, prompt_id: str) -> tuple[str, bool]:
        """The recorded output and whether it was a hit; a miss gets one of the model's outputs picked by the id."""
        by_id = self._outputs[model]
        text = by_id.get(prompt_id)
        if text is not None:
            return text, True
        pool = self._fallback[model]
        return pool[int(prompt_id, 16) % len(pool)], False


_FIELDS = ("prompt_id", "model", "output")


def read_json_lines(path: Path, error: type[InputError]) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON lines file, plain or gzipped.

    Every way the file can be unreadable (missing, truncated gzip, not UTF-8, a line that is not JSON) raises
    `error` naming the file, and the line where it is known, so that a CLI prints one line instead of a traceback.
    Decoding reads ahead, so a truncated gzip file or a bad byte cannot be pinned to a line.
    """
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise error(f"{path}:{lineno}: not valid JSON: {exc}") from None
                yield lineno, value
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    except EOFError:
        raise error(f"{path}: truncated gzip file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text: {exc.reason} (byte {exc.object[exc.start:exc.end]!r})") from None


def _read_rows(path: Path) -> Iterator[dict[str, str]]:
    for lineno, row in read_json_lines(path, RecordingsError):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in _FIELDS):
            raise RecordingsError(f"{path}:{lineno}: needs string fields prompt_id, model and output")
        yield row
