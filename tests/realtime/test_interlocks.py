"""Each interlock in isolation, on an explicit clock (no sleeping)."""
from __future__ import annotations

from typing import Any

import pytest

from loopcast.realtime.control.interlocks import REASONS, InterlockConfig, Interlocks

pytestmark = pytest.mark.timeout(5)

S = 1_000_000_000  # ns per second
T0 = 1_700_000_000 * S


def armed(**kw: Any) -> Interlocks:
    """Armed interlocks with the given limits and everything else out of the way."""
    cfg: dict[str, Any] = dict(armed_at_start=True, min_interval_s=0.0, max_per_minute=1000,
                               max_forecast_age_s=0.5)
    cfg.update(kw)
    return Interlocks(InterlockConfig(**cfg))


def test_starts_disarmed_by_default() -> None:
    il = Interlocks()
    assert il.armed is False and il.check(T0, T0) == "disarmed"
    assert il.arm() is True
    assert il.check(T0, T0) is None


def test_armed_at_start() -> None:
    il = Interlocks(InterlockConfig(armed_at_start=True))
    assert il.armed and il.check(T0, T0) is None


def test_disarm_blocks() -> None:
    il = armed()
    il.disarm()
    assert il.check(T0, T0) == "disarmed"


def test_min_interval() -> None:
    il = armed(min_interval_s=2.0)
    il.record(T0)
    assert il.check(T0 + S, T0 + S) == "min_interval"
    assert il.check(T0 + 2 * S - 1, T0 + 2 * S - 1) == "min_interval"
    assert il.check(T0 + 2 * S, T0 + 2 * S) is None


def test_max_per_minute_is_a_sliding_window() -> None:
    il = armed(max_per_minute=3)
    for i in range(3):
        t = T0 + i * 10 * S
        assert il.check(t, t) is None
        il.record(t)
    t = T0 + 30 * S
    assert il.check(t, t) == "rate_limit"
    t = T0 + 60 * S  # the first trigger (T0) has left the 60 s window
    assert il.check(t, t) is None
    assert il.state()["triggers_last_minute"] == 2


def test_stale_forecast() -> None:
    il = armed(max_forecast_age_s=0.5)
    assert il.check(T0, T0 - S // 2) is None          # exactly at the limit is still fresh
    assert il.check(T0, T0 - S // 2 - 1) == "stale_forecast"
    assert il.check(T0, T0 + S) == "stale_forecast"   # from the future: clock not trusted


def test_estop_latches_until_reset() -> None:
    il = armed()
    il.stop()
    assert il.estop and not il.armed
    assert il.check(T0, T0) == "estop"
    assert il.arm() is False and il.check(T0, T0) == "estop"
    il.reset()
    assert not il.estop and il.check(T0, T0) == "disarmed"  # reset does not re-arm
    assert il.arm() is True and il.check(T0, T0) is None


def test_check_order_and_counts() -> None:
    il = Interlocks(InterlockConfig(min_interval_s=5.0))
    il.stop()
    assert il.check(T0, T0 - 10 * S) == "estop"       # estop wins over disarmed and stale
    il.reset()
    assert il.check(T0, T0 - 10 * S) == "disarmed"    # disarmed wins over stale
    il.arm()
    il.record(T0)
    assert il.check(T0 + S, T0 - 10 * S) == "stale_forecast"  # stale wins over min_interval
    state = il.state()
    assert state["suppressed"] == {"estop": 1, "disarmed": 1, "stale_forecast": 1}
    assert state["last_suppression"] == "stale_forecast" and state["triggers_sent"] == 1
    assert set(state["suppressed"]) <= set(REASONS)


@pytest.mark.parametrize("kw", [dict(min_interval_s=-1.0), dict(max_per_minute=0),
                                dict(max_forecast_age_s=0.0)])
def test_config_validation(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        InterlockConfig(**kw)
