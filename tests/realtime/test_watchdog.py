"""The controller's watchdog (realtime/control/watchdog.py): pure logic on an explicit clock."""
from __future__ import annotations

import pytest

from loopcast.realtime.control.watchdog import Watchdog


def test_fires_only_after_forecasts_came_since_the_arm_and_then_stopped() -> None:
    w = Watchdog(2.0)
    w.forecast(0.0)                       # not armed: ignored
    w.armed(1.0)
    assert w.silent_for(100.0) is None    # armed, no forecast since: waiting for the pipeline is no fault
    w.forecast(10.0)
    assert w.silent_for(12.0) is None     # exactly the timeout: not yet
    assert w.silent_for(12.5) == pytest.approx(2.5)
    w.disarmed()
    assert w.silent_for(50.0) is None
    w.armed(60.0)
    assert w.silent_for(70.0) is None     # a new arm forgets the forecasts before it


def test_zero_is_off_and_negative_is_refused() -> None:
    w = Watchdog(0.0)
    w.armed(0.0)
    w.forecast(1.0)
    assert w.silent_for(1e9) is None
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="watchdog_s"):
            Watchdog(bad)
