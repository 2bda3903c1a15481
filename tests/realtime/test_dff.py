"""Online causal dF/F against the offline causal reference, warm-up, and bad values."""
from __future__ import annotations

import numpy as np
import pytest

from realtime.dff import CausalDff, DffConfig, causal_dff_reference, centered_dff


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
