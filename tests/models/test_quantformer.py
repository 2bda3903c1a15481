from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopcast.models.quantformer import QuantFormer, QuantFormerActivation, QuantFormerConfig, QuantFormerForecaster
from loopcast.models.vq import VectorQuantizer, code_stats
from loopcast.offline_training.export.engine import check_parity, export_onnx, parity_inputs

N, K, C, H, P = 12, 3, 8, 4, 4


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


def make_model(n_covariates: int = K, seed: int = 0, **kw: Any) -> QuantFormer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(QuantFormerConfig.small(N, n_covariates, C, H, P), **kw)
    return QuantFormer(cfg).eval()


def sine_windows(b: int, n: int = N, t: int = C + H, seed: int = 0) -> torch.Tensor:
    """(B, T, n) smooth per-neuron oscillations with random phases and periods."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(b, 1, n, generator=g) * 6.28
    period = 6 + 10 * torch.rand(1, 1, n, generator=g)
    return torch.sin(torch.arange(t, dtype=torch.float32)[None, :, None] * 6.28 / period + phase)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="patch 3 must divide"):
        QuantFormerConfig(n_neurons=4, context=8, horizon=4, patch=3)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        QuantFormerConfig(n_neurons=4, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_neurons"):
        QuantFormerConfig(n_neurons=0)
    with pytest.raises(ValueError, match="decode"):
        QuantFormerConfig(n_neurons=4, decode="median")
    cfg = QuantFormerConfig(n_neurons=4, context=16, horizon=8, patch=4)
    assert (cfg.n_context_patches, cfg.n_future_patches, cfg.n_patches) == (4, 2, 6)


def test_shapes() -> None:
    model = make_model()
    x, ids, cov = sine_windows(3), torch.arange(N), torch.rand(3, C + H, K)
    act, logits = model.heads(x[:, :C], ids, cov)
    assert act.shape == (3, N) and logits.shape == (3, N, H // P, 32)
    assert model.forecast(x[:, :C], ids, cov).shape == (3, H, N)
    assert model.forecast(x[:, :C], ids, cov, decode="argmax").shape == (3, H, N)
    assert model.target_codes(x, ids, cov).shape == (3, N, H // P)
    sub = torch.tensor([1, 5, 7])  # any subset of neurons: sequences are per neuron
    assert model.activation_logits(x[:, :C, :3], sub, cov).shape == (3, 3)
    with pytest.raises(ValueError, match="covariates"):
        model.activation_logits(x[:, :C], ids, None)
    with pytest.raises(ValueError, match="neuron_ids"):
        model.activation_logits(x[:, :C], ids[:5], cov)
    with pytest.raises(ValueError, match=r"context must be \(B, C=8"):
        model.activation_logits(x[:, :5], ids, cov)


def test_neurons_are_independent_sequences() -> None:
    model, x, cov = make_model(), sine_windows(2), torch.rand(2, C + H, K)
    other = x.clone()
    other[:, :, 1:] = torch.randn_like(other[:, :, 1:])
    ids = torch.arange(N)
    a, b = model.activation_logits(x[:, :C], ids, cov), model.activation_logits(other[:, :C], ids, cov)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_masked_patches_are_hidden_from_the_encoder() -> None:
    model, x = make_model(n_covariates=0), sine_windows(2)
    mask = model.random_mask(2, N, torch.Generator().manual_seed(0))
    assert (mask.sum(-1) == round(0.5 * model.config.n_patches)).all()
    patch_mask = mask.transpose(1, 2).repeat_interleave(P, dim=1)   # (B, T, n) frames of masked patches
    changed = torch.where(patch_mask, torch.randn_like(x), x)
    ids = torch.arange(N)
    assert torch.allclose(model.encode(x, ids, None, mask), model.encode(changed, ids, None, mask), atol=1e-6)
    assert not torch.allclose(model.encode(x, ids, None), model.encode(changed, ids, None))


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def test_vq_straight_through_and_commitment() -> None:
    vq = VectorQuantizer(size=4, dim=2, commitment=0.25, normalise=False)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    z = torch.tensor([[0.9, 0.2], [0.1, 0.8]], requires_grad=True)
    out = vq(z)
    assert out.codes.tolist() == [1, 2]
    assert torch.equal(out.quantised, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out.quantised.sum().backward()
    assert torch.equal(_grad(z), torch.ones_like(z))                   # straight-through
    z.grad = None
    vq.codebook.weight.grad = None
    vq(z).loss.backward()
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(_grad(z), 0.25 * 2 * (z.detach() - e) / z.numel())   # commitment pulls z to e
    assert torch.allclose(_grad(vq.codebook.weight)[1:3], 2 * (e - z.detach()) / z.numel())
    assert torch.equal(_grad(vq.codebook.weight)[[0, 3]], torch.zeros(2, 2))   # unused codes get nothing


def test_vq_dead_code_restart_and_stats() -> None:
    vq = VectorQuantizer(size=8, dim=3).train()
    z = torch.randn(50, 3)
    vq.usage.fill_(1.0)
    vq.usage[[2, 5]] = 0.0
    assert vq.restart_dead(z, generator=torch.Generator().manual_seed(0)) == 2
    moved = vq.codebook.weight[[2, 5]]
    assert all(torch.isclose(z, row).all(-1).any() for row in moved)
    stats = code_stats(torch.tensor([0, 1, 2, 3]), 8)
    assert stats["usage"] == 0.5 and stats["perplexity"] == pytest.approx(4.0)


def test_short_pretrain_lowers_the_loss() -> None:
    model = make_model(n_covariates=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, ids = sine_windows(16, seed=1), torch.arange(N)
    mask = model.random_mask(16, N, torch.Generator().manual_seed(0))
    start = model.pretrain_loss(x, ids, mask=mask)[1]["loss"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        loss, parts = model.pretrain_loss(x, ids, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = model.pretrain_loss(x, ids, mask=mask)[1]
    assert end["loss"] < 0.7 * start, (start, end)
    assert set(parts) == {"loss", "masked_mse", "visible_mse", "vq", "usage", "perplexity"}
    assert 0 < end["usage"] <= 1 and end["perplexity"] >= 1


def test_pretrain_needs_the_whole_window() -> None:
    with pytest.raises(ValueError, match="C \\+ H = 12"):
        make_model(n_covariates=0).pretrain_loss(sine_windows(2, t=C), torch.arange(N))


@pytest.mark.parametrize("wrapper, decode", [(QuantFormerActivation, "expected"), (QuantFormerForecaster, "argmax"),
                                             (QuantFormerForecaster, "expected")])
def test_export_matches_onnxruntime(tmp_path: Path, wrapper: type, decode: str) -> None:
    model = make_model(seed=3, decode=decode)
    model.set_normalisation(torch.rand(N) * 0.1, 0.5 + torch.rand(N))
    engine = wrapper(model).eval()
    assert engine.uses_covariates and engine.config is model.config
    path = tmp_path / "model.onnx"
    dynamic_n = export_onnx(engine, path, C, N, "out", horizon=H, covariates=K)
    assert not dynamic_n  # neuron identity embeddings fix N
    real = (sine_windows(1)[0, :C].numpy(), np.random.default_rng(0).random((C + H, K), dtype=np.float32))
    inputs = parity_inputs(C, N, 0, real, horizon=H, covariates=K)
    assert check_parity(path, engine, inputs, 1e-5, "out") <= 1e-5
    out = engine(torch.from_numpy(inputs[0][0]), torch.from_numpy(inputs[0][1]))
    assert out.shape == ((2, 1, N) if wrapper is QuantFormerActivation else (2, H, N))
    with pytest.raises(ValueError, match="N=12"):
        engine(torch.zeros(1, C, N + 1), torch.zeros(1, C + H, K))
