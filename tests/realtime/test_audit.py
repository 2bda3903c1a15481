"""The controller's audit log: the writer and reader (realtime/record/audit.py) and the broken logs of
tests/broken/audit/ (a controller writing it: test_audit_controller.py)."""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast.config import ConfigError, from_dict
from loopcast.control import control_payload
from loopcast.realtime.control.controller import ControllerConfig
from loopcast.realtime.record.audit import AuditConfig, AuditError, AuditLog, read_audit
from loopcast.realtime.wire.codec import (
    WireError,
    parse_control,
    parse_control_message,
)

pytestmark = pytest.mark.timeout(30)

BROKEN = Path(__file__).resolve().parents[1] / "broken" / "audit"
TIMEOUT = 5.0
N = 4


# --- writer ---------------------------------------------------------------------------------------------
def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="fsync_interval_s must be >= 0"):
        AuditConfig(fsync_interval_s=-0.5)
    cfg = from_dict(ControllerConfig, {"audit": {"fsync_interval_s": 0, "file": "a.jsonl"}})
    assert cfg.audit == AuditConfig(enabled=True, file="a.jsonl", fsync_interval_s=0.0)
    with pytest.raises(ConfigError, match="audit"):
        from_dict(ControllerConfig, {"audit": {"fsync_interval_s": -1}})


def test_one_write_per_record_numpy_and_non_finite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jsonl"
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    with AuditLog(path, AuditConfig(fsync_interval_s=0)) as audit:
        monkeypatch.setattr(os, "write", counting_write)
        audit.write("start", rig="r0", monitor=np.arange(3), level=np.float32(0.5))
        audit.write("forecast", value=np.float32("nan"), seq=np.int64(7), ok=np.bool_(True),
                    rows=np.array([[1.5, np.inf]]), nested={"x": [float("-inf"), 2.0]})
        audit.write("stop", forecasts=1)
        monkeypatch.undo()
    assert len(writes) == 3 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    start, forecast, stop = lines(path)
    assert start["format"] == "loopcast-audit" and start["partial_line_before"] is False
    assert start["monitor"] == [0, 1, 2] and start["level"] == 0.5
    assert (start["v"], start["n"], forecast["n"], stop["n"]) == (1, 0, 1, 2)
    assert start["t_ns"] <= forecast["t_ns"] <= stop["t_ns"]
    assert forecast["value"] is None and forecast["seq"] == 7 and forecast["ok"] is True
    assert forecast["rows"] == [[1.5, None]] and forecast["nested"] == {"x": [None, 2.0]}
    assert read_audit(path).records == [start, forecast, stop]


def test_writer_rules(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="must be 'start'"):
        audit.write("forecast")
    audit.write("start")
    with pytest.raises(ValueError, match="reserved"):
        audit.write("forecast", n=3)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        audit.write("forecast", thing=object())
    audit.write("stop")
    with pytest.raises(BlockingIOError, match="in use by another process"):
        AuditLog(tmp_path / "a.jsonl")
    audit.close()
    audit.close()                                    # idempotent
    with pytest.raises(ValueError, match="closed"):
        audit.write("stop")
    assert [r["n"] for r in read_audit(tmp_path / "a.jsonl").records] == [0, 1]   # failed encodings took no n


def test_short_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:7]))   # 7 bytes a call
    with AuditLog(tmp_path / "a.jsonl") as audit:
        audit.write("start", rig="r0")
        audit.write("stop", sent=0)
    monkeypatch.undo()
    assert [r["kind"] for r in read_audit(tmp_path / "a.jsonl").records] == ["start", "stop"]


def test_failed_write_raises_and_leaves_a_reported_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as audit:
        audit.write("start")
        audit.write("forecast", seq=1)

        def full(fd: int, data: Any) -> int:
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space left"):
            audit.write("forecast", seq=2)
        monkeypatch.undo()
        audit.write("forecast", seq=3)
    read = read_audit(path)
    assert [r["n"] for r in read.records] == [0, 1, 3] and not read.truncated_tail
    assert len(read.problems) == 1 and "records n=2 missing" in read.problems[0] and ":3:" in read.problems[0]


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_fsync_thread_fsyncs_what_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:   # this log's file only: other threads of the process fsync too
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "a.jsonl"):
            synced.append(fd)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    audit = AuditLog(tmp_path / "a.jsonl", AuditConfig(fsync_interval_s=0.02))
    threads = [t for t in threading.enumerate() if t.name.startswith("audit-fsync")]
    assert len(threads) == 1 and threads[0].daemon
    time.sleep(0.1)
    assert synced == []                  # nothing written: nothing to sync
    audit.write("start")
    wait_until(lambda: len(synced) == 1)
    time.sleep(0.1)
    assert len(synced) == 1              # idle again: no fsync until the next record
    audit.write("stop")
    wait_until(lambda: len(synced) == 2)
    audit.close()
    assert len(synced) == 3 and not threads[0].is_alive()   # close: a last fsync, thread stopped


def test_interval_zero_fsyncs_every_record_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    with AuditLog(tmp_path / "a.jsonl", AuditConfig(fsync_interval_s=0)) as audit:
        assert not [t for t in threading.enumerate() if t.name.startswith("audit-fsync")]
        for i in range(5):
            audit.write("start" if i == 0 else "forecast", i=i)
            assert len(synced) == i + 1
    assert len(synced) == 6


def test_threads_writing_at_once_give_whole_numbered_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as audit:
        def writer(k: int) -> None:
            for i in range(200):
                audit.write("forecast", k=k, i=i, pad="x" * 500)
        audit.write("start")
        workers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    read = read_audit(path)
    assert [r["n"] for r in read.records] == list(range(801)) and not read.problems


def test_appending_sessions_and_a_killed_one(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as audit:
        audit.write("start", session=1)
        audit.write("stop")
    with AuditLog(path) as audit:                      # a second clean session
        audit.write("start", session=2)
        audit.write("forecast", seq=1)
    with open(path, "ab") as f:                        # a kill in the middle of a record
        f.write(b'{"v":1,"n":2,"kind":"forecast","t_ns":17')
    killed = read_audit(path)
    assert killed.truncated_tail and [r["n"] for r in killed.records] == [0, 1, 0, 1] and not killed.problems
    with AuditLog(path) as audit:                      # restarted on the same run directory
        audit.write("start", session=3)
    read = read_audit(path)
    assert not read.truncated_tail and [r.get("session") for r in read.records if r["kind"] == "start"] == [1, 2, 3]
    assert read.records[-1]["partial_line_before"] is True
    assert len(read.problems) == 1 and ":5: a record cut short" in read.problems[0]


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=re.escape(f"{tmp_path}/missing.jsonl: no such audit log")):
        read_audit(tmp_path / "missing.jsonl")
    with pytest.raises(AuditError, match="cannot read"):
        read_audit(tmp_path)
    assert issubclass(AuditError, ValueError)


def broken_cases() -> list[tuple[str, str, str]]:
    rows = re.findall(r"^\| `([^`]+)` \| ([a-z, ]+) \| `([^`]*)` \|$", (BROKEN / "README.md").read_text(), re.M)
    return [(name, result.strip(), fragment) for name, result, fragment in rows]


def test_every_broken_audit_log_has_its_readme_row() -> None:
    assert sorted(p.name for p in BROKEN.glob("*.jsonl")) == sorted(name for name, _, _ in broken_cases())


@pytest.mark.parametrize(("name", "result", "fragment"), broken_cases(), ids=[c[0] for c in broken_cases()])
def test_broken_audit_log_gives_its_result(name: str, result: str, fragment: str) -> None:
    path = BROKEN / name
    if result == "error":
        with pytest.raises(AuditError) as err:
            read_audit(path)
        assert name in str(err.value) and fragment in str(err.value), str(err.value)
        return
    read = read_audit(path)
    assert read.truncated_tail == (result == "reads, truncated")
    assert read.records and read.records[0]["kind"] == "start"
    if fragment:
        assert any(fragment in p for p in read.problems), read.problems
    else:
        assert read.problems == ()


# --- control messages -------------------------------------------------------------------------------------
def test_control_message_sender() -> None:
    msg = parse_control_message(control_payload("ARM"))
    assert msg.command == "arm" and msg.sender is not None and msg.sender.endswith("@" + os.uname().nodename
                                                                                    + " (loopcast control)")
    assert parse_control_message(b" stop\n").sender is None and parse_control(b'{"command": "reset"}') == "reset"
    assert parse_control_message('{"command": "disarm", "sender": 7}').sender is None
    assert len(parse_control_message(json.dumps({"command": "arm", "sender": "x" * 999})).sender or "") == 200
    with pytest.raises(WireError, match="malformed_control"):
        parse_control_message('{"command": "launch", "sender": "mallory"}')
