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
  saw (`"head"`, a hash of the file's first `"head_bytes"`: those read, up to 64 KiB; a cursor saved before
  `head_bytes` existed hashed up to 1 KiB), was truncated or replaced: it is read again from the start (request
  ids make that safe); without the head check a replacement that had grown past the old offset was resumed
  mid-line and its first records lost. 1 KiB told too little apart: OTLP exports of one service open with the
  same resource attributes, often longer than that;
- the lines a replaced or vanished file held past the cursor are not lost to rotation: the file whose first
  bytes match the cursor's head is its rotated self, and it is read on from the cursor's offset before
  anything else. Only files the reader would otherwise never read again are searched: names that sort before
  the cursor's file (`requests.jsonl` -> `requests-2026-11-24.jsonl`; for a source that is one file, only that
  file's dated names: its stem, `-`, `_` or `.`, a date (year and month at least, maybe a day and a time), its
  extension; a number there is another log's, a worker's or a shard's: `requests-2.jsonl`), the same name
  compressed (`requests-2026-11-24.jsonl.gz`), and logrotate's names outside the listed suffixes
  (`requests.jsonl.1`, `requests.jsonl-20261124`, each maybe `.gz`). A false match re-reads lines, never skips
  them. The rotations made after that one (candidates modified later) are then read whole, oldest first; a
  file source's dated names among them only when the log went to a dated name shaped alike (otherwise a warning
  names them: reading another log as this one is worse than missing a rotation);
- a backfill reads those rotated files too, each log's oldest first, before the log itself;
- a UTF-8 byte order mark opening a file is not part of its first line (offsets still count it);
- memory stays flat: a line longer than the limit is skipped in chunks, never held whole.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from shadowjudge.traffic.records import SourceUnavailable

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
HEAD_BYTES = 1 << 16  # a cursor's head hashes at most the file's first 64 KiB
LEGACY_HEAD_BYTES = 1024  # ... and at most 1 KiB in a cursor without "head_bytes"
_SKIP_CHUNK = 1 << 16
# A rotation's tag after the live name: a number (logrotate's `.1`) or a date and time (`-20261124`,
# `.2026-11-24_10-00-00`).
_LOGROTATE_TAG = re.compile(r"\d(?:[\dTZ:._-]*[\dZ])?")
# A dated name's tag, between the stem and the extension: a date, year and month at least, maybe a time
# (`2026-11-24`, `20261124`, `2026-11-24T10`, `2026112410`). A bare number there names a shard, a worker or a
# port (`app-2.log`, `requests-1.jsonl`, `gw-8080.log`): another log, never a rotation.
_DATE_TAG = re.compile(r"(?:19|20)\d\d[-_.]?(?:0[1-9]|1[0-2])(?:[-_.]?(?:0[1-9]|[12]\d|3[01]))?"
                       r"(?:[T_.-]?\d(?:[\d:._-]*\d)?Z?)?")
_TAG_START = re.compile(r"[-_.](?=\d)")  # where a tag may start: a separator before a digit


class Line(NamedTuple):
    """A line read (or a reason it could not be), where it starts, and the cursor just past it.

    `data` None and `error` None is a cursor-only step (a file just finished). `resumed`: the line starts where
    the cursor read from stopped, in the file it stopped in (or that file rotated), not in a replacement."""

    file: str
    offset: int
    data: bytes | None
    error: str | None
    cursor: dict[str, Any]
    resumed: bool = False


def list_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The file itself, or the folder's visible regular files whose names end with one of `suffixes`."""
    root = Path(path)
    try:
        if root.is_file():
            return [root]
        if root.is_dir():
            return sorted((p for p in root.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.name.endswith(suffixes)
                           and _storable_name(p)),
                          key=lambda p: p.name)
    except OSError as exc:
        raise SourceUnavailable(f"cannot list traffic path {root}: {exc.strerror or exc}") from None
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
               suffixes: tuple[str, ...], *, backfill: bool = False) -> Iterator[Line]:
    """Every line from the cursor on, across the files under `path` in name order; with `backfill`, from the
    beginning, each log's rotated files first (a backfill must find yesterday's lines wherever they went).

    A cursor inside a rotated file's tail carries `"rotated_from"`, the live name: after the tail, the file now
    under that name is read from its start."""
    root = Path(path)
    files = list_files(root, suffixes)
    one_file = files == [root]
    folder = root.parent if one_file else root
    if backfill:
        files = with_rotations(folder, files, one_file)
        cursor = None
    cursor = cursor or {}
    name = cursor.get("file")
    live = cursor.get("rotated_from", name)
    chain = rotated_continuation(folder, files, cursor, one_file)
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
            for line in _read_file(rotated, offset, max_record_bytes, newest=newest, resume=index == 0):
                yield line._replace(cursor={**line.cursor, "rotated_from": live})
    resume_live = not chain and "rotated_from" not in cursor
    read_already = set(chain)
    for index, file in enumerate(files):
        if file in read_already or "rotated_from" in cursor and file.name == name:
            continue  # a rotated file: read above, or finished
        offset, head, resume = 0, None, False
        if isinstance(live, str):
            if file.name < live:
                continue
            if file.name == live and resume_live:
                if cursor.get("finished"):
                    continue
                offset, head, resume = int(cursor.get("offset", 0)), cursor_head(cursor), True
        yield from _read_file(file, offset, max_record_bytes, newest=index == len(files) - 1, head=head,
                              resume=resume)


def cursor_head(cursor: dict[str, Any]) -> tuple[str, int] | None:
    """The cursor's head hash and how many of its file's first bytes it covers: `"head_bytes"`, or in a cursor
    saved without it, those before its offset up to 1 KiB; None without a head."""
    head, offset, length = cursor.get("head"), cursor.get("offset"), cursor.get("head_bytes")
    if not isinstance(head, str) or not isinstance(offset, int):
        return None
    if not isinstance(length, int) or isinstance(length, bool) or not 0 < length <= HEAD_BYTES:
        length = min(LEGACY_HEAD_BYTES, max(offset, 0))
    return head, length


def rotated_continuation(folder: Path, files: list[Path], cursor: dict[str, Any],
                         one_file: bool = False) -> list[Path]:
    """The files to read before the live file's name when the cursor's place is not in the live file: first the
    one to read on from the cursor's offset (the rotated file a `"rotated_from"` cursor is in, or where the
    cursor's plain file went when its name now holds another file or none: the newest candidate, by modification
    time, whose first bytes hash to the cursor's head), then the later rotations since (candidates modified after
    it, oldest first), read whole. Empty when the cursor's file is where it was.

    A file source's dated names are later rotations only when the log went to one of them and they are named
    alike (`requests-2026-11-24.jsonl`, then `requests-2026-11-25.jsonl`): beside a log rotated to other names,
    such a file is as likely another program's, and reading another log's lines as this one's is worse than the
    warning that names it."""
    name, offset = cursor.get("file"), cursor.get("offset")
    live = cursor.get("rotated_from", name)
    head = cursor_head(cursor)
    if not isinstance(name, str) or not isinstance(live, str) or not isinstance(offset, int) or offset < 0:
        return []
    if offset == 0 and (head is None or head[1] == 0):
        return []  # nothing read yet, nothing to lose
    in_rotated = "rotated_from" in cursor
    if cursor.get("finished") and not in_rotated:
        return []
    current = folder / name if in_rotated else next((f for f in files if f.name == name), None)
    match = None
    if current is not None and current.is_file():
        # a gzip cursor has no head: a rotated .gz the cursor is in is taken as it is
        same = _head_matches(current, *head) if head is not None else in_rotated
        if same and not in_rotated:
            return []
        if same:
            match = current
    candidates = _rotation_candidates(folder, files, live, name, one_file)
    if match is None and head is not None:
        match = next((c.file for c in reversed(candidates) if _head_matches(c.file, *head)), None)
    since = _mtime(match) if match is not None else None
    if match is None or since is None:
        return []
    match_shape = _name_shape(match.name) if any(c.file == match and c.dated for c in candidates) else None
    later: list[Path] = []
    for candidate in candidates:
        if candidate.file == match or candidate.modified <= since:
            continue
        if candidate.dated and _name_shape(candidate.file.name) != match_shape:
            log.warning("%s is dated like a rotation of %s, but %s was rotated to %s: not reading it as one "
                        "(a backfill reads it)", candidate.file.name, live, live, match.name)
            continue
        later.append(candidate.file)
    return [match, *later]


class _Candidate(NamedTuple):
    modified: float
    file: Path
    dated: bool  # a file source's dated name (stem, date, extension), not logrotate's name nor a listed one


def _rotation_candidates(folder: Path, files: list[Path], live: str, name: str,
                         one_file: bool) -> list[_Candidate]:
    """Files the reader would never read again, where a rotated log may be: listed names sorting before the live
    one, the cursor file's name `.gz`, logrotate's names the suffix filter hides and, for a source that is one
    file, that file's dated names; oldest first."""
    listed = set(files)
    is_dated = {f: False for f in files if f.name < live}
    rotated = _rotated_files(_folder_files(folder), list(dict.fromkeys((live, name))),
                             dated_log=live if one_file else None)
    for file, rotation in rotated.items():
        if file not in listed or file.name == name + ".gz":
            is_dated[file] = rotation.dated
    is_dated.pop(folder / live, None)
    candidates = [_Candidate(modified, f, dated) for f, dated in is_dated.items()
                  if (modified := _mtime(f)) is not None]
    return sorted(candidates, key=lambda c: (c.modified, c.file.name))


def with_rotations(folder: Path, files: list[Path], one_file: bool) -> list[Path]:
    """`files` with each one's rotated files the listing leaves out (logrotate's names; for a source that is one
    file, its dated names too) just before it, oldest first; a file and its `.gz` being made from it: only the
    file. The folder is listed once and each name read once: a folder of thousands of hourly logs stays fast."""
    listed = set(files)
    rotated = _rotated_files((p for p in _folder_files(folder) if p not in listed), [f.name for f in files],
                             dated_log=files[0].name if one_file and files else None)
    tags_by_log: dict[str, dict[Path, str]] = {}
    for file, rotation in rotated.items():
        tags_by_log.setdefault(rotation.live, {})[file] = rotation.tag
    out: list[Path] = []
    for file in files:
        out.extend(_oldest_first(tags_by_log.get(file.name, {})))
        out.append(file)
    return out


def _folder_files(folder: Path) -> list[Path]:
    """The folder's visible entries (which are regular files `_rotated_files` checks, for the few names it keeps);
    none, and a warning, where the folder cannot be listed."""
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        log.warning("cannot list %s to look for rotated logs: %s", folder, exc.strerror or exc)
        return []


class _Rotation(NamedTuple):
    live: str  # the name of the log rotated
    tag: str  # the rotation's number or date; '' for the log's own name `.gz`
    dated: bool  # a dated name (stem, date, extension), not logrotate's (the live name, then a tag)


def _rotated_files(entries: Iterable[Path], logs: list[str], dated_log: str | None) -> dict[Path, _Rotation]:
    """Which of `entries` hold one of the logs named `logs` rotated: logrotate's names for each
    (`requests.jsonl.1`, `requests.jsonl.2.gz`, `requests.jsonl-20261124`) and, for `dated_log`, its dated names
    (`requests-2026-11-24.jsonl`, `requests_20261124.jsonl.gz`: what the name says, not where it sorts). Other
    names (another service's log, `requests.jsonl.bak`, a worker's `requests-2.jsonl`) are not rotations. Each
    name is read once, however many logs; one that could be two logs' rotation goes to the first in `logs`."""
    rank = {log_name: index for index, log_name in enumerate(logs)}
    dated_live = _without_gz(dated_log) if dated_log is not None else None
    out: dict[Path, _Rotation] = {}
    for entry in entries:
        best: tuple[tuple[int, bool], _Rotation] | None = None
        for rotation in _rotation_readings(entry.name):
            if rotation.dated:
                if dated_log is None or rotation.live != dated_live:
                    continue
                rotation = rotation._replace(live=dated_log)
            elif rotation.live not in rank:
                continue
            preference = (rank[rotation.live], rotation.dated)  # logrotate's reading first
            if best is None or preference < best[0]:
                best = (preference, rotation)
        if best is not None and _is_file(entry) and _storable_name(entry):
            out[entry] = best[1]
    return out


def _rotation_readings(name: str) -> Iterator[_Rotation]:
    """Every way `name` can be a rotated log's: the log's name `.gz`; its name, `.` or `-`, a number or a date
    (logrotate's), maybe `.gz`; its stem, `-`, `_` or `.`, a date, its extension (dated), maybe `.gz`."""
    base = _without_gz(name)
    if base != name:
        yield _Rotation(base, "", False)
    last_extension = os.path.splitext(base)[1]
    extensions = ("", last_extension) if last_extension else ("",)  # the live name's extension, if it has one
    for separator in _TAG_START.finditer(base):
        stem_end, tag_start = separator.start(), separator.end()
        if stem_end == 0:
            continue
        if separator.group() != "_" and _LOGROTATE_TAG.fullmatch(base, tag_start):
            yield _Rotation(base[:stem_end], base[tag_start:], False)
        for extension in extensions:
            tag_end = len(base) - len(extension)
            live = base[:stem_end] + extension
            if (tag_end > tag_start and _DATE_TAG.fullmatch(base, tag_start, tag_end)
                    and os.path.splitext(live)[1] == extension):
                yield _Rotation(live, base[tag_start:tag_end], True)


def _without_gz(name: str) -> str:
    return name[:-len(".gz")] if name.endswith(".gz") else name


def _name_shape(name: str) -> str:
    """A rotated name with its digits masked and without `.gz`: rotations named alike have the same shape."""
    return re.sub(r"\d", "0", _without_gz(name))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _oldest_first(rotations: dict[Path, str]) -> list[Path]:
    """Rotated files oldest first: by rotation number (`.2` before `.1`), by date, or, where a log's rotated
    names mix the two, by modification time. A name and its `.gz` both there is the gzip being written: the
    plain file only."""
    kept = {p: tag for p, tag in rotations.items()
            if not (p.name.endswith(".gz") and p.with_name(p.name[:-len(".gz")]) in rotations)}
    numbered = [tag.isdigit() and len(tag) < 6 for tag in kept.values()]
    if all(numbered):
        return sorted(kept, key=lambda p: (-int(kept[p]), p.name))
    if not any(numbered):  # dates written alike or not (2026-11-24, 20261124) compare by their digits
        return sorted(kept, key=lambda p: (re.sub(r"\D", "", kept[p]), p.name))
    return sorted(kept, key=lambda p: (_mtime(p) or 0.0, p.name))


def _mtime(file: Path) -> float | None:
    try:
        return file.stat().st_mtime
    except OSError:
        return None


def _head_matches(file: Path, head: str, length: int) -> bool:
    """Whether `file` (decompressed if gzip) starts with the `length` bytes a cursor hashed as `head`."""
    try:
        fh, _ = _open(file)
    except SourceUnavailable:
        return False
    try:
        prefix = fh.read(length)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        return False
    finally:
        fh.close()
    return len(prefix) >= length and _head_hash(prefix, length) == head


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


def _head_hash(prefix: bytes, length: int) -> str:
    return _new_head_hasher(prefix[:length]).hexdigest()


def _new_head_hasher(data: bytes = b"") -> Any:
    return hashlib.blake2b(data, digest_size=8)


def _read_file(file: Path, offset: int, limit: int, newest: bool, head: tuple[str, int] | None = None,
               resume: bool = False) -> Iterator[Line]:
    """The lines of `file` from `offset`; with `resume`, the offset is a cursor's place in this file (checked
    against `head` when given) and the line starting there is marked `resumed`."""
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
            offset, resume = 0, False
        elif not gz and head is not None and head[1] and _head_hash(prefix, head[1]) != head[0]:
            log.warning("%s starts with other bytes than when the cursor was saved: replaced, reading it again", file)
            offset, resume = 0, False
        resumed_at = offset if resume else -1
        hasher, hashed, head_now = _new_head_hasher(), 0, {}  # the head grows line by line up to HEAD_BYTES

        def at(end: int) -> dict[str, Any]:
            nonlocal hashed, head_now
            if gz:
                return {"file": name, "offset": end}
            covered = min(end, len(prefix))
            if covered > hashed:
                hasher.update(prefix[hashed:covered])
                hashed, head_now = covered, {"head": hasher.hexdigest(), "head_bytes": covered}
            return {"file": name, "offset": end, **head_now}

        def line_at(start: int, data: bytes | None, error: str | None, cursor: dict[str, Any]) -> Line:
            if start == 0 and data is not None and data.startswith(UTF8_BOM):
                data = data[len(UTF8_BOM):]
            return Line(name, start, data, error, cursor, start == resumed_at)

        pos = offset
        try:
            if offset:
                fh.seek(offset)
            while True:
                line = fh.readline(limit + 2)
                if not line:
                    if gz:
                        yield line_at(pos, None, None, {"file": name, "offset": pos, "finished": True})
                    return
                end = pos + len(line)
                if line.endswith(b"\n"):
                    content = len(line) - (2 if line.endswith(b"\r\n") else 1)
                    if content > limit:
                        yield line_at(pos, None, _too_long(content, limit), at(end))
                    else:
                        yield line_at(pos, line, None, at(end))
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
                    yield line_at(pos, None, _too_long(size, limit), at(end))
                    pos = end
                    continue
                if newest and not gz:
                    return  # a partial last line: the writer may still be appending to it
                yield line_at(pos, line, None, at(end))
                pos = end
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            if not gz:
                raise SourceUnavailable(f"cannot read {file}: {exc}") from None
            reason = ("truncated gzip stream" if isinstance(exc, EOFError)
                      else f"corrupt gzip stream ({type(exc).__name__})")
            yield line_at(pos, None, reason, {"file": name, "offset": pos, "finished": True})
    finally:
        fh.close()


def _too_long(size: int, limit: int) -> str:
    return f"record of {size} bytes exceeds max_record_bytes={limit}"
