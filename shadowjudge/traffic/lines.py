"""Incremental, resumable reading of line-oriented log files (plain or gzipped, one file or a folder).

The cursor is `{"file": name, "offset": n}` (n is a byte offset in the decompressed stream) plus
`"finished": true` once a file can never grow again. Files in a folder are read in name order, so rotated
logs must be named to sort in time order (dated names do). A later run skips files whose names sort before
the cursor's file and resumes that file at its offset.

Rules that keep a reader from losing or inventing data:
- the last line of the newest plain file, if it has no newline yet, is left for the next run (the writer may
  be in the middle of it); in any other file it is read as a final line;
- a gzip file is complete once written (rotate, then compress); a truncated or corrupt one is reported as a
  bad line at the offset where it broke, and the file is finished;
- a plain file that is now shorter than the cursor's offset, or whose first bytes differ from those the cursor
  saw (`"head"`, a hash of up to the first 1 KiB), was truncated or replaced: it is read again from the start
  (request ids make that safe); without the head check a replacement that had grown past the old offset was
  resumed mid-line and its first records lost;
- the lines a replaced or vanished file held past the cursor are not lost to rotation: the file whose first
  bytes match the cursor's head is its rotated self, and it is read on from the cursor's offset before
  anything else. Only files the reader would otherwise never read again are searched: names that sort before
  the cursor's file (`requests.jsonl` -> `requests-2026-11-24.jsonl`), the same name compressed
  (`requests-2026-11-24.jsonl.gz`), and logrotate's names outside the listed suffixes (`requests.jsonl.1`,
  `requests.jsonl-20261124`, each maybe `.gz`). A false match re-reads lines, never skips them. The rotations
  made after that one (candidates modified later) are then read whole, oldest first;
- memory stays flat: a line longer than the limit is skipped in chunks, never held whole.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from shadowjudge.traffic.records import SourceUnavailable

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
HEAD_BYTES = 1024
_SKIP_CHUNK = 1 << 16


class Line(NamedTuple):
    """A line read (or a reason it could not be), where it starts, and the cursor just past it.

    `data` None and `error` None is a cursor-only step (a file just finished)."""

    file: str
    offset: int
    data: bytes | None
    error: str | None
    cursor: dict[str, Any]


def list_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The file itself, or the folder's visible regular files whose names end with one of `suffixes`."""
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        return sorted((p for p in root.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.name.endswith(suffixes)
                       and _storable_name(p)),
                      key=lambda p: p.name)
    raise SourceUnavailable(f"traffic path {root} does not exist (expected a file or a folder)")


def _storable_name(file: Path) -> bool:
    """Cursors and quarantine positions hold the file name as text: a name that is not UTF-8 cannot be stored."""
    try:
        file.name.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("skipping %s: its name is not valid UTF-8; rename it to have it read", ascii(str(file)))
        return False
    return True


def read_lines(path: str | Path, cursor: dict[str, Any] | None, max_record_bytes: int,
               suffixes: tuple[str, ...]) -> Iterator[Line]:
    """Every line from the cursor on, across the files under `path` in name order.

    A cursor inside a rotated file's tail carries `"rotated_from"`, the live name: after the tail, the file now
    under that name is read from its start."""
    files = list_files(path, suffixes)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    cursor = cursor or {}
    name = cursor.get("file")
    live = cursor.get("rotated_from", name)
    chain = rotated_continuation(folder, files, cursor)
    if chain:
        if chain[0].name != name:
            log.warning("%s was rotated to %s: reading its last lines from there", name, chain[0].name)
        for rotated in chain[1:]:
            log.warning("%s was rotated to %s since the last run: reading it", name, rotated.name)
        for index, rotated in enumerate(chain):
            if index == 0 and cursor.get("finished"):
                continue  # the cursor's rotated gzip is done; the later rotations are not
            newest = bool(files) and rotated == files[-1]
            offset = int(cursor["offset"]) if index == 0 else 0
            for line in _read_file(rotated, offset, max_record_bytes, newest=newest):
                yield line._replace(cursor={**line.cursor, "rotated_from": live})
    resume_live = not chain and "rotated_from" not in cursor
    for index, file in enumerate(files):
        if file in chain or "rotated_from" in cursor and file.name == name:
            continue  # a rotated file: read above, or finished
        offset, head = 0, None
        if isinstance(live, str):
            if file.name < live:
                continue
            if file.name == live and resume_live:
                if cursor.get("finished"):
                    continue
                offset, head = int(cursor.get("offset", 0)), cursor.get("head")
        yield from _read_file(file, offset, max_record_bytes, newest=index == len(files) - 1, head=head)


def rotated_continuation(folder: Path, files: list[Path], cursor: dict[str, Any]) -> list[Path]:
    """The files to read before the live file's name when the cursor's place is not in the live file: first the
    one to read on from the cursor's offset (the rotated file a `"rotated_from"` cursor is in, or where the
    cursor's plain file went when its name now holds another file or none: the newest candidate, by modification
    time, whose first bytes hash to the cursor's head), then the later rotations since (candidates modified after
    it, oldest first), read whole. Empty when the cursor's file is where it was."""
    name, head, offset = cursor.get("file"), cursor.get("head"), cursor.get("offset")
    live = cursor.get("rotated_from", name)
    if not isinstance(name, str) or not isinstance(live, str) or not isinstance(offset, int) or offset <= 0:
        return []
    in_rotated = "rotated_from" in cursor
    if cursor.get("finished") and not in_rotated:
        return []
    current = folder / name if in_rotated else next((f for f in files if f.name == name), None)
    match = None
    if current is not None and current.is_file():
        # a gzip cursor has no head: a rotated .gz the cursor is in is taken as it is
        same = _head_matches(current, head, offset) if isinstance(head, str) else in_rotated
        if same and not in_rotated:
            return []
        if same:
            match = current
    candidates = _rotation_candidates(folder, files, live, name)
    if match is None and isinstance(head, str):
        match = next((f for _, f in reversed(candidates) if _head_matches(f, head, offset)), None)
    since = _mtime(match) if match is not None else None
    if match is None or since is None:
        return []
    return [match, *(f for modified, f in candidates if f != match and modified > since)]


def _rotation_candidates(folder: Path, files: list[Path], live: str, name: str) -> list[tuple[float, Path]]:
    """Files the reader would never read again, where a rotated log may be: listed names sorting before the live
    one, the cursor file's name `.gz`, and logrotate's names the suffix filter hides; oldest first."""
    listed = set(files)
    candidates = {f for f in files if f.name < live}
    candidates |= {p for p in _rotation_siblings(folder, (live, name)) if p not in listed or p.name == name + ".gz"}
    candidates.discard(folder / live)
    dated = [(modified, f) for f in candidates if (modified := _mtime(f)) is not None]
    return sorted(dated, key=lambda item: (item[0], item[1].name))


def _mtime(file: Path) -> float | None:
    try:
        return file.stat().st_mtime
    except OSError:
        return None


def _rotation_siblings(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Rotated names for `names` the suffix filter may hide: `x.gz`, `x.1`, `x.2.gz`, `x-20261124`."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    prefixes = tuple(n + sep for n in names for sep in (".", "-"))
    return [p for p in entries if p.name.startswith(prefixes) and p.is_file() and _storable_name(p)]


def _head_matches(file: Path, head: str, offset: int) -> bool:
    """Whether `file` (decompressed if gzip) starts with the bytes a cursor at `offset` hashed as `head`."""
    try:
        fh, _ = _open(file)
    except SourceUnavailable:
        return False
    try:
        prefix = fh.read(HEAD_BYTES)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        return False
    finally:
        fh.close()
    return len(prefix) >= min(HEAD_BYTES, offset) and _head_hash(prefix, offset) == head


def _open(file: Path) -> tuple[IO[bytes], bool]:
    try:
        raw = open(file, "rb")
    except OSError as exc:
        raise SourceUnavailable(f"cannot open {file}: {exc.strerror}") from None
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb"), True  # type: ignore[return-value]
    raw.seek(0)
    return raw, False


def _head_hash(prefix: bytes, end: int) -> str:
    return hashlib.blake2b(prefix[:min(HEAD_BYTES, end)], digest_size=8).hexdigest()


def _read_file(file: Path, offset: int, limit: int, newest: bool, head: str | None = None) -> Iterator[Line]:
    name = file.name
    fh, gz = _open(file)
    try:
        prefix = b""
        if not gz:
            prefix = fh.read(HEAD_BYTES)
            fh.seek(0)
        if not gz and os.fstat(fh.fileno()).st_size < offset:
            log.warning("%s is shorter than the cursor's offset %d: truncated or replaced, reading it again",
                        file, offset)
            offset = 0
        elif not gz and offset and isinstance(head, str) and _head_hash(prefix, offset) != head:
            log.warning("%s starts with other bytes than when the cursor was saved: replaced, reading it again", file)
            offset = 0
        steady: dict[str, Any] | None = None  # the cursor's head once past HEAD_BYTES: the same for every line

        def at(end: int) -> dict[str, Any]:
            nonlocal steady
            if gz:
                return {"file": name, "offset": end}
            if end >= HEAD_BYTES and len(prefix) >= HEAD_BYTES:
                steady = steady or {"head": _head_hash(prefix, end)}
                return {"file": name, "offset": end, **steady}
            return {"file": name, "offset": end, "head": _head_hash(prefix, end)}

        pos = offset
        try:
            if offset:
                fh.seek(offset)
            while True:
                line = fh.readline(limit + 2)
                if not line:
                    if gz:
                        yield Line(name, pos, None, None, {"file": name, "offset": pos, "finished": True})
                    return
                end = pos + len(line)
                if line.endswith(b"\n"):
                    content = len(line) - (2 if line.endswith(b"\r\n") else 1)
                    if content > limit:
                        yield Line(name, pos, None, _too_long(content, limit), at(end))
                    else:
                        yield Line(name, pos, line, None, at(end))
                    pos = end
                    continue
                if len(line) >= limit + 2:  # over the limit and not finished: skip the rest in chunks
                    total, complete = len(line), False
                    while True:
                        chunk = fh.readline(_SKIP_CHUNK)
                        if not chunk:
                            break
                        total += len(chunk)
                        if chunk.endswith(b"\n"):
                            complete = True
                            break
                    if not complete and newest and not gz:
                        return  # still being written: decide next run
                    end = pos + total
                    size = total - (1 if complete else 0)
                    yield Line(name, pos, None, _too_long(size, limit), at(end))
                    pos = end
                    continue
                if newest and not gz:
                    return  # a partial last line: the writer may still be appending to it
                yield Line(name, pos, line, None, at(end))
                pos = end
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            if not gz:
                raise SourceUnavailable(f"cannot read {file}: {exc}") from None
            reason = "truncated gzip stream" if isinstance(exc, EOFError) else f"corrupt gzip stream ({type(exc).__name__})"
            yield Line(name, pos, None, reason, {"file": name, "offset": pos, "finished": True})
    finally:
        fh.close()


def _too_long(size: int, limit: int) -> str:
    return f"record of {size} bytes exceeds max_record_bytes={limit}"
