from __future__ import annotations

import pytest
import torch

from loopcast.config import ConfigError
from loopcast.models.baselines import LastValue, MeanBaseline, MeanBaselineConfig
from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.models.zoo import MODELS, build_model

torch.set_num_threads(1)


def test_nlinear_shapes() -> None:
    model = NLinear(NLinearConfig(context=4, horizon=8))
    assert model(torch.randn(3, 4, 17)).shape == (3, 8, 17)
    assert sum(p.numel() for p in model.parameters()) == 4 * 8 + 8


def test_nlinear_with_zero_layer_is_last_value() -> None:
    model = NLinear(NLinearConfig(context=5, horizon=3))
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
    x = torch.randn(2, 5, 7)
    torch.testing.assert_close(model(x), LastValue(model.config)(x))  # type: ignore[arg-type]
    assert torch.equal(model(x)[:, 2], x[:, -1])


def test_nlinear_with_uniform_layer_is_mean() -> None:
    model = NLinear(NLinearConfig(context=4, horizon=6))
    with torch.no_grad():
        model.linear.weight.fill_(0.25)
        model.linear.bias.zero_()
    x = torch.randn(2, 4, 9)
    expected = MeanBaseline(MeanBaselineConfig(context=4, horizon=6))(x)
    torch.testing.assert_close(model(x), expected)


def test_nlinear_shares_weights_across_neurons() -> None:
    torch.manual_seed(0)
    model = NLinear(NLinearConfig(context=4, horizon=2))
    x = torch.randn(1, 4, 5)
    y = model(x)
    swapped = model(x[:, :, [1, 0, 2, 3, 4]])
    torch.testing.assert_close(swapped[:, :, 0], y[:, :, 1])


def test_baselines() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)  # (B, C, N)
    mean = MeanBaseline(MeanBaselineConfig(context=4, horizon=2))(x)
    assert mean.shape == (1, 2, 3)
    torch.testing.assert_close(mean[0, 1], x[0].mean(dim=0))
    last = build_model("last", {"context": 4, "horizon": 5})(x)
    assert last.shape == (1, 5, 3) and torch.equal(last[0, 4], x[0, 3])


def test_build_model_is_strict() -> None:
    assert set(MODELS) >= {"nlinear", "mean", "last"}
    model = build_model("nlinear", {"context": 6, "horizon": 2})
    assert isinstance(model, NLinear) and model.config == NLinearConfig(6, 2)
    with pytest.raises(ConfigError, match="contxt"):
        build_model("nlinear", {"contxt": 4})
    with pytest.raises(ConfigError, match="horizon"):
        build_model("nlinear", {"horizon": "8"})
    with pytest.raises(ConfigError):
        build_model("nlinear", {"context": 0})
    with pytest.raises(KeyError, match="unknown model"):
        build_model("tsmixer-xl", {})
