"""Causal spike inference, the context ring buffer, and segmentation -> traces."""
from __future__ import annotations

import numpy as np
import pytest

from loopcast.realtime.forecast.context import ContextBuffer
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.spikes.stage import CausalSpikes, SpikeConfig


def simulate(t: int, n: int, gamma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spikes = rng.poisson(0.08, size=(t, n)).astype(np.float32)
    calcium = np.zeros((t, n), np.float32)
    for i in range(1, t):
        calcium[i] = gamma * calcium[i - 1] + spikes[i]
    return spikes, (0.2 * calcium + rng.normal(0, 0.02, (t, n))).astype(np.float32)


def infer(dff: np.ndarray, cfg: SpikeConfig, dt: float = 0.9141) -> tuple[CausalSpikes, np.ndarray]:
    est = CausalSpikes(dff.shape[1], cfg, dt)
    return est, np.stack([est.process(row).count for row in dff])


def test_ar1_inversion_tracks_true_spikes_and_beats_first_difference() -> None:
    spikes, dff = simulate(600, 20, gamma=0.7, seed=0)
    cfg = SpikeConfig(warmup=100)
    est, counts = infer(dff, cfg)
    assert abs(np.median(est.decay) - 0.7) < 0.1   # per-neuron estimates on 100 frames are noisy
    s, c, d = spikes[cfg.warmup:], counts[cfg.warmup:], np.diff(dff, axis=0)[cfg.warmup - 1:]
    corr = np.mean([np.corrcoef(s[:, j], c[:, j])[0, 1] for j in range(s.shape[1])])
    naive = np.mean([np.corrcoef(s[:, j], np.maximum(d[:, j], 0))[0, 1] for j in range(s.shape[1])])
    assert corr > 0.7
    assert corr > naive


def test_warmup_outputs_zero_then_probabilities_in_range() -> None:
    _, dff = simulate(80, 5, gamma=0.6, seed=1)
    est = CausalSpikes(5, SpikeConfig(warmup=30), 0.9141)
    outs = [est.process(row) for row in dff]
    assert all(np.all(o.prob == 0) for o in outs[:30]) and est.ready
    probs = np.stack([o.prob for o in outs[30:]])
    assert probs.min() >= 0 and probs.max() < 1 and probs.max() > 0.1
    o = outs[-1]
    np.testing.assert_allclose(o.prob, 1 - np.exp(-o.rate_hz * 0.9141), atol=1e-6)


def test_fixed_tau_sets_decay() -> None:
    est, _ = infer(simulate(40, 3, 0.5, 2)[1], SpikeConfig(warmup=10, tau_decay_s=2.0))
    np.testing.assert_allclose(est.decay, np.exp(-0.9141 / 2.0), rtol=1e-6)


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown spike inference method"):
        SpikeConfig(method="cascade")


def test_context_window_is_chronological_and_contiguous() -> None:
    buf = ContextBuffer(3, 2)
    with pytest.raises(RuntimeError):
        buf.window()
    for i in range(7):
        buf.push(np.array([i, 10 * i], np.float32))
    w = buf.window()
    np.testing.assert_array_equal(w[:, 0], [4, 5, 6])
    assert w.flags["C_CONTIGUOUS"]


def test_trace_extractor_means_and_validation() -> None:
    seg = np.zeros((4, 3, 2), np.uint32)
    seg[0, 0, 0] = seg[1, 0, 0] = 1
    seg[3, 2, 1] = 2
    vol = np.arange(24, dtype=np.uint16).reshape(4, 3, 2)
    out = TraceExtractor(seg).process(vol)
    np.testing.assert_allclose(out, [(vol[0, 0, 0] + vol[1, 0, 0]) / 2, vol[3, 2, 1]])
    seg[3, 2, 1] = 3   # label 2 now has no voxels
    with pytest.raises(ValueError, match="without gaps"):
        TraceExtractor(seg)
