"""Threshold policy semantics (above vs rising, lead selection), the activation policy (reductions,
window check) and neuron-set specs."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from loopcast.realtime.control.policy import (
    ActivationPolicy,
    PolicyConfig,
    PolicyError,
    ThresholdPolicy,
    build_policy,
    reduce_probabilities,
    resolve_neuron_set,
)
from loopcast.realtime.wire.codec import Forecast, ForecastHeader

pytestmark = pytest.mark.timeout(5)

N = 6
GROUPS = {"ensemble": np.array([0, 0, 1, 1, 1, 2])}


def forecast(values_by_lead: dict[int, float], n: int = N, model: str = "tsmixer", seq: int = 0,
             kind: str = "forecast") -> Forecast:
    """A forecast whose rows are constant: lead h -> value for every neuron."""
    leads = tuple(sorted(values_by_lead))
    data = np.stack([np.full(n, values_by_lead[h], dtype=np.float32) for h in leads])
    header = ForecastHeader(seq=seq, t_src_ns=time.time_ns(), model=model, engine_version="e1",
                            lead_times=leads, shape=data.shape, kind=kind)
    return Forecast(header=header, data=data, t_recv_ns=time.time_ns())


def policy(**kw: Any) -> ThresholdPolicy:
    cfg = PolicyConfig(**{"monitor": "ensemble:1", "targets": "indices:0,5", "level": 0.5, "lead": 1,
                          "mode": "rising", **kw})
    return build_policy(cfg, N, GROUPS)


def fired(p: ThresholdPolicy, values: list[float]) -> list[bool]:
    return [p.evaluate(forecast({1: v}, seq=i)) is not None for i, v in enumerate(values)]


def test_above_fires_on_every_forecast_over_the_level() -> None:
    assert fired(policy(mode="above"), [0.1, 0.6, 0.7, 0.5, 0.9]) == [False, True, True, False, True]


def test_rising_fires_only_on_crossings() -> None:
    # the first forecast is never a crossing; 0.5 is not above a 0.5 level
    assert fired(policy(mode="rising"), [0.9, 0.9, 0.1, 0.6, 0.7, 0.5, 0.8]) == \
        [False, False, False, True, False, False, True]


def test_decision_carries_forecast_and_stimulation() -> None:
    p = policy(mode="above", pattern="p1", power_mw=3.0, duration_ms=200.0, name="pol")
    d = p.evaluate(forecast({1: 0.8}, seq=42))
    assert d is not None
    assert (d.seq, d.model, d.engine_version, d.lead, d.policy) == (42, "tsmixer", "e1", 1, "pol")
    assert d.targets == (0, 5) and d.pattern == "p1" and d.power_mw == 3.0 and d.duration_ms == 200.0
    assert d.value == pytest.approx(0.8)
    cmd = d.command("tid", "rig7", 123)
    assert cmd.trigger_id == "tid" and cmd.rig == "rig7" and cmd.decision_time_ns == 123 and cmd.seq == 42


def test_lead_selection_reads_the_right_row() -> None:
    p = policy(mode="above", lead=3)
    assert p.evaluate(forecast({1: 0.9, 2: 0.9, 3: 0.1})) is None
    d = p.evaluate(forecast({1: 0.1, 2: 0.1, 3: 0.9}))
    assert d is not None and d.lead == 3 and d.value == pytest.approx(0.9)


def test_mean_over_monitored_neurons_only() -> None:
    p = policy(mode="above", monitor="ensemble:1")  # neurons 2, 3, 4
    f = forecast({1: 0.0})
    f.data[0, 2:5] = [0.3, 0.6, 0.9]   # mean 0.6 > 0.5; the others stay 0
    d = p.evaluate(f)
    assert d is not None and d.value == pytest.approx(0.6)


def test_missing_lead_and_neuron_mismatch_are_errors() -> None:
    p = policy(lead=4)
    with pytest.raises(PolicyError, match="lead_missing"):
        p.evaluate(forecast({1: 0.9, 2: 0.9}))
    with pytest.raises(PolicyError, match="neuron_count"):
        policy().evaluate(forecast({1: 0.9}, n=N + 1))
    loose = ThresholdPolicy(PolicyConfig(lead=1), np.array([0, 7]), np.array([1]))  # no n_neurons: index bound
    with pytest.raises(PolicyError, match="neuron_count"):
        loose.evaluate(forecast({1: 0.9}, n=7))


def test_nan_is_an_error_and_resets_rising_state() -> None:
    p = policy(mode="rising")
    assert p.evaluate(forecast({1: 0.1})) is None
    with pytest.raises(PolicyError, match="non_finite"):
        p.evaluate(forecast({1: float("nan")}))
    assert p.evaluate(forecast({1: 0.9})) is None  # no trusted "below" before this one


def test_model_filter_and_activation_messages_are_ignored() -> None:
    p = policy(mode="above", model="tsmixer")
    assert p.evaluate(forecast({1: 0.9}, model="linear")) is None
    assert p.evaluate(forecast({1: 0.9}, kind="activation")) is None
    assert p.evaluate(forecast({1: 0.9}, model="tsmixer")) is not None


@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2, 3, 4, 5]),
    ("ensemble:0", [0, 1]),
    ("ensemble:2", [5]),
    ("indices:4,1,1", [1, 4]),
    (" indices:0, 3 ", [0, 3]),
])
def test_neuron_set_specs(spec: str, expected: list[int]) -> None:
    got = resolve_neuron_set(spec, N, GROUPS)
    assert got.dtype == np.int64 and got.tolist() == expected


@pytest.mark.parametrize("spec, match", [
    ("ensemble:9", "selects no neurons"),
    ("indices:", "expected 'all'"),
    ("indices:1,x", "comma-separated integers"),
    ("indices:0,6", "out of range"),
    ("indices:-1", "out of range"),
    ("cluster:0", "unknown grouping"),
    ("ensemble:one", "group id must be an integer"),
    ("everything", "expected 'all'"),
])
def test_bad_neuron_set_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_neuron_set(spec, N, GROUPS)


def test_grouping_with_wrong_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        resolve_neuron_set("ensemble:0", N + 1, GROUPS)


@pytest.mark.parametrize("kw", [dict(lead=0), dict(duration_ms=0.0), dict(power_mw=-1.0),
                                dict(level=float("inf"))])
def test_policy_config_validation(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PolicyConfig(**kw)


# --- activation_threshold -------------------------------------------------------------------------------

def activation(probs: list[float] | float, window: int = 8, model: str = "quantformer", seq: int = 0,
               n: int = N) -> Forecast:
    """An activation message: (1, n) probabilities for a window of `window` frames."""
    row = np.full(n, probs, dtype=np.float32) if np.isscalar(probs) else np.asarray(probs, np.float32)
    data = row[None]
    header = ForecastHeader(seq=seq, t_src_ns=time.time_ns(), model=model, engine_version="qf/v0001",
                            lead_times=(window,), shape=data.shape, kind="activation")
    return Forecast(header=header, data=data, t_recv_ns=time.time_ns())


def act_policy(**kw: Any) -> ThresholdPolicy:
    cfg = PolicyConfig(**{"kind": "activation_threshold", "monitor": "ensemble:1", "targets": "indices:0,5",
                          "lead": 8, "level": 0.5, **kw})
    return build_policy(cfg, N, GROUPS)


P = [0.9, 0.9, 0.2, 0.5, 0.6, 0.0]   # monitored (ensemble 1): neurons 2, 3, 4 -> 0.2, 0.5, 0.6


@pytest.mark.parametrize("reduce, value", [("mean", (0.2 + 0.5 + 0.6) / 3), ("max", 0.6),
                                           ("any", 1 - 0.8 * 0.5 * 0.4)])
def test_activation_reductions_over_the_monitored_neurons(reduce: str, value: float) -> None:
    p = act_policy(reduce=reduce, mode="above", level=0.0)
    assert isinstance(p, ActivationPolicy)
    d = p.evaluate(activation(P))
    assert d is not None and d.value == pytest.approx(value) and d.lead == 8 and d.model == "quantformer"
    assert d.engine_version == "qf/v0001" and d.targets == (0, 5)


def test_any_handles_certain_and_impossible_neurons() -> None:
    assert reduce_probabilities(np.array([0.0, 1.0, 0.3]), "any") == pytest.approx(1.0)
    assert reduce_probabilities(np.zeros(3), "any") == 0.0
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_probabilities(np.zeros(3), "median")


def test_activation_above_and_rising() -> None:
    values = [0.1, 0.6, 0.7, 0.5, 0.9]
    above = act_policy(mode="above")
    assert [above.evaluate(activation(v, seq=i)) is not None for i, v in enumerate(values)] == \
        [False, True, True, False, True]
    rising = act_policy(mode="rising")
    assert [rising.evaluate(activation(v, seq=i)) is not None for i, v in enumerate([0.9, *values])] == \
        [False, False, True, False, False, True]


def test_activation_window_must_match_lead() -> None:
    p = act_policy(mode="rising")
    assert p.evaluate(activation(0.1)) is None
    with pytest.raises(PolicyError, match=r"window_mismatch: .*expects an activation window of 8 frames.*\[4\]"):
        p.evaluate(activation(0.9, window=4))
    assert p.evaluate(activation(0.9)) is None   # the unusable message reset the rising state


def test_activation_policy_reads_only_activation_messages_of_its_model() -> None:
    p = act_policy(mode="above", model="quantformer")
    assert p.evaluate(activation(0.9, model="other")) is None
    assert p.evaluate(forecast({8: 0.9}, model="quantformer")) is None
    assert p.evaluate(activation(0.9)) is not None


@pytest.mark.parametrize("probs, reason", [([0.1, 0.1, float("nan"), 0.1, 0.1, 0.1], "non_finite"),
                                           ([0.1, 0.1, 1.5, 0.1, 0.1, 0.1], "not_a_probability"),
                                           ([0.1, 0.1, -0.2, 0.1, 0.1, 0.1], "not_a_probability")])
def test_activation_values_must_be_probabilities(probs: list[float], reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        act_policy().evaluate(activation(probs))


def test_activation_neuron_count_is_checked() -> None:
    with pytest.raises(PolicyError, match="neuron_count: activation has 7 neurons"):
        act_policy().evaluate(activation(0.5, n=N + 1))


@pytest.mark.parametrize("kw", [dict(kind="trigger_happy"), dict(reduce="median")])
def test_policy_kind_and_reduce_are_validated(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        PolicyConfig(**kw)
