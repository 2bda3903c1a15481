"""SpikeNet: shapes, non-negativity, per-neuron weight sharing, causality of the windowing helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loopcast.config import ConfigError
from loopcast.models.spikenet import SpikeNet, SpikeNetConfig, causal_windows, gather_windows, n_parameters
from loopcast.models.zoo import MODELS, SPIKE_MODELS, build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> SpikeNet:
    torch.manual_seed(0)
    return SpikeNet(SpikeNetConfig(context=8, hidden=(16, 8))).eval()


def test_shapes_and_size(model: SpikeNet) -> None:
    assert model(torch.randn(3, 8, 17)).shape == (3, 1, 17)
    assert model(torch.randn(1, 8, 1)).shape == (1, 1, 1)
    assert n_parameters(model) == (8 + 1) * 16 + 16 + 16 * 8 + 8 + 8 + 1
    no_noise = SpikeNet(SpikeNetConfig(context=8, hidden=(16, 8), noise_input=False))
    assert n_parameters(no_noise) == n_parameters(model) - 16


def test_output_is_non_negative_even_for_extreme_inputs(model: SpikeNet) -> None:
    with torch.no_grad():
        x = torch.cat([torch.randn(2, 8, 50) * 5.0, torch.full((1, 8, 50), -10.0), torch.zeros(1, 8, 50)])
        y = model(x)
    assert torch.isfinite(y).all() and (y >= 0).all()


def test_neurons_are_independent_and_share_weights(model: SpikeNet) -> None:
    x = torch.randn(2, 8, 6)
    with torch.no_grad():
        y = model(x)
        alone = torch.cat([model(x[:, :, i:i + 1]) for i in range(6)], dim=2)
        x2 = x.clone()
        x2[:, :, 3] += 1.0                                  # change one neuron's window only
        y2 = model(x2)
    torch.testing.assert_close(y, alone)
    changed = (y2 - y).abs().amax(dim=(0, 1)) > 0
    assert changed.tolist() == [False, False, False, True, False, False]


def test_noise_feature_tracks_the_noise_level() -> None:
    net = SpikeNet(SpikeNetConfig(context=32))
    g = torch.Generator().manual_seed(1)
    quiet, loud = torch.randn(1, 32, 200, generator=g) * 0.01, torch.randn(1, 32, 200, generator=g) * 0.1
    assert (net.log_noise(loud) - net.log_noise(quiet)).median() == pytest.approx(np.log(10.0), abs=0.1)
    spike = quiet.clone()
    spike[:, -1] += 0.5                                     # a 50-sigma jump barely moves the winsorised estimate
    assert (net.log_noise(spike) - net.log_noise(quiet)).median() < np.log(1.25)


def test_causal_windows_hold_only_the_past() -> None:
    traces = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)     # value = 3 t + n
    w = causal_windows(traces, 4)
    assert w.shape == (7, 4, 3)
    for i in range(7):
        np.testing.assert_array_equal(w[i], traces[i:i + 4])         # window i ends at frame i + 3
    future = traces.copy()
    future[6:] = -1.0                                               # change frames 6..9
    np.testing.assert_array_equal(causal_windows(future, 4)[:3], w[:3])   # windows ending at t <= 5 unchanged
    with pytest.raises(ValueError, match="at least C=4"):
        causal_windows(traces[:3], 4)


def test_gather_windows_matches_causal_windows() -> None:
    traces = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    frames, neurons = np.array([3, 11, 7, 3]), np.array([0, 4, 2, 1])
    x = gather_windows(traces, frames, neurons, 4)
    assert x.shape == (1, 4, 4) and x.dtype == np.float32
    w = causal_windows(traces, 4)
    for b, (t, n) in enumerate(zip(frames, neurons)):
        np.testing.assert_array_equal(x[0, :, b], w[t - 3, :, n])
    with pytest.raises(ValueError, match="current frames"):
        gather_windows(traces, np.array([2]), np.array([0]), 4)     # window would start before frame 0
    with pytest.raises(ValueError, match="current frames"):
        gather_windows(traces, np.array([12]), np.array([0]), 4)


def test_output_at_t_ignores_later_frames(model: SpikeNet) -> None:
    traces = np.random.default_rng(2).normal(0, 0.1, size=(20, 7)).astype(np.float32)
    changed = traces.copy()
    changed[12:] += 1.0
    with torch.no_grad():
        a = model(torch.from_numpy(np.ascontiguousarray(causal_windows(traces, 8))))
        b = model(torch.from_numpy(np.ascontiguousarray(causal_windows(changed, 8))))
    torch.testing.assert_close(a[:5], b[:5])                        # windows ending at t = 7..11
    assert not torch.allclose(a[5:], b[5:])


def test_config_validation_and_registry() -> None:
    assert "spikenet" in SPIKE_MODELS and "spikenet" not in MODELS   # not a forecaster for [train]
    net = build_model("spikenet", {"context": 16, "hidden": [32], "activation": "gelu"})
    assert isinstance(net, SpikeNet) and net.config == SpikeNetConfig(16, (32,), activation="gelu")
    with pytest.raises(ConfigError, match="context"):
        build_model("spikenet", {"context": 1})
    with pytest.raises(ConfigError, match="activation"):
        build_model("spikenet", {"activation": "tanh"})
    with pytest.raises(ValueError, match="hidden"):
        SpikeNetConfig(hidden=())
