from __future__ import annotations

from typing import Any

import pytest
import torch

from loopcast.models.pnm import PNM, PNMConfig

torch.set_num_threads(1)
N = 30


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Spike probabilities (3, 4, N) and soma positions (N, 3) in voxels."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 4, N, generator=gen) ** 2, torch.rand(N, 3, generator=gen) * 100.0


def _pnm(**kw: Any) -> PNM:
    torch.manual_seed(0)
    return PNM(PNMConfig(hidden=16, n_fourier=4, temporal_hidden=32, **kw)).eval()


@pytest.mark.parametrize("output", ["sigmoid", "linear"])
def test_shapes(data: tuple[torch.Tensor, torch.Tensor], output: str) -> None:
    x, pos = data
    y = _pnm(d_beh=2, output=output)(x, pos)
    assert y.shape == (3, 2)
    if output == "sigmoid":
        assert ((y > 0) & (y < 1)).all()
    assert _pnm()(x[:, :, :7], pos[:7].numpy()).shape == (3, 1)     # any N, numpy positions


def test_permutation_invariant_over_neurons(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, pos = data
    model = _pnm(d_beh=3, output="linear")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(N) % 4 != 0).float()
    torch.testing.assert_close(model(x[..., perm], pos[perm]), model(x, pos), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x[..., perm], pos[perm], mask[perm]), model(x, pos, mask),
                               atol=1e-5, rtol=1e-5)


def test_order_of_time_steps_matters(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, pos = data
    model = _pnm(output="linear")
    assert (model(x.flip(1), pos) - model(x, pos)).abs().max() > 1e-4


def test_masked_neurons_are_ignored(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, pos = data
    model = _pnm(d_beh=2, output="linear")
    keep = torch.arange(N) < 20
    padded = x.clone()
    padded[..., ~keep] = 7.0                                        # junk in the padded rows
    far = pos.clone()
    far[~keep] = 1e4
    torch.testing.assert_close(model(padded, far, keep), model(x[..., keep], pos[keep]), atol=1e-5, rtol=1e-5)
    batch_mask = keep.expand(3, N)
    torch.testing.assert_close(model(padded, far, batch_mask), model(padded, far, keep))


def test_global_gain_and_offset_removed(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, pos = data
    model = _pnm(output="linear")
    gain, offset = torch.tensor([0.5, 2.0, 1.5, 3.0])[None, :, None], torch.tensor([0.1, 0.0, 0.2, 0.3])[None, :, None]
    torch.testing.assert_close(model(x * gain + offset, pos), model(x, pos), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(x, pos * 3.0 + 50.0), model(x, pos), atol=1e-4, rtol=1e-4)


def test_learns_ensemble_activity() -> None:
    gen = torch.Generator().manual_seed(2)
    pos = torch.rand(N, 3, generator=gen)
    ensemble = pos[:, 0] > 0.6                                      # a spatially defined ensemble

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        drive = torch.rand(b, 1, 1, generator=gen)
        x = torch.rand(b, 4, N, generator=gen) * 0.2 + drive * ensemble.float()
        return x, drive[:, :, 0]

    model = _pnm().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x_val, y_val = batch(64)
    with torch.no_grad():
        before = (model(x_val, pos) - y_val).abs().mean().item()
    for _ in range(100):
        x, y = batch(32)
        loss = (model(x, pos) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (model(x_val, pos) - y_val).abs().mean().item()
    assert after < 0.5 * before


def test_bad_inputs_raise(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, pos = data
    model = _pnm()
    with pytest.raises(ValueError, match="n_times=4"):
        model(x[:, :3], pos)
    with pytest.raises(ValueError, match="positions"):
        model(x, pos[:-1])
    with pytest.raises(ValueError, match="positions"):
        model(x, pos[:, :2])
    with pytest.raises(ValueError, match="mask"):
        model(x, pos, torch.ones(N - 1))


@pytest.mark.parametrize("kwargs, match", [
    ({"n_times": 0}, "n_times"), ({"hidden": 0}, "hidden"), ({"d_beh": 0}, "d_beh"),
    ({"n_fourier": -1}, "n_fourier"), ({"fourier_max_freq": 0.5}, "fourier_max_freq"),
    ({"output": "relu"}, "output"), ({"dropout": 1.0}, "dropout"), ({"eps": 0.0}, "eps"),
])
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PNMConfig(**kwargs)
