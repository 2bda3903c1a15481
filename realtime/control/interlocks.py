"""Safety interlocks between a policy's wish to stimulate and an actual trigger.

Pure logic with an explicit clock: every time-dependent call takes `now_ns` (the controller passes
`time.time_ns()`, the same clock as the forecasts' `t_src_ns`), so tests never sleep. Checks run in a
fixed order and the first one that blocks names the reason:

1. `estop`           emergency stop latched (only `reset` clears it; `arm` is refused until then)
2. `disarmed`        not armed (the controller starts disarmed unless `armed_at_start`)
3. `stale_forecast`  the forecast's source time is older than `max_forecast_age_s` (or that far in
                     the future: a clock that cannot be trusted is treated like a stale one)
4. `min_interval`    less than `min_interval_s` since the last trigger
5. `rate_limit`      `max_per_minute` triggers already sent in the last 60 s (sliding window)
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

REASONS = ("estop", "disarmed", "stale_forecast", "min_interval", "rate_limit")
_NS = 1_000_000_000
_WINDOW_NS = 60 * _NS


@dataclass(frozen=True)
class InterlockConfig:
    """Limits on when a trigger may be sent."""

    armed_at_start: bool = False
    min_interval_s: float = 2.0
    max_per_minute: int = 20
    max_forecast_age_s: float = 0.5

    def __post_init__(self) -> None:
        if self.min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {self.min_interval_s}")
        if self.max_per_minute < 1:
            raise ValueError(f"max_per_minute must be >= 1, got {self.max_per_minute}")
        if self.max_forecast_age_s <= 0:
            raise ValueError(f"max_forecast_age_s must be > 0, got {self.max_forecast_age_s}")


class Interlocks:
    """Arm/disarm/emergency-stop state plus the timing limits of `InterlockConfig`."""

    def __init__(self, cfg: InterlockConfig | None = None) -> None:
        self.cfg = cfg or InterlockConfig()
        self.armed = self.cfg.armed_at_start
        self.estop = False
        self.last_trigger_ns: int | None = None
        self.last_reason: str | None = None
        self.sent = 0
        self.suppressed: Counter[str] = Counter()
        self._recent: deque[int] = deque()

    # --- operator commands --------------------------------------------------------------------
    def arm(self) -> bool:
        """Arm; refused (returns False) while an emergency stop is latched."""
        if self.estop:
            return False
        self.armed = True
        return True

    def disarm(self) -> None:
        self.armed = False

    def stop(self) -> None:
        """Emergency stop: disarm and latch until `reset`."""
        self.estop = True
        self.armed = False

    def reset(self) -> None:
        """Clear the emergency-stop latch. Stays disarmed; trigger history (rate limits) is kept."""
        self.estop = False

    # --- per-trigger checks ---------------------------------------------------------------------
    def check(self, now_ns: int, forecast_t_src_ns: int) -> str | None:
        """None if a trigger may be sent now, else the reason it is blocked (also counted)."""
        reason = self._blocking_reason(now_ns, forecast_t_src_ns)
        if reason is not None:
            self.last_reason = reason
            self.suppressed[reason] += 1
        return reason

    def _blocking_reason(self, now_ns: int, t_src_ns: int) -> str | None:
        if self.estop:
            return "estop"
        if not self.armed:
            return "disarmed"
        if abs(now_ns - t_src_ns) > self.cfg.max_forecast_age_s * _NS:
            return "stale_forecast"
        if self.last_trigger_ns is not None and now_ns - self.last_trigger_ns < self.cfg.min_interval_s * _NS:
            return "min_interval"
        self._expire(now_ns)
        if len(self._recent) >= self.cfg.max_per_minute:
            return "rate_limit"
        return None

    def record(self, now_ns: int) -> None:
        """A trigger was sent (acknowledged) at `now_ns`."""
        self.last_trigger_ns = now_ns
        self._recent.append(now_ns)
        self.sent += 1
        self._expire(now_ns)

    def _expire(self, now_ns: int) -> None:
        while self._recent and self._recent[0] <= now_ns - _WINDOW_NS:
            self._recent.popleft()

    def state(self) -> dict[str, Any]:
        """Plain dict for the status topic."""
        return {
            "armed": self.armed,
            "estop": self.estop,
            "last_suppression": self.last_reason,
            "triggers_sent": self.sent,
            "suppressed": dict(self.suppressed),
            "last_trigger_ns": self.last_trigger_ns,
            "triggers_last_minute": len(self._recent),
        }
