"""The controller's append-only audit log: one JSON record per line (format: docs/record.md, "The
controller's audit log").

Guarantees of the writer (`AuditLog`):

- every record is one compact JSON line written with ONE `write(2)` on a descriptor opened with `O_APPEND`,
  as soon as `write` is called: a process that is killed (SIGKILL) loses at most the record it was writing
  (its line may be cut short); every earlier line is in the kernel's page cache and reaches the disk;
- power loss: a daemon thread `fsync`s the file every `fsync_interval_s` seconds when something was written
  since the last one (0: `fsync` inline after every record), so a power cut loses at most that interval;
- nothing is swallowed: a failed write raises `OSError` to the caller; an `fsync` that failed on the thread
  is raised by the next `write` (or by `close`);
- one writer per file (an exclusive `flock`, released by the kernel when the process dies);
- a file is continued, never rewritten: a new session appends a `start` record (numbers `n` restart at
  0). When the file ends in a partial line (an earlier writer was killed mid-record) the new `start` is
  written after a newline, in the same `write`, and says `partial_line_before: true`, so a reader can tell
  the killed session's last line from corruption.

The reader (`read_audit`) accepts a last line without its newline that does not parse (the record being
written at a kill: dropped, `truncated_tail`) and a partial line directly before a `start` that says
`partial_line_before`; any other unreadable line, a record of another format version or a file that does
not begin with a `start` record is an `AuditError` naming the file and line. A gap in `n` within a session
(records whose write failed, or lines removed from the file) is not an error: the records that are there
are intact; it is reported in `AuditRead.problems`, naming the missing numbers.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.config import json_default

FORMAT = "loopcast-audit"
VERSION = 1
RESERVED = frozenset({"v", "n", "kind", "t_ns"})


@dataclass(frozen=True)
class AuditConfig:
    """The controller's audit log ([controller.audit]); the file lies in the run directory."""

    enabled: bool = True
    file: str = "controller.audit.jsonl"   # in the run directory
    fsync_interval_s: float = 1.0   # 0 = fsync after every record

    def __post_init__(self) -> None:
        if not self.fsync_interval_s >= 0:   # also rejects NaN
            raise ValueError(f"fsync_interval_s must be >= 0 (0 = fsync after every record), "
                             f"got {self.fsync_interval_s}")
        if not self.file:
            raise ValueError("audit file must be a file name (relative to the run directory)")


class AuditError(ValueError):
    """An audit log that cannot be read; the message names the file (and line)."""


# --- writing ------------------------------------------------------------------------------------------
class AuditLog:
    """Append-only JSON Lines writer: one `os.write` per record, `fsync` on a thread of its own."""

    def __init__(self, path: str | os.PathLike[str], cfg: AuditConfig | None = None) -> None:
        self.path = Path(path)
        self.cfg = cfg or AuditConfig()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise BlockingIOError(exc.errno, f"{self.path}: audit log in use by another process "
                                  f"(a second controller on this run directory?)") from None
        self._prefix = b"\n" if _ends_in_partial_line(self.path) else b""
        self._n = 0
        self._lock = threading.Lock()
        self._dirty = False
        self._error: OSError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.cfg.fsync_interval_s > 0:
            self._thread = threading.Thread(target=self._fsync_loop, name=f"audit-fsync-{self.path.name}",
                                            daemon=True)
            self._thread.start()

    @property
    def records_written(self) -> int:
        """Records numbered so far in this session (the next record's `n`)."""
        return self._n

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, kind: str, **fields: Any) -> None:
        """Append one record {v, n, kind, t_ns, **fields}; OSError if it could not be written."""
        if self._fd < 0:
            raise ValueError(f"{self.path}: write to a closed audit log")
        if self._error is not None:        # the fsync thread failed: say so now
            error, self._error = self._error, None
            raise error
        if fields.keys() & RESERVED:
            raise ValueError(f"audit record fields {sorted(fields.keys() & RESERVED)} are reserved")
        with self._lock:
            if self._n == 0 and kind != "start":
                raise ValueError(f"the first record of an audit log must be 'start', not {kind!r}")
            if kind == "start":
                fields = {"format": FORMAT, "partial_line_before": bool(self._prefix), **fields}
            line = encode_record({"v": VERSION, "n": self._n, "kind": kind, "t_ns": time.time_ns(), **fields})
            self._n += 1   # counted even if the write fails: a gap in n is a record that was lost
            self._write_all(self._prefix + line)
            self._prefix = b""
            self._dirty = True
        if self.cfg.fsync_interval_s == 0:
            self._dirty = False
            os.fsync(self._fd)

    def _write_all(self, data: bytes) -> None:
        """One os.write; loops only on a short write (a full disk, a signal)."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError:
                if len(view) < len(data):   # a partial line is in the file: start the next record on a new one
                    self._prefix = b"\n"
                raise
            view = view[written:]

    def _fsync_loop(self) -> None:
        while not self._stop.wait(self.cfg.fsync_interval_s):
            if self._dirty:
                self._dirty = False
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self._error = exc

    def close(self) -> None:
        """Stop the fsync thread, fsync and close the file. Idempotent."""
        if self._fd < 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_in_partial_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def encode_record(record: dict[str, Any]) -> bytes:
    """One compact JSON line (with its newline): numpy scalars and arrays as numbers and lists, NaN/inf as null."""
    try:
        text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=json_default)
    except ValueError:   # a non-finite float somewhere (rare): null it
        text = json.dumps(_finite(record), separators=(",", ":"), allow_nan=False, default=json_default)
    return text.encode() + b"\n"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return _finite(obj.tolist())
    return obj


# --- reading ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditRead:
    """An audit log's records in file order (several sessions: each begins with a `start` record)."""

    path: Path
    records: list[dict[str, Any]]
    truncated_tail: bool              # the last line was cut short (a kill while writing it): dropped
    problems: tuple[str, ...] = ()    # gaps in n and partial lines of earlier, killed sessions, in words


def read_audit(path: str | os.PathLike[str]) -> AuditRead:
    """Read and check an audit log; AuditError (naming the file and line) if it cannot be read as one."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"{p}: no such audit log") from None
    except OSError as exc:
        raise AuditError(f"{p}: cannot read the audit log: {exc}") from None
    if not raw:
        raise AuditError(f"{p}: empty file, not an audit log (no start record)")
    lines = raw.split(b"\n")
    complete = lines[-1] == b""
    if complete:
        lines.pop()
    reader = _Reader(p)
    truncated = False
    for lineno, line in enumerate(lines, 1):
        if lineno == len(lines) and not complete and _parse(line) is None:
            truncated = True
            break
        reader.line(lineno, line)
    reader.finish()
    if not reader.records:
        raise AuditError(f"{p}: holds no complete record (cut short while writing its start record)")
    return AuditRead(p, reader.records, truncated, tuple(reader.problems))


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:   # also UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) else None


class _Reader:
    """Checks records one line at a time: segments (sessions) begin at `start`, n is consecutive in each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.expected_n = 0
        self.pending: int | None = None   # line number of an unreadable line that may end a killed session

    def line(self, lineno: int, line: bytes) -> None:
        rec = _parse(line)
        if rec is None:
            if self.pending is not None or not self.records:
                self._unreadable(self.pending if self.pending is not None else lineno)
            self.pending = lineno
            return
        self._check(lineno, rec)
        if self.pending is not None:
            if not (rec["kind"] == "start" and rec.get("partial_line_before") is True):
                self._unreadable(self.pending)
            self.problems.append(f"{self.path}:{self.pending}: a record cut short (its session was killed "
                                 f"while writing it), dropped")
            self.pending = None
        self.records.append(rec)

    def finish(self) -> None:
        if self.pending is not None:
            self._unreadable(self.pending)

    def _unreadable(self, lineno: int) -> None:
        raise AuditError(f"{self.path}:{lineno}: not a JSON record (only the last line, cut short by a kill, "
                         f"may be unreadable)")

    def _check(self, lineno: int, rec: dict[str, Any]) -> None:
        where = f"{self.path}:{lineno}"
        if rec.get("v") != VERSION:
            raise AuditError(f"{where}: record format v={rec.get('v')!r}, written by another version of "
                             f"loopcast (this one reads v={VERSION})")
        n, kind = rec.get("n"), rec.get("kind")
        if not isinstance(n, int) or not isinstance(kind, str) or not isinstance(rec.get("t_ns"), int):
            raise AuditError(f"{where}: not an audit record (needs integer n and t_ns and a kind)")
        if kind == "start":
            if rec.get("format") != FORMAT:
                raise AuditError(f"{where}: start record of format {rec.get('format')!r}, not {FORMAT!r}")
            self.expected_n = 0
        elif not self.records:
            raise AuditError(f"{where}: first record is kind {kind!r}, not a 'start' record with format "
                             f"{FORMAT!r}: not a loopcast audit log")
        if n < self.expected_n:
            raise AuditError(f"{where}: record n={n} after n={self.expected_n - 1} without a start record "
                             f"(two writers, or lines out of order)")
        if n > self.expected_n:
            missing = str(self.expected_n) if n == self.expected_n + 1 else f"{self.expected_n}-{n - 1}"
            self.problems.append(f"{where}: records n={missing} missing before this one (lost writes)")
        self.expected_n = n + 1
