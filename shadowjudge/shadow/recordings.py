"""Recorded model outputs in AlpacaEval's outputs format, indexed for the replay server.

Rows are JSON lines `{"prompt_id", "model", "output"}`, plain or gzipped. A request finds its answer by
`prompt_id_for(last user message)`, the same SHA-1 prefix AlpacaEval uses for its prompt ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

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


def _read_rows(path: Path) -> Iterable[dict[str, str]]:
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise RecordingsError(f"{path}:{lineno}: not valid JSON: {exc}") from None
                if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in _FIELDS):
                    raise RecordingsError(f"{path}:{lineno}: needs string fields prompt_id, model and output")
                yield row
    except OSError as exc:
        raise RecordingsError(f"{path}: cannot read recordings: {exc.strerror or exc}") from None
    except EOFError:
        raise RecordingsError(f"{path}: truncated gzip file") from None
