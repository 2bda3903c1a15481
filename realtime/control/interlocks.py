"""Safety interlocks between a policy's wish to stimulate and an actual trigger.

Pure logic with an explicit clock: every time-dependent call takes `now_ns` (the controller passes
`time.time_ns()`, the same clock as the forecasts' `t_src_ns`), so tests never sleep. Checks run in a
fixed order and the first one that blocks names the reason:

1. `estop`           emergency stop latched (only `reset` clears it; `arm` is refused until then)
2. `disarmed`        not armed (the controller starts disarmed unless `armed_at_start`)
3. `stale_forecast`  the forecast's source time is older than `max_forecast_age_s` (or that far in
                     the future: a clock that cannot be trusted is treated like a stale one)
4. `min_interval`    less than `min_interval_s` since the last trigger (a clock that stepped back before
                     the last trigger blocks too, until it has passed it by `min_interval_s`)
5. `rate_limit`      `max_per_minute` triggers already sent in the last 60 s (sliding window)
6. `duty_limit`      this trigger's light would bring the target set's total stimulation time over the last
                     `duty_window_s` (sliding, by trigger start) above `max_light_s` (0 = no limit)
7. `session_cap`     `max_session_triggers` triggers already sent since the controller started (RTAOI caps a
                     session at 2,000 photostimulations; neither `reset` nor `arm` clears it: a new session
                     is a new controller process)

`record` is told of every trigger that was sent (at its PUBACK time, with its duration and target set);
the limits count those only.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

REASONS = ("estop", "disarmed", "stale_forecast", "min_interval", "rate_limit", "duty_limit", "session_cap")
_NS = 1_000_000_000
_WINDOW_NS = 60 * _NS


@dataclass(frozen=True)
class InterlockConfig:
    """Limits on when a trigger may be sent."""

    armed_at_start: bool = False
    min_interval_s: float = 2.0
    max_per_minute: int = 20
    max_forecast_age_s: float = 0.5
    max_light_s: float = 20.0            # stimulation time per target set per duty window (0 = no limit)
    duty_window_s: float = 60.0
    max_session_triggers: int = 2000     # per controller process (0 = no cap)

    def __post_init__(self) -> None:
        finite = (self.min_interval_s, self.max_forecast_age_s, self.max_light_s, self.duty_window_s)
        if not all(math.isfinite(v) for v in finite):
            raise ValueError(f"interlock times must be finite, got {finite}")
        if self.min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {self.min_interval_s}")
        if self.max_per_minute < 1:
            raise ValueError(f"max_per_minute must be >= 1, got {self.max_per_minute}")
        if self.max_forecast_age_s <= 0:
            raise ValueError(f"max_forecast_age_s must be > 0, got {self.max_forecast_age_s}")
        if self.max_light_s < 0 or self.duty_window_s <= 0:
            raise ValueError(f"need max_light_s >= 0 (0 = no limit) and duty_window_s > 0, got "
                             f"{self.max_light_s}, {self.duty_window_s}")
        if self.max_session_triggers < 0:
            raise ValueError(f"max_session_triggers must be >= 0 (0 = no cap), got {self.max_session_triggers}")

    def check_duration(self, duration_s: float) -> None:
        """A stimulation of `duration_s` must fit the duty limit on its own, or it could never fire."""
        if self.max_light_s and duration_s > self.max_light_s:
            raise ValueError(f"a {duration_s:g} s stimulation exceeds the duty limit max_light_s = "
                             f"{self.max_light_s:g} s per {self.duty_window_s:g} s: it could never fire")


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
        self._light: dict[Hashable, deque[tuple[int, int]]] = {}   # target set -> (start ns, duration ns)

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
    def check(self, now_ns: int, forecast_t_src_ns: int, duration_s: float = 0.0,
              targets: Hashable = ()) -> str | None:
        """None if a trigger of `duration_s` on the set `targets` may be sent now, else the reason it is
        blocked (also counted)."""
        reason = self._blocking_reason(now_ns, forecast_t_src_ns, duration_s, targets)
        if reason is not None:
            self.last_reason = reason
            self.suppressed[reason] += 1
        return reason

    def _blocking_reason(self, now_ns: int, t_src_ns: int, duration_s: float, targets: Hashable) -> str | None:
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
        if self.cfg.max_light_s and self.light_ns(now_ns, targets) + _ns(duration_s) > self.cfg.max_light_s * _NS:
            return "duty_limit"
        if self.cfg.max_session_triggers and self.sent >= self.cfg.max_session_triggers:
            return "session_cap"
        return None

    def record(self, now_ns: int, duration_s: float = 0.0, targets: Hashable = ()) -> None:
        """A trigger of `duration_s` on `targets` was sent (acknowledged) at `now_ns`."""
        self.last_trigger_ns = now_ns
        self._recent.append(now_ns)
        self._light.setdefault(targets, deque()).append((now_ns, _ns(duration_s)))
        self.sent += 1
        self._expire(now_ns)

    def light_ns(self, now_ns: int, targets: Hashable = ()) -> int:
        """Stimulation time of the triggers on `targets` that started in the duty window before `now_ns`."""
        starts = self._light.get(targets)
        if not starts:
            return 0
        horizon = now_ns - self.cfg.duty_window_s * _NS
        while starts and starts[0][0] <= horizon:
            starts.popleft()
        return sum(d for _, d in starts)

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
            "session_cap": self.cfg.max_session_triggers,
        }


def _ns(seconds: float) -> int:
    return round(seconds * _NS)
