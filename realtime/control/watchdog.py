"""The controller's watchdog: when forecasts stop while it is armed, it disarms.

Pure logic with an explicit clock (`time.monotonic()` in the controller). It fires only when all hold:
1. the controller is armed (`armed(now)` was called, `disarmed()` was not since);
2. at least one forecast arrived since that arm (an armed controller waiting for a pipeline that is still
   warming up is not a fault);
3. no forecast arrived for more than `timeout_s` (0 = off).
After it fires the controller stays disarmed until an operator arms it again.
"""
from __future__ import annotations


class Watchdog:
    """Fires when forecasts stop while armed (see the module docstring)."""

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s >= 0:
            raise ValueError(f"watchdog_s must be >= 0 (0 = off), got {timeout_s}")
        self.timeout_s = timeout_s
        self._armed_at: float | None = None
        self._last: float | None = None

    def armed(self, now: float) -> None:
        self._armed_at, self._last = now, None

    def disarmed(self) -> None:
        self._armed_at = self._last = None

    def forecast(self, now: float) -> None:
        if self._armed_at is not None:
            self._last = now

    def silent_for(self, now: float) -> float | None:
        """Seconds since the last forecast when the watchdog fires now, else None."""
        if not self.timeout_s or self._last is None or now - self._last <= self.timeout_s:
            return None
        return now - self._last
