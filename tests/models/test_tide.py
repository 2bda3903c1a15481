from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.models.tide import TiDE, TiDEConfig
from loopcast.models.tsmixer import count_parameters
from loopcast.models.zoo import MODELS, build_model
from loopcast.offline_training.export.engine import quiet_exporter

torch.set_num_threads(1)


def _tide(context: int = 6, horizon: int = 4, k: int = 3, **kw: Any) -> TiDE:
    torch.manual_seed(0)
    kw = {"hidden": 32, "temporal_hidden": 16, **kw}
    return TiDE(TiDEConfig(context=context, horizon=horizon, n_covariates=k, **kw))


@pytest.mark.parametrize("b, c, n, h, k", [(2, 4, 11, 8, 26), (1, 6, 1, 3, 1), (3, 16, 40, 1, 5)])
@pytest.mark.parametrize("revin", [False, True])
def test_shapes(b: int, c: int, n: int, h: int, k: int, revin: bool) -> None:
    model = _tide(c, h, k, revin=revin, n_encoder=2, n_decoder=2)
    assert model(torch.randn(b, c, n), torch.randn(b, c + h, k)).shape == (b, h, n)


def test_any_n_same_weights_and_channel_independent() -> None:
    model = _tide(revin=True).eval()
    x, cov = torch.randn(2, 6, 30), torch.randn(2, 10, 3)
    y = model(x, cov)
    torch.testing.assert_close(model(x[..., :7], cov), y[..., :7])      # neurons do not interact
    torch.testing.assert_close(model(x[..., [4]], cov), y[..., [4]])
    assert count_parameters(model) == count_parameters(_tide(revin=True))  # no N anywhere


def test_shift_equivariance_and_revin_scale_equivariance() -> None:
    x, cov, shift = torch.randn(2, 6, 9), torch.randn(2, 10, 3), torch.randn(1, 1, 9)
    plain = _tide().eval()
    torch.testing.assert_close(plain(x + shift, cov), plain(x, cov) + shift, atol=1e-5, rtol=1e-5)
    revin = _tide(revin=True).eval()
    torch.testing.assert_close(revin(3.0 * x + shift, cov), 3.0 * revin(x, cov) + shift,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("field", ["context", "horizon", "n_covariates", "hidden", "decoder_dim",
                                   "covariate_dim", "n_encoder", "n_decoder", "temporal_hidden"])
def test_config_validation(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        kwargs: dict[str, Any] = {field: 0}
        TiDEConfig(**kwargs)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_dropout_validation(dropout: float) -> None:
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        TiDEConfig(dropout=dropout)


def test_registry() -> None:
    assert "tide" in MODELS
    model = build_model("tide", {"context": 8, "horizon": 2, "n_covariates": 4, "hidden": 16})
    assert isinstance(model, TiDE) and model.uses_covariates
    assert model.config == TiDEConfig(context=8, horizon=2, n_covariates=4, hidden=16)
    assert model(torch.randn(1, 8, 5), torch.randn(1, 10, 4)).shape == (1, 2, 5)


def _pulse_batch(gen: torch.Generator, c: int, h: int, n: int, k: int,
                 batch: int = 64) -> tuple[torch.Tensor, ...]:
    """Neurons respond to covariate 0 (sparse pulses, per-neuron gain); the rest are distractors.

    Returns the context (B, C, N), the covariates (B, C + H, K) and the future target (B, H, N).
    """
    cov = (torch.rand(batch, c + h, k, generator=gen) < 0.25).float()
    gain = 0.5 + torch.rand(batch, 1, n, generator=gen)
    level = torch.randn(batch, 1, n, generator=gen)
    series = level + gain * cov[:, :, :1] + 0.05 * torch.randn(batch, c + h, n, generator=gen)
    return series[:, :c], cov, series[:, c:]


def _fit(model: nn.Module, gen: torch.Generator, covariates: bool, steps: int = 300) -> None:
    c, h, n, k = 6, 4, 8, 3
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x, cov, y = _pulse_batch(gen, c, h, n, k)
        pred = model(x, cov) if covariates else model(x)
        loss = nn.functional.l1_loss(pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_future_covariates_are_used() -> None:
    tide, nlinear = _tide(6, 4, 3), NLinear(NLinearConfig(context=6, horizon=4))
    _fit(tide, torch.Generator().manual_seed(1), covariates=True)
    _fit(nlinear, torch.Generator().manual_seed(1), covariates=False)
    x, cov, y = _pulse_batch(torch.Generator().manual_seed(2), 6, 4, 8, 3, batch=256)
    shuffled = torch.cat([cov[:, :6], cov[torch.randperm(256), 6:]], dim=1)  # wrong future stimulus
    tide.eval()
    with torch.no_grad():
        mae_tide = nn.functional.l1_loss(tide(x, cov), y).item()
        mae_nlinear = nn.functional.l1_loss(nlinear(x), y).item()
        mae_shuffled = nn.functional.l1_loss(tide(x, shuffled), y).item()
    assert mae_tide < 0.5 * mae_nlinear, (mae_tide, mae_nlinear)
    assert mae_tide < 0.5 * mae_shuffled, (mae_tide, mae_shuffled)


def _export(model: nn.Module, path: Path, c: int, h: int, k: int) -> None:
    batch, neurons = torch.export.Dim("batch"), torch.export.Dim("neurons")
    example = (torch.zeros(2, c, 7), torch.zeros(2, c + h, k))
    with quiet_exporter():
        torch.onnx.export(model, example, str(path), input_names=["context", "covariates"],
                          output_names=["forecast"], dynamic_shapes=({0: batch, 2: neurons}, {0: batch}),
                          dynamo=True, external_data=False, verbose=False)


@pytest.mark.filterwarnings("ignore:.*axis name:UserWarning")  # the batch Dim is shared on purpose
@pytest.mark.parametrize("revin", [False, True])
def test_onnx_export_parity(revin: bool, tmp_path: Path) -> None:
    c, h, k = 8, 5, 26
    model = _tide(c, h, k, revin=revin, n_encoder=2).eval()
    path = tmp_path / "tide.onnx"
    _export(model, path, c, h, k)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, n in [(3, 37), (1, 70)]:
        x = rng.normal(0, 0.3, size=(b, c, n)).astype(np.float32)
        cov = (rng.random((b, c + h, k)) < 0.2).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x), torch.from_numpy(cov)).numpy()
        got = session.run(["forecast"], {"context": x, "covariates": cov})[0]
        assert got.shape == (b, h, n)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
