"""The interlocks hold for any input: property-based tests (hypothesis) on the controller's own decision path.

A session is drawn as an arbitrary interleaving of forecasts (any value: NaN, inf, huge; any seq; a source
time that is fresh, stale or from the future), operator commands (arm, disarm, stop, reset) and clock steps
(forward, and back as an NTP step would). It runs through `Controller.handle_forecast` and
`Controller.apply_control` with an explicit clock; the broker is replaced by a sink that acknowledges at once
(or after a drawn delay), because what is tested is the decision, not MQTT (tests/realtime/test_controller.py
drives the same paths over a real broker). After each session the triggers it sent are checked against every
limit, computed independently from the sent list, and against a model of arm/e-stop state.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopcast.realtime.control.controller import Controller, ControllerConfig
from loopcast.realtime.control.interlocks import REASONS, InterlockConfig, Interlocks
from loopcast.realtime.control.policy import PolicyConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.wire.codec import Forecast, ForecastHeader

S = 1_000_000_000
T0 = 1_800_000_000 * S
N = 6
PROFILE = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.9, 2.0, -1.0]))
AGES = st.one_of(st.floats(-0.6, 0.6), st.floats(-1e6, 1e6), st.sampled_from([0.0, 0.5, -0.5, 0.5000001]))
FORECAST = st.tuples(st.just("forecast"), VALUES, st.integers(0, 2**63 - 1), AGES, st.integers(0, 50_000_000))
CONTROL = st.tuples(st.just("control"), st.sampled_from(["arm", "disarm", "stop", "reset"]))
CLOCK = st.tuples(st.just("clock"), st.one_of(st.integers(0, 70 * S), st.integers(-5 * S, 0),
                                              st.sampled_from([S // 10, S, 2 * S, 60 * S])))
BURST = st.tuples(st.just("burst"), st.integers(1, 80), st.sampled_from([S // 20, S // 4, S, 3 * S]))  # n, gap
STEPS = st.lists(st.one_of(FORECAST, FORECAST, CONTROL, CLOCK, BURST), max_size=60)
LIMITS = st.fixed_dictionaries({
    "min_interval_s": st.sampled_from([0.0, 0.5, 2.0]), "max_per_minute": st.integers(1, 30),
    "max_forecast_age_s": st.sampled_from([0.1, 0.5, 2.0]), "max_light_s": st.sampled_from([0.0, 0.5, 1.0, 20.0]),
    "duty_window_s": st.sampled_from([1.0, 60.0]), "max_session_triggers": st.sampled_from([0, 1, 3, 2000]),
    "armed_at_start": st.booleans()})


@dataclass
class Clock:
    """The controller's explicit clock; `delay_ns` passes while a trigger waits for its PUBACK."""

    now: int = T0
    delay_ns: int = 0

    def __call__(self) -> int:
        return self.now


@dataclass
class Sink:
    """Stands in for the broker connection: every publish is acknowledged, after the clock's drawn delay."""

    clock: Clock
    published: list[tuple[str, int]] = field(default_factory=list)   # (topic, ack time)

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False) -> None:
        self.clock.now += self.clock.delay_ns
        self.published.append((topic, self.clock.now))


@dataclass(frozen=True)
class Sent:
    decision_ns: int
    ack_ns: int
    t_src_ns: int
    duration_s: float


def controller(limits: dict[str, Any], mode: str = "above") -> tuple[Controller, Clock, Sink]:
    policy = PolicyConfig(name="p", mode=mode, level=0.5, lead=1, duration_ms=500.0)   # type: ignore[arg-type]
    cfg = ControllerConfig(policy=policy, interlocks=InterlockConfig(**limits), watchdog_s=0.0)
    ctl = Controller(cfg, np.array([0, 1]), np.array([2, 3]), Metrics("prop", MetricsConfig(enabled=False)))
    clock = Clock()
    sink = Sink(clock)
    ctl.clock, ctl._client = clock, sink   # type: ignore[assignment]
    return ctl, clock, sink


def forecast(value: float, seq: int, t_src_ns: int) -> Forecast:
    data = np.full((2, N), value, dtype=np.float32)
    header = ForecastHeader(seq=seq, t_src_ns=t_src_ns, model="m", engine_version="m/v1", lead_times=(1, 2),
                            shape=data.shape)
    return Forecast(header=header, data=data, t_recv_ns=t_src_ns)


async def play(ctl: Controller, clock: Clock, steps: list[tuple[Any, ...]]) -> tuple[list[Sent], list[bool]]:
    """Run the steps; the triggers sent, and for each one whether the operator model allowed it."""
    sent: list[Sent] = []
    allowed: list[bool] = []
    armed, estop = ctl.interlocks.armed, False
    for step in steps:
        if step[0] == "burst":   # a run of fresh forecasts over the level, `gap` apart
            steps_in = [("clock", step[2]), ("forecast", 0.9, 7, 0.0, 0)] * step[1]
            more, ok = await play(ctl, clock, steps_in)
            sent += more
            allowed += [a and armed and not estop for a in ok]
            armed = armed and ctl.interlocks.armed
        elif step[0] == "clock":
            clock.now += step[1]
        elif step[0] == "control":
            assert ctl.apply_control(step[1]) == (step[1] != "arm" or not estop)
            armed, estop = model_control(step[1], armed, estop)
        else:
            _, value, seq, age_s, delay = step
            clock.delay_ns, t_src, t_dec = delay, clock.now - round(age_s * S), clock.now
            cmd = await ctl.handle_forecast(forecast(value, seq, t_src))
            if cmd is not None:
                sent.append(Sent(t_dec, clock.now, t_src, cmd.duration_ms / 1000))
                allowed.append(armed and not estop)
            armed = armed and ctl.interlocks.armed   # the controller may disarm itself, never arm itself
    return sent, allowed


def model_control(command: str, armed: bool, estop: bool) -> tuple[bool, bool]:
    """What an operator expects of each command: arm is refused while the e-stop latch holds."""
    if command == "arm":
        return armed if estop else True, estop
    if command == "stop":
        return False, True
    if command == "reset":
        return armed, False
    return False, estop


def check_limits(sent: list[Sent], cfg: InterlockConfig) -> None:
    """Every limit, from the sent list alone (times on the controller's clock)."""
    assert not cfg.max_session_triggers or len(sent) <= cfg.max_session_triggers
    for k, s in enumerate(sent):
        assert abs(s.decision_ns - s.t_src_ns) <= cfg.max_forecast_age_s * S, "stale forecast fired"
        before = sent[:k]
        if before:
            assert s.decision_ns - before[-1].ack_ns >= cfg.min_interval_s * S, "min_interval broken"
        in_minute = [b for b in before if b.ack_ns > s.decision_ns - 60 * S]
        assert len(in_minute) < cfg.max_per_minute, "rate limit broken"
        if cfg.max_light_s:
            light = sum(b.duration_s for b in before if b.ack_ns > s.decision_ns - cfg.duty_window_s * S)
            assert light + s.duration_s <= cfg.max_light_s + 1e-9, "duty limit broken"


@PROFILE
@given(limits=LIMITS, steps=STEPS, mode=st.sampled_from(["above", "rising"]))
def test_no_input_breaks_an_interlock(limits: dict[str, Any], steps: list[tuple[Any, ...]], mode: str) -> None:
    ctl, clock, sink = controller(limits, mode)
    sent, allowed = asyncio.run(play(ctl, clock, steps))
    assert all(allowed), "a trigger fired while the operator had it disarmed or e-stopped"
    check_limits(sent, ctl.cfg.interlocks)
    assert len([t for t, _ in sink.published if t.endswith("/trigger")]) == len(sent)
    assert ctl.interlocks.sent == len(sent)
    assert set(ctl.interlocks.suppressed) <= set(REASONS)


@PROFILE
@given(steps=STEPS)
def test_estop_latches_until_reset_then_arm(steps: list[tuple[Any, ...]]) -> None:
    """After `stop`, nothing fires and `arm` is refused until `reset`; after `reset` it stays disarmed."""
    ctl, clock, _ = controller({"armed_at_start": True, "min_interval_s": 0.0, "max_per_minute": 30,
                                "max_light_s": 0.0, "max_session_triggers": 0})
    ctl.apply_control("stop")
    asyncio.run(latched_run(ctl, clock, steps))


async def latched_run(ctl: Controller, clock: Clock, steps: list[tuple[Any, ...]]) -> None:
    latched = True
    for step in steps:
        if step[0] == "control":
            ok = ctl.apply_control(step[1])
            if step[1] == "arm" and latched:
                assert not ok and not ctl.interlocks.armed
            latched = latched and step[1] != "reset"
        elif step[0] == "forecast" and latched:
            assert await ctl.handle_forecast(forecast(0.9, 1, clock.now)) is None
    if latched:
        assert ctl.interlocks.estop and not ctl.interlocks.armed


@PROFILE
@given(light=st.floats(0.05, 5.0), window=st.floats(0.5, 120.0), durations=st.lists(st.floats(0.01, 5.0),
       max_size=40), gaps=st.lists(st.integers(0, 10 * S), max_size=40))
def test_duty_limit_alone(light: float, window: float, durations: list[float], gaps: list[int]) -> None:
    """The duty limit on its own, with any durations and gaps: light in any window never exceeds the limit."""
    il = Interlocks(InterlockConfig(armed_at_start=True, min_interval_s=0.0, max_per_minute=10_000,
                                    max_light_s=light, duty_window_s=window, max_session_triggers=0))
    now, fired = T0, []
    for dur, gap in zip(durations, gaps):
        now += gap
        if il.check(now, now, dur, "set") is None:
            il.record(now, dur, "set")
            fired.append((now, dur))
    for t, _ in fired:
        inside = sum(d for u, d in fired if t - window * S < u <= t)
        assert inside <= light + 1e-6
    assert math.isclose(il.light_ns(now, "set") / S, sum(d for u, d in fired if u > now - window * S), abs_tol=1e-6)


def test_duty_limit_is_per_target_set() -> None:
    il = Interlocks(InterlockConfig(armed_at_start=True, min_interval_s=0.0, max_light_s=1.0))
    il.record(T0, 1.0, (1, 2))
    assert il.check(T0 + S, T0 + S, 0.5, (1, 2)) == "duty_limit"
    assert il.check(T0 + S, T0 + S, 0.5, (3,)) is None
    assert il.check(T0 + 61 * S, T0 + 61 * S, 0.5, (1, 2)) is None   # the first has left the 60 s window


def test_session_cap_survives_reset_and_arm() -> None:
    il = Interlocks(InterlockConfig(armed_at_start=True, min_interval_s=0.0, max_session_triggers=2))
    for k in range(2):
        assert il.check(T0 + k * S, T0 + k * S) is None
        il.record(T0 + k * S)
    il.stop()
    il.reset()
    assert il.arm()
    assert il.check(T0 + 100 * S, T0 + 100 * S) == "session_cap"
    assert il.state()["session_cap"] == 2


@pytest.mark.parametrize("bad", [{"max_light_s": -1.0}, {"duty_window_s": 0.0}, {"max_session_triggers": -1},
                                 {"min_interval_s": math.nan}, {"max_light_s": math.inf}])
def test_bad_limits_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        InterlockConfig(**bad)
