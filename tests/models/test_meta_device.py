"""Every model's inference forward keeps its tensors on the input's device.

CI has no GPU, so a tensor made on the CPU inside forward() (a torch.arange without device=, a
torch.tensor of constants) would first fail on a GPU rig. The meta device catches most such mistakes
without one: elementwise ops between a meta tensor and a CPU tensor (not a 0-d scalar) raise, as they
do between CUDA and CPU tensors, and meta tensors hold no data, so nothing is computed.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from loopcast.models.pnm import PNM, PNMConfig
from loopcast.models.quantformer import QuantFormer, QuantFormerActivation, QuantFormerConfig, QuantFormerForecaster
from loopcast.models.sbm import SBMConfig, SparseBrainModel
from loopcast.models.video_unet import VideoUNet, VideoUNetConfig
from loopcast.models.zoo import MODELS, SPIKE_MODELS

N, K, C, H = 96, 3, 8, 4
META = torch.device("meta")


def _positions() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 100.0, (N, 3)).astype(np.float32)


def _on_meta(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    model = model.eval().to(META)
    with torch.inference_mode():
        return model(*(x.to(META) for x in inputs))


def test_meta_device_catches_a_cpu_tensor_made_in_forward() -> None:
    """The premise of this file: mixing a CPU tensor into meta tensors raises."""
    class Leaky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.arange(x.shape[-1], dtype=x.dtype)      # no device=: the bug we look for
    with pytest.raises((RuntimeError, ValueError)):
        _on_meta(Leaky(), torch.zeros(2, 5))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trace_models(name: str) -> None:
    cfg_cls, cls = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    kw = {k: v for k, v in dict(n_neurons=N, context=C, horizon=H, n_covariates=K).items() if k in fields}
    model = cls(cfg_cls(**kw))
    inputs = [torch.rand(1, C, N)]
    if getattr(model, "uses_covariates", False):
        inputs.append(torch.rand(1, C + H, K))
    out = _on_meta(model, *inputs)
    assert out.device == META and tuple(out.shape) == (1, H, N)


def test_spikenet() -> None:
    cfg_cls, cls = SPIKE_MODELS["spikenet"]
    model = cls(cfg_cls(context=C))
    out = _on_meta(model, torch.rand(2, C, N))
    assert out.device == META and tuple(out.shape) == (2, 1, N)


@pytest.mark.parametrize("attention,routing", [("routed", "sorted"), ("routed", "topk"), ("dense", "sorted")])
def test_sparse_brain_model(attention: str, routing: str) -> None:
    cfg = SBMConfig.small(N, K, horizon=2, attention=attention, routing=routing, cluster_size=32)
    out = _on_meta(SparseBrainModel(cfg, _positions()), torch.rand(1, cfg.context, N),
                   torch.rand(1, cfg.context + 2, K))
    assert out.device == META and tuple(out.shape) == (1, 2, N)


@pytest.mark.parametrize("wrapper", [QuantFormerActivation, QuantFormerForecaster])
def test_quantformer_engines(wrapper: type[nn.Module]) -> None:
    cfg = QuantFormerConfig(n_neurons=N, n_covariates=K, context=16, horizon=8, patch=4, d_model=16, n_heads=2,
                            n_layers=1, codebook_size=32, code_dim=8)
    out = _on_meta(wrapper(QuantFormer(cfg)), torch.rand(1, 16, N), torch.rand(1, 24, K))
    assert out.device == META and out.shape[-1] == N


def test_video_unet() -> None:
    cfg = VideoUNetConfig(context=4, horizon=8, features=16, features_sr=16, groups=4, super_resolution=1)
    out = _on_meta(VideoUNet(cfg), torch.rand(2, 4, 16, 16, 8), torch.tensor([1, 8]))
    assert out.device == META and tuple(out.shape) == (2, 32, 32, 8)


def test_pnm() -> None:
    out = _on_meta(PNM(PNMConfig()), torch.rand(2, PNMConfig().n_times, N), torch.as_tensor(_positions()))
    assert out.device == META and out.shape[0] == 2
