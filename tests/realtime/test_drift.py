"""The drift interlock (realtime/control/drift.py): its rules, the forecast header's `registration`, and the
controller disarming on drift through `Controller.handle_forecast` with an explicit clock and the audit log
(tests/realtime/test_controller.py drives the status topic over a real broker)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast.realtime.control.controller import Controller, ControllerConfig
from loopcast.realtime.control.drift import DriftConfig, drift_cause
from loopcast.realtime.control.interlocks import InterlockConfig
from loopcast.realtime.control.policy import PolicyConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.record.audit import read_audit
from loopcast.realtime.wire.codec import Forecast, ForecastHeader, WireError, decode_forecast, encode_forecast

N = 4


def test_each_rule_names_its_cause() -> None:
    cfg = DriftConfig(max_shift=(2.0, 2.0, 1.0), min_confidence=7.0)
    assert drift_cause(cfg, (1.9, -1.9, 0.9, 20.0)) is None
    assert drift_cause(cfg, ()) is None                                  # no registration, not required
    assert "in x" in (drift_cause(cfg, (2.1, 0.0, 0.0, 20.0)) or "")
    assert "in y" in (drift_cause(cfg, (0.0, -2.5, 0.0, 20.0)) or "")
    assert "in z" in (drift_cause(cfg, (0.0, 0.0, 1.2, 20.0)) or "")
    assert "confidence 6.9" in (drift_cause(cfg, (0.0, 0.0, 0.0, 6.9)) or "")
    assert "no registration" in (drift_cause(DriftConfig(require=True), ()) or "")


def test_zero_turns_a_rule_off_and_bad_limits_are_refused() -> None:
    off = DriftConfig(max_shift=(0.0, 0.0, 0.0), min_confidence=0.0)
    assert drift_cause(off, (50.0, -50.0, 9.0, 0.1)) is None
    for bad in ({"max_shift": (1.0, -1.0, 1.0)}, {"max_shift": (1.0, 1.0)}, {"min_confidence": float("nan")},
                {"max_shift": (float("inf"), 1.0, 1.0)}):
        with pytest.raises(ValueError, match="controller.drift"):
            DriftConfig(**bad)


def header(registration: Any = (), seq: int = 1, t_src_ns: int = 0) -> ForecastHeader:
    return ForecastHeader(seq=seq, t_src_ns=t_src_ns, model="m", engine_version="m/v1", lead_times=(1, 2),
                          shape=(2, N), registration=registration)


def test_the_header_carries_registration_and_refuses_a_broken_one() -> None:
    data = np.zeros((2, N), np.float32)
    got = decode_forecast(encode_forecast(header((0.5, -1.25, 0.0, 12.0)), data)).header.registration
    assert got == (0.5, -1.25, 0.0, 12.0)
    assert decode_forecast(encode_forecast(header(), data)).header.registration == ()
    for bad in ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, float("nan")], [True, 0.0, 0.0, 9.0], "1,2,3,4", [1, 2, 3, "4"]):
        parts = encode_forecast(header(), data)
        parts[1] = parts[1].replace(b"\xacregistration\x90", _packed_registration(bad))
        with pytest.raises(WireError) as err:
            decode_forecast(parts)
        assert err.value.reason == "bad_registration"


def _packed_registration(value: Any) -> bytes:
    import msgpack
    return msgpack.packb("registration") + msgpack.packb(value)


class Clock:
    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now


class Sink:
    """Stands in for the broker: every publish is acknowledged at once and kept."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False) -> None:
        self.published.append(topic)


def armed_controller(tmp_path: Path, drift: DriftConfig) -> tuple[Controller, Clock, Sink]:
    policy = PolicyConfig(name="p", mode="above", level=0.5, lead=1, duration_ms=100.0)
    cfg = ControllerConfig(policy=policy, watchdog_s=0.0, drift=drift,
                           interlocks=InterlockConfig(armed_at_start=True, min_interval_s=0.0, max_per_minute=1000))
    ctl = Controller(cfg, np.array([0, 1]), np.array([2, 3]), Metrics("drift", MetricsConfig(enabled=False)),
                     audit_path=tmp_path / "audit.jsonl")
    clock, sink = Clock(), Sink()
    ctl.clock, ctl._client = clock, sink   # type: ignore[assignment]
    return ctl, clock, sink


def forecast(seq: int, clock: Clock, registration: tuple[float, ...]) -> Forecast:
    return Forecast(header=header(registration, seq, clock.now), data=np.full((2, N), 0.9, np.float32),
                    t_recv_ns=clock.now)


def test_the_controller_disarms_on_drift_until_armed_again(tmp_path: Path) -> None:
    ctl, clock, _ = armed_controller(tmp_path, DriftConfig(max_shift=(2.0, 2.0, 1.0), min_confidence=7.0))

    async def session() -> list[bool]:
        sent = []
        for seq, reg in enumerate([(0.3, 0.1, 0.0, 15.0), (2.6, 0.1, 0.0, 15.0), (0.2, 0.0, 0.0, 15.0)]):
            clock.now += 10**8
            sent.append(await ctl.handle_forecast(forecast(seq, clock, reg)) is not None)
        return sent

    assert asyncio.run(session()) == [True, False, False]        # disarmed at the jump; stays disarmed
    assert not ctl.interlocks.armed and "moved +2.60 voxels in x" in (ctl.last_disarm or "")
    assert ctl.metrics.count("loopcast_errors_total", kind="drift") == 1
    status = ctl.status()
    assert status["registration"] == {"seq": 2, "shift": [0.2, 0.0, 0.0], "confidence": 15.0}
    assert ctl.apply_control("arm")

    async def low_confidence_then_good() -> list[bool]:
        clock.now += 10**8
        low = await ctl.handle_forecast(forecast(3, clock, (0.0, 0.0, 0.0, 5.0))) is not None
        ctl.apply_control("arm")
        clock.now += 10**8
        return [low, await ctl.handle_forecast(forecast(4, clock, (0.1, 0.0, 0.0, 14.0))) is not None]

    assert asyncio.run(low_confidence_then_good()) == [False, True]
    assert ctl.metrics.count("loopcast_errors_total", kind="drift") == 2
    recs = read_audit(tmp_path / "audit.jsonl").records
    drift_states = [r for r in recs if r["kind"] == "state" and r["event"] == "disarmed"]
    assert [r["cause"].split(":")[0] for r in drift_states] == ["drift", "drift"]
    assert "at seq 1" in drift_states[0]["cause"] and "confidence 5.0" in drift_states[1]["cause"]
    seen = [(r["seq"], r["decision"], r["registration"]) for r in recs if r["kind"] == "forecast"]
    assert seen[1] == (1, "suppressed", [2.6, 0.1, 0.0, 15.0]) and seen[-1][1] == "sent"


def test_a_required_registration_that_is_missing_disarms(tmp_path: Path) -> None:
    ctl, clock, sink = armed_controller(tmp_path, DriftConfig(require=True))
    assert asyncio.run(ctl.handle_forecast(forecast(0, clock, ()))) is None
    assert not ctl.interlocks.armed and "no registration" in (ctl.last_disarm or "")
    assert not [t for t in sink.published if t.endswith("/trigger")]
