"""TorchCausalDff (CPU here; CUDA when a GPU is present) against the numpy causal reference."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loopcast.realtime.preprocess.dff import CausalDff, DffConfig, DffStats, causal_dff_reference  # noqa: E402
from loopcast.realtime.preprocess.dff_torch import TorchCausalDff  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture()
def fluorescence() -> np.ndarray:
    """(T, N) drifting baselines with transients and noise; some quantised (ties)."""
    rng = np.random.default_rng(2)
    t, n = 500, 24
    base = rng.uniform(100, 900, n) * (1 + 0.2 * np.sin(np.linspace(0, 3, t)))[:, None]
    f = base * (1 + (rng.random((t, n)) < 0.03)) + rng.normal(0, 5, (t, n))
    f[:, :3] = np.round(f[:, :3] / 20) * 20
    return f.astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_equals_the_causal_reference(fluorescence: np.ndarray, device: str) -> None:
    cfg = DffConfig(window=120, percentile=8.0)
    dff = TorchCausalDff(fluorescence.shape[1], cfg, device=device)
    fluorescence.setflags(write=False)                               # e.g. a shared-memory view
    out = np.stack([dff.process(row)[0].cpu().numpy() for row in fluorescence])   # wraps 4 times
    np.testing.assert_allclose(out, causal_dff_reference(fluorescence, cfg), rtol=0, atol=1e-6)
    assert dff.ready and dff.frames == len(fluorescence)


@pytest.mark.parametrize("device", DEVICES)
def test_repairs_and_counts_like_the_cpu_path(fluorescence: np.ndarray, device: str) -> None:
    f = fluorescence[:60].copy()
    f[[0, 7, 7, 30], [1, 2, 3, 3]] = [np.nan, np.inf, -np.inf, np.nan]
    f[20:, 5] = 0.0                                                  # floored baselines
    cfg = DffConfig(window=25, warmup=5)
    cpu, dev = CausalDff(f.shape[1], cfg), TorchCausalDff(f.shape[1], cfg, device=device)
    for row in f:
        (a, sa), (b, sb) = cpu.process(row), dev.process(torch.from_numpy(row))   # torch input
        assert isinstance(sb, DffStats) and sa == sb
        assert b.device.type == device and b.dtype == torch.float32
        np.testing.assert_allclose(b.cpu().numpy(), a, rtol=0, atol=1e-6)


def test_wrong_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected fluorescence of shape"):
        TorchCausalDff(3, DffConfig()).process(np.zeros(4, np.float32))
