"""Trigger policies: turn a forecast (or an activation prediction) into a wish to stimulate (a
`Decision`), or nothing. Two kinds (`PolicyConfig.kind`):

- `forecast_threshold`    the mean predicted dF/F of the monitored neurons at one lead time vs a level
- `activation_threshold`  a reduction of the monitored neurons' activation probabilities (kind
                          "activation" messages: P(response over the next H frames meets the engine's
                          criterion)) vs a probability level; `lead` must equal the message's window H

A policy only decides; whether a trigger is actually sent is up to the interlocks. Neuron sets
(what to monitor, what to stimulate) are written as specs and resolved once, at start-up, against
the rig's neuron count and its groupings (e.g. ensemble ids per neuron):

- `all`                every neuron
- `<group>:<k>`        neurons whose id in grouping `<group>` is k, e.g. `ensemble:0`
- `indices:1,2,3`      explicit 0-based neuron indices
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from loopcast.realtime.wire.codec import Forecast, TriggerCommand

POLICY_KINDS = ("forecast_threshold", "activation_threshold")
REDUCTIONS = ("mean", "max", "any")
PROB_TOLERANCE = 1e-6


@dataclass(frozen=True)
class PolicyConfig:
    """A threshold trigger policy and the stimulation it asks for."""

    name: str = "ensemble0-above"
    kind: Literal["forecast_threshold", "activation_threshold"] = "forecast_threshold"
    model: str = ""               # only messages from this model ("" = any)
    monitor: str = "ensemble:0"   # neuron set spec whose mean predicted dF/F (or probabilities) is watched
    lead: int = 2                 # forecast: lead time h read (1-based); activation: the window H expected
    level: float = 0.08           # threshold on the value (activation: a probability)
    reduce: Literal["mean", "max", "any"] = "mean"  # activation: how the monitored probabilities combine
    mode: Literal["above", "rising"] = "above"  # rising = only on a below->above crossing
    pattern: str = "ensemble-3"
    targets: str = "ensemble:3"   # neurons to stimulate, same spec syntax
    power_mw: float = 5.0
    duration_ms: float = 2000.0

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy kind must be one of {list(POLICY_KINDS)}, got {self.kind!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {self.reduce!r}")
        if self.lead < 1:
            raise ValueError(f"lead must be >= 1 (1-based lead time), got {self.lead}")
        if not math.isfinite(self.level):
            raise ValueError(f"level must be finite, got {self.level}")
        if self.power_mw < 0 or self.duration_ms <= 0:
            raise ValueError(f"need power_mw >= 0 and duration_ms > 0, got {self.power_mw}, {self.duration_ms}")


class PolicyError(ValueError):
    """A forecast the policy cannot evaluate; `reason` labels the error metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def resolve_neuron_set(spec: str, n_neurons: int, groups: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sorted unique 0-based neuron indices (int64) for a spec; ValueError on bad or empty sets."""
    if n_neurons < 1:
        raise ValueError(f"n_neurons must be >= 1, got {n_neurons}")
    text = spec.strip()
    if text == "all":
        return np.arange(n_neurons, dtype=np.int64)
    kind, sep, arg = text.partition(":")
    if not sep or not arg.strip():
        raise ValueError(f"neuron set {spec!r}: expected 'all', '<group>:<k>' or 'indices:i,j,...'")
    if kind == "indices":
        idx = _parse_ints(spec, arg)
        bad = idx[(idx < 0) | (idx >= n_neurons)]
        if bad.size:
            raise ValueError(f"neuron set {spec!r}: indices {bad[:5].tolist()} out of range [0, {n_neurons})")
    else:
        idx = _group_members(spec, kind, arg, n_neurons, groups)
    if idx.size == 0:
        raise ValueError(f"neuron set {spec!r} selects no neurons")
    return np.unique(idx).astype(np.int64)


def _parse_ints(spec: str, arg: str) -> np.ndarray:
    try:
        return np.array([int(x) for x in arg.split(",") if x.strip()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"neuron set {spec!r}: indices must be comma-separated integers") from None


def _group_members(spec: str, group: str, arg: str, n_neurons: int,
                   groups: Mapping[str, np.ndarray]) -> np.ndarray:
    if group not in groups:
        raise ValueError(f"neuron set {spec!r}: unknown grouping {group!r} (known: {sorted(groups)})")
    ids = np.asarray(groups[group])
    if ids.shape != (n_neurons,):
        raise ValueError(f"grouping {group!r} has shape {ids.shape}, expected ({n_neurons},)")
    try:
        k = int(arg)
    except ValueError:
        raise ValueError(f"neuron set {spec!r}: group id must be an integer") from None
    return np.flatnonzero(ids == k).astype(np.int64)


@dataclass(frozen=True)
class Decision:
    """The policy wants a trigger: what it saw and what it asks for."""

    value: float
    lead: int
    seq: int
    model: str
    engine_version: str
    policy: str
    pattern: str
    targets: tuple[int, ...]
    power_mw: float
    duration_ms: float

    def command(self, trigger_id: str, rig: str, decision_time_ns: int) -> TriggerCommand:
        """The wire command for this decision."""
        return TriggerCommand(
            trigger_id=trigger_id, rig=rig, pattern=self.pattern, targets=self.targets,
            power_mw=self.power_mw, duration_ms=self.duration_ms, seq=self.seq, model=self.model,
            engine_version=self.engine_version, decision_time_ns=decision_time_ns,
            policy=self.policy, value=self.value, lead=self.lead)


class ThresholdPolicy:
    """Fire when the mean predicted dF/F of the monitored neurons at one lead time passes a level.

    `above` fires on every forecast over the level; `rising` only on a crossing from a forecast at
    or below the level (the first forecast seen, or one after an unusable one, is never a crossing).
    """

    kind = "forecast"   # the message kind (header.kind) the policy reads

    def __init__(self, cfg: PolicyConfig, monitor: np.ndarray, targets: np.ndarray,
                 n_neurons: int | None = None) -> None:
        self.cfg = cfg
        self.monitor = np.asarray(monitor, dtype=np.int64)
        self.targets = tuple(int(t) for t in np.asarray(targets, dtype=np.int64))
        if self.monitor.size == 0 or not self.targets:
            raise ValueError("monitor and targets must be non-empty neuron sets")
        self.n_neurons = n_neurons
        self._needed = int(max(self.monitor.max(), max(self.targets))) + 1
        self._was_above: bool | None = None
        self.last_value: float | None = None   # of the last message evaluated; None when it was unusable

    def accepts(self, forecast: Forecast) -> bool:
        """Whether this message is one the policy reads (kind and model)."""
        h = forecast.header
        return h.kind == self.kind and (not self.cfg.model or h.model == self.cfg.model)

    def evaluate(self, forecast: Forecast) -> Decision | None:
        """A Decision if the policy wants a trigger; None otherwise. PolicyError if unusable."""
        if not self.accepts(forecast):
            return None
        try:
            value = self._value(forecast)
        except PolicyError:
            self._was_above = self.last_value = None
            raise
        above = value > self.cfg.level
        fire = above if self.cfg.mode == "above" else (above and self._was_above is False)
        self._was_above, self.last_value = above, value
        return self._decision(forecast, value) if fire else None

    def _check_neurons(self, forecast: Forecast) -> None:
        n = forecast.data.shape[1]
        if (self.n_neurons is not None and n != self.n_neurons) or n < self._needed:
            want = self.n_neurons if self.n_neurons is not None else f">= {self._needed}"
            raise PolicyError("neuron_count", f"{forecast.header.kind} has {n} neurons, policy needs {want}")

    def _value(self, forecast: Forecast) -> float:
        h, data = forecast.header, forecast.data
        if self.cfg.lead not in h.lead_times:
            raise PolicyError("lead_missing", f"lead {self.cfg.lead} not in forecast lead_times "
                              f"{list(h.lead_times)} (model {h.model})")
        self._check_neurons(forecast)
        row = data[h.lead_times.index(self.cfg.lead)]
        value = float(np.mean(row[self.monitor], dtype=np.float64))
        if not math.isfinite(value):
            raise PolicyError("non_finite", f"mean forecast of monitored neurons is {value}")
        return value

    def _decision(self, forecast: Forecast, value: float) -> Decision:
        h, c = forecast.header, self.cfg
        return Decision(value=value, lead=c.lead, seq=h.seq, model=h.model,
                        engine_version=h.engine_version, policy=c.name, pattern=c.pattern,
                        targets=self.targets, power_mw=c.power_mw, duration_ms=c.duration_ms)


class ActivationPolicy(ThresholdPolicy):
    """Fire when the monitored neurons' activation probabilities, reduced to one value, pass `level`.

    Reads kind "activation" messages (data (1, N): P(neuron's response over the next H frames meets the
    engine's criterion)); `lead` must equal the message's window H (lead_times[0]). Reductions:
    `mean` - the expected fraction of the monitored neurons that activate; `max` - the most likely
    one; `any` - P(at least one activates) = 1 - prod(1 - p), which assumes the neurons activate
    independently (they rarely do within an ensemble: read it as an upper bound). Same modes
    (above / rising) as ThresholdPolicy.
    """

    kind = "activation"

    def _value(self, forecast: Forecast) -> float:
        h = forecast.header
        if tuple(h.lead_times) != (self.cfg.lead,):
            raise PolicyError("window_mismatch", f"policy {self.cfg.name} expects an activation window of "
                              f"{self.cfg.lead} frames, model {h.model} predicts lead_times {list(h.lead_times)}")
        self._check_neurons(forecast)
        p = forecast.data[0, self.monitor].astype(np.float64)
        if not np.all(np.isfinite(p)):
            raise PolicyError("non_finite", f"activation probabilities of monitored neurons include "
                              f"{p[~np.isfinite(p)][0]}")
        if p.min() < -PROB_TOLERANCE or p.max() > 1 + PROB_TOLERANCE:
            raise PolicyError("not_a_probability", f"activation values outside [0, 1]: "
                              f"[{p.min():.4g}, {p.max():.4g}]")
        return reduce_probabilities(np.clip(p, 0.0, 1.0), self.cfg.reduce)


def reduce_probabilities(p: np.ndarray, how: str) -> float:
    """mean, max, or 1 - prod(1 - p) ('any', independence assumed, computed in log space) of p in [0, 1]."""
    if how == "mean":
        return float(p.mean())
    if how == "max":
        return float(p.max())
    if how == "any":
        with np.errstate(divide="ignore"):
            return float(-np.expm1(np.sum(np.log1p(-p))))
    raise ValueError(f"unknown reduction {how!r}; available: {list(REDUCTIONS)}")


def make_policy(cfg: PolicyConfig, monitor: np.ndarray, targets: np.ndarray,
                n_neurons: int | None = None) -> ThresholdPolicy:
    """The policy class `cfg.kind` names, on resolved neuron sets."""
    if cfg.kind == "forecast_threshold":
        return ThresholdPolicy(cfg, monitor, targets, n_neurons)
    if cfg.kind == "activation_threshold":
        return ActivationPolicy(cfg, monitor, targets, n_neurons)
    raise ValueError(f"unknown policy kind {cfg.kind!r}; available: {list(POLICY_KINDS)}")


def build_policy(cfg: PolicyConfig, n_neurons: int, groups: Mapping[str, np.ndarray]) -> ThresholdPolicy:
    """Resolve the config's neuron sets and build the policy its `kind` names."""
    monitor = resolve_neuron_set(cfg.monitor, n_neurons, groups)
    targets = resolve_neuron_set(cfg.targets, n_neurons, groups)
    return make_policy(cfg, monitor, targets, n_neurons)
