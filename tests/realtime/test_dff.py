"""Online causal dF/F against the offline causal reference, warm-up, bad values, and the fast paths."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from loopcast.realtime.preprocess.dff import CausalDff, DffConfig, causal_dff, causal_dff_reference, centered_dff


@pytest.fixture()
def fluorescence() -> np.ndarray:
    """(T, N) slowly drifting baselines with calcium-like transients and noise."""
    rng = np.random.default_rng(0)
    t, n = 700, 40
    base = rng.uniform(100, 900, n) * (1 + 0.2 * np.sin(np.linspace(0, 3, t))[:, None])
    spikes = rng.poisson(0.05, size=(t, n))
    calcium = np.zeros((t, n))
    for i in range(1, t):
        calcium[i] = 0.8 * calcium[i - 1] + spikes[i]
    return (base * (1 + 0.3 * calcium) + rng.normal(0, 5, (t, n))).astype(np.float32)


def run_online(f: np.ndarray, cfg: DffConfig) -> np.ndarray:
    dff = CausalDff(f.shape[1], cfg)
    return np.stack([dff.process(row)[0] for row in f])


def test_online_equals_offline_causal_reference(fluorescence: np.ndarray) -> None:
    cfg = DffConfig(window=200, percentile=8.0, warmup=10)
    online = run_online(fluorescence, cfg)   # 700 frames: the window wraps several times
    ref = causal_dff_reference(fluorescence, cfg)
    np.testing.assert_allclose(online, ref, rtol=0, atol=1e-6)


def test_causal_differs_from_centered_only_through_the_future(fluorescence: np.ndarray) -> None:
    cfg = DffConfig(window=200)
    causal = causal_dff_reference(fluorescence, cfg)
    centred = centered_dff(fluorescence, cfg)
    assert np.abs(causal - centred).mean() > 1e-4     # the definitions really differ
    assert np.abs(causal - centred).mean() < 0.1      # but describe the same signal


def test_centered_stride_approximation_is_close(fluorescence: np.ndarray) -> None:
    cfg = DffConfig(window=200)
    exact = centered_dff(fluorescence, cfg)
    approx = centered_dff(fluorescence, cfg, stride=8)
    err = np.abs(exact - approx)
    assert err.mean() < 0.005 and err.max() < 0.05


def test_warmup_flag_and_first_frame() -> None:
    dff = CausalDff(3, DffConfig(window=50, warmup=5))
    out, _ = dff.process(np.array([100.0, 200.0, 300.0], np.float32))
    np.testing.assert_array_equal(out, 0.0)   # F0 of one frame is that frame
    for _ in range(3):
        dff.process(np.full(3, 100.0, np.float32))
    assert not dff.ready
    dff.process(np.full(3, 100.0, np.float32))
    assert dff.ready


def test_zero_baseline_is_floored_not_divided_by_zero() -> None:
    cfg = DffConfig(window=20, warmup=1, min_baseline=1.0)
    dff = CausalDff(2, cfg)
    for _ in range(5):
        out, stats = dff.process(np.array([0.0, 100.0], np.float32))
    out, stats = dff.process(np.array([0.5, 100.0], np.float32))
    assert np.all(np.isfinite(out))
    assert out[0] == pytest.approx(0.5)   # (0.5 - 0) / max(0, 1.0)
    assert stats.floored == 1


def test_nonfinite_input_is_repaired_and_counted() -> None:
    dff = CausalDff(3, DffConfig(window=20, warmup=1))
    dff.process(np.array([100.0, 100.0, 100.0], np.float32))
    out, stats = dff.process(np.array([np.nan, np.inf, 120.0], np.float32))
    assert stats.nonfinite == 2
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:2], 0.0)   # repeats the last good sample
    f0 = np.percentile([100.0, 120.0], 8)
    assert out[2] == pytest.approx((120.0 - f0) / f0, rel=1e-5)


def test_saturated_values_are_clipped() -> None:
    cfg = DffConfig(window=20, warmup=1)
    dff = CausalDff(1, cfg)
    for _ in range(10):
        dff.process(np.array([100.0], np.float32))
    out, _ = dff.process(np.array([65535.0], np.float32))
    assert out[0] == pytest.approx(cfg.clip_max)


def test_wrong_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected fluorescence of shape"):
        CausalDff(3, DffConfig()).process(np.zeros(4, np.float32))


def test_running_and_naive_methods_are_identical(fluorescence: np.ndarray) -> None:
    f = fluorescence.copy()
    f[[3, 50, 51, 400], [0, 5, 5, 39]] = [np.nan, np.inf, -np.inf, np.nan]   # repaired the same way
    cfg = DffConfig(window=150, percentile=8.0, warmup=10)
    running, naive = CausalDff(f.shape[1], cfg), CausalDff(f.shape[1], replace(cfg, method="naive"))
    for row in f:
        (a, sa), (b, sb) = running.process(row), naive.process(row)
        np.testing.assert_array_equal(a, b)
        assert sa == sb
    assert running.ready and running.frames == naive.frames == len(f)


def test_unknown_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown dF/F method"):
        DffConfig(method="sorted")


def test_causal_dff_equals_reference_beyond_the_window() -> None:
    rng = np.random.default_rng(4)
    t, n = 1500, 30
    drift = 1 + 0.3 * np.sin(np.linspace(0, 6, t))[:, None]
    f = (rng.uniform(200, 800, n) * drift + rng.normal(0, 10, (t, n))).astype(np.float32)
    f[:, :4] = np.round(f[:, :4] / 25) * 25                 # quantised: many ties
    cfg = DffConfig()                                        # W = 400 < T = 1500
    np.testing.assert_array_equal(causal_dff(f, cfg), causal_dff_reference(f, cfg))


def test_causal_dff_repairs_like_the_online_path(fluorescence: np.ndarray) -> None:
    f = fluorescence[:120].copy()
    f[10, 3] = np.nan
    cfg = DffConfig(window=50)
    np.testing.assert_array_equal(causal_dff(f, cfg), run_online(f, cfg))


def test_centered_running_equals_direct_percentiles() -> None:
    rng = np.random.default_rng(5)
    drift = 50 * np.sin(np.linspace(0, 5, 90))[:, None]
    f = (500 + drift + rng.normal(0, 5, (90, 7))).astype(np.float32)
    cfg = DffConfig(window=20)
    for n_t in (90, 41, 15):                                 # T > 2W+1, T = 2W+1, T < W
        g = f[:n_t]
        f0 = np.stack([np.percentile(g[max(0, t - 20):t + 21], 8.0, axis=0) for t in range(n_t)])
        expect = np.clip((g - f0) / np.maximum(f0, 1.0), cfg.clip_min, cfg.clip_max)
        np.testing.assert_allclose(centered_dff(g, cfg), expect, rtol=1e-6, atol=1e-7)
    f[4, 2] = np.nan                                         # falls back to np.percentile (propagates)
    assert np.isnan(centered_dff(f, cfg)[:25, 2]).all()
