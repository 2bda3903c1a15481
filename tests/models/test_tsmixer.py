from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from loopcast.models.tsmixer import RevIN, TimeMix, TimeMixConfig, TSMixer, TSMixerConfig, count_parameters
from loopcast.offline_training.export.engine import INPUT_NAME, OUTPUT_NAME, export_onnx

torch.set_num_threads(1)


def _tsmixer(context: int = 4, horizon: int = 3, n: int = 11, **kw: Any) -> TSMixer:
    torch.manual_seed(0)
    return TSMixer(TSMixerConfig(context=context, horizon=horizon, n_neurons=n, mlp_dim=16, **kw))


def _timemix(context: int = 4, horizon: int = 3, **kw: Any) -> TimeMix:
    torch.manual_seed(0)
    return TimeMix(TimeMixConfig(context=context, horizon=horizon, **kw))


@pytest.mark.parametrize("revin", [False, True])
def test_shapes(revin: bool) -> None:
    x = torch.randn(2, 6, 11)
    assert _tsmixer(6, 5, 11, revin=revin)(x).shape == (2, 5, 11)
    tm = _timemix(6, 5, revin=revin)
    assert tm(x).shape == (2, 5, 11)
    assert tm(torch.randn(1, 6, 23)).shape == (1, 5, 23)  # any N


def test_time_only_flag_equals_alias() -> None:
    cfg = TimeMixConfig(context=8, horizon=2, n_blocks=3, revin=True)
    a = _timemix(8, 2, n_blocks=3, revin=True)
    torch.manual_seed(0)
    b = TSMixer(cfg.to_tsmixer())
    x = torch.randn(3, 8, 5)
    torch.testing.assert_close(a(x), b(x))
    assert count_parameters(a) == count_parameters(b)
    assert a.config == cfg and isinstance(b.config, TSMixerConfig) and b.config.time_only


def test_parameter_counts() -> None:
    n, c, h, m = 10, 4, 3, 16
    block = (2 * c + c * c + c) + (2 * c + n * m + m + m * n + n)
    assert count_parameters(_tsmixer(c, h, n)) == 2 * block + c * h + h
    assert count_parameters(_tsmixer(c, h, n, revin=True)) == 2 * block + c * h + h + 2 * n
    assert count_parameters(_timemix(c, h, revin=True)) == 2 * (2 * c + c * c + c) + c * h + h + 2


def test_presets() -> None:
    short = TSMixerConfig.short_context(n_neurons=100)
    assert (short.context, short.n_blocks, short.mlp_dim, short.revin) == (4, 2, 256, False)
    long = TSMixerConfig.long_context(n_neurons=100, horizon=32)
    assert (long.context, long.horizon, long.n_blocks, long.mlp_dim, long.revin) == (256, 32, 2, 128, True)


def test_revin_round_trip_is_identity() -> None:
    torch.manual_seed(0)
    revin = RevIN(7)
    with torch.no_grad():
        revin.weight.uniform_(0.5, 2.0)
        revin.bias.normal_()
    x = torch.randn(3, 9, 7) * 4 + 2
    z, mean, std = revin.normalise(x)
    torch.testing.assert_close(revin.denormalise(z, mean, std), x, atol=1e-5, rtol=1e-5)


def test_revin_model_is_shift_and_scale_equivariant() -> None:
    model = _tsmixer(6, 4, 9, revin=True).eval()
    x = torch.randn(2, 6, 9)
    shift, scale = torch.randn(1, 1, 9), 3.0
    torch.testing.assert_close(model(x * scale + shift), model(x) * scale + shift, atol=1e-4, rtol=1e-4)


def _cross_neuron_grad(model: nn.Module) -> torch.Tensor:
    x = torch.randn(1, 4, 6, requires_grad=True)
    model(x)[:, :, 0].sum().backward()
    assert x.grad is not None
    return x.grad[:, :, 1]


@pytest.mark.parametrize("revin", [False, True])
def test_feature_mixing_mixes_neurons(revin: bool) -> None:
    assert _cross_neuron_grad(_tsmixer(4, 3, 6, revin=revin)).abs().sum() > 0
    assert torch.equal(_cross_neuron_grad(_timemix(4, 3, revin=revin)), torch.zeros(1, 4))


@pytest.mark.parametrize("kwargs, match", [
    ({"context": 0, "horizon": 2, "n_neurons": 3}, "context"),
    ({"context": 4, "horizon": 0, "n_neurons": 3}, "horizon"),
    ({"context": 4, "horizon": 2, "n_neurons": 0}, "n_neurons"),
    ({"context": 4, "horizon": 2, "n_neurons": 3, "n_blocks": 0}, "n_blocks"),
    ({"context": 4, "horizon": 2, "n_neurons": 3, "mlp_dim": 0}, "mlp_dim"),
    ({"context": 4, "horizon": 2, "n_neurons": 3, "dropout": 1.0}, "dropout"),
    ({"context": 4, "horizon": 2, "n_neurons": -1, "time_only": True}, "n_neurons"),
])
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TSMixerConfig(**kwargs)


def test_timemix_config_validation() -> None:
    with pytest.raises(ValueError, match="n_blocks"):
        TimeMixConfig(n_blocks=0)
    with pytest.raises(ValueError, match="dropout"):
        TimeMixConfig(dropout=-0.1)


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


@pytest.mark.parametrize("variant", ["tsmixer", "timemix"])
def test_onnx_export_parity(variant: str, tmp_path: Path) -> None:
    n, c, h = 37, 8, 5
    model = (_tsmixer(c, h, n, revin=True) if variant == "tsmixer" else _timemix(c, h, revin=True)).eval()
    path = tmp_path / "model.onnx"
    dynamic_n = export_onnx(model, path, c, n)
    assert dynamic_n == (variant == "timemix")
    x = np.random.default_rng(0).normal(0, 0.3, size=(3, c, n)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort_run(path, x), want, atol=1e-5, rtol=0)
    if dynamic_n:
        x2 = np.random.default_rng(1).normal(size=(1, c, 70)).astype(np.float32)
        with torch.no_grad():
            want2 = model(torch.from_numpy(x2)).numpy()
        np.testing.assert_allclose(_ort_run(path, x2), want2, atol=1e-5, rtol=0)


def _ar_batch(gen: torch.Generator, c: int, h: int, n: int, batch: int = 32) -> tuple[torch.Tensor, ...]:
    """Windows of a noisy sinusoid per neuron (an AR(2) process plus noise): (B, C, N), (B, H, N)."""
    t = torch.arange(c + h, dtype=torch.float32)[None, :, None]
    freq = 0.2 + 0.3 * torch.rand(batch, 1, n, generator=gen)
    phase = 6.28 * torch.rand(batch, 1, n, generator=gen)
    series = torch.sin(freq * t + phase) + 0.05 * torch.randn(batch, c + h, n, generator=gen)
    return series[:, :c], series[:, c:]


@pytest.mark.parametrize("variant", ["tsmixer", "timemix"])
def test_training_reduces_mse(variant: str) -> None:
    c, h, n = 8, 2, 6
    model = _tsmixer(c, h, n) if variant == "tsmixer" else _timemix(c, h)
    gen = torch.Generator().manual_seed(0)
    x_val, y_val = _ar_batch(gen, c, h, n, batch=128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = nn.functional.mse_loss(model(x_val), y_val).item()
    for _ in range(50):
        x, y = _ar_batch(gen, c, h, n)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = nn.functional.mse_loss(model(x_val), y_val).item()
    assert after < 0.5 * before
