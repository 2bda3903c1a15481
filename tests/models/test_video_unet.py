from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from loopcast.config import ConfigError
from loopcast.models.video_unet import (
    DEFAULT_DOWNSAMPLE,
    AxiswiseGroupNorm,
    ResBlock,
    VideoUNet,
    VideoUNetConfig,
    VolumeGroupNorm,
    count_parameters,
    export_copy,
    receptive_field,
)
from loopcast.models.zoo import build_model, model_config
from loopcast.offline_training.export.engine import quiet_exporter

torch.set_num_threads(1)
SMALL = {"features": 16, "features_sr": 8, "groups": 4}


def _model(stages: int = 2, context: int = 3, **kw: Any) -> VideoUNet:
    torch.manual_seed(0)
    cfg = VideoUNetConfig.spatial_context(stages, context=context, **{**SMALL, **kw})
    return VideoUNet(cfg).eval()


def _randomise_film(model: VideoUNet, std: float = 0.5) -> None:
    with torch.no_grad():
        for blk in model.modules():
            if isinstance(blk, ResBlock):
                blk.film.weight.normal_(0.0, std)
                blk.film.bias.normal_(0.0, std)


@pytest.mark.parametrize("stages", [0, 2, 4])
@pytest.mark.parametrize("sr", [0, 1])
@pytest.mark.parametrize("size", [(16, 12, 8), (15, 11, 7)])  # the second takes the padding path
def test_output_shapes(stages: int, sr: int, size: tuple[int, int, int]) -> None:
    model = _model(stages, super_resolution=sr)
    x, s = torch.randn(2, 3, *size), 2 ** sr
    out = model(x, torch.tensor([1, 4]))
    assert out.shape == (2, size[0] * s, size[1] * s, size[2])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_input_raises() -> None:
    model = _model(2)
    with pytest.raises(ValueError, match=r"expected volumes \(batch, 3, X, Y, Z\)"):
        model(torch.randn(1, 4, 8, 8, 4), torch.tensor([1]))
    with pytest.raises(ValueError, match="expected volumes"):
        model(torch.randn(3, 8, 8, 4), torch.tensor([1]))


def _blocks_per_resolution(model: VideoUNet, size: tuple[int, int, int]) -> Counter:
    """Run the model and count the residual blocks by the spatial size they run at."""
    seen: Counter = Counter()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.update([tuple(args[0].shape[2:])]))
             for m in model.modules() if isinstance(m, ResBlock)]
    model(torch.randn(1, 3, *size), torch.tensor([1]))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("stages, expected", [
    (0, {(16, 16, 8): 4}),
    (2, {(16, 16, 8): 3, (8, 8, 8): 3, (4, 4, 4): 4}),
    (4, {(16, 16, 8): 3, (8, 8, 8): 3, (4, 4, 4): 3, (2, 2, 2): 3, (1, 1, 1): 4}),
])
def test_blocks_per_resolution(stages: int, expected: dict) -> None:
    model = _model(stages)
    assert dict(_blocks_per_resolution(model, (16, 16, 8))) == expected
    levels = Counter(m.level for m in model.modules() if isinstance(m, ResBlock))
    assert levels == Counter({lvl: n for lvl, n in enumerate(expected.values())})
    sr_model = _model(stages, super_resolution=2)          # one F' block per super-resolution stage
    seen = _blocks_per_resolution(sr_model, (16, 16, 8))
    assert seen[(32, 32, 8)] == 1 and seen[(64, 64, 8)] == 1


def test_flops_roughly_constant_across_stages() -> None:
    flops = []
    for stages in (0, 2, 4):
        with FlopCounterMode(display=False) as counter:
            _model(stages)(torch.randn(1, 3, 16, 16, 8), torch.tensor([1]))
        flops.append(counter.get_total_flops())
    # Measured 467 / 458 / 457 MFLOP (max/min 1.02): removing the lowest stage's 4 blocks adds one
    # block at >= 4x the voxels, so the sum barely moves; 1.1 leaves room for bookkeeping changes.
    assert max(flops) / min(flops) < 1.1, flops


class _NoNorm(nn.Module):
    """A block's norm dropped: the identity, FiLM still applied."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None or shift is None:
            return x
        return x * (1.0 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]


def test_receptive_field_zero_stages() -> None:
    model = _model(0, context=2, features=8, groups=4)
    assert receptive_field(model.config) == (21, 21, 21)
    with torch.no_grad():  # random (non-zero) FiLM and bigger weights so every path carries gradient
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    # GroupNorm statistics span the whole volume (a global but weak dependence the paper's receptive
    # field ignores): drop the norms to measure the convolutional receptive field alone.
    for blk in model.modules():
        if isinstance(blk, ResBlock):
            blk.add_module("norm1", _NoNorm())
            blk.add_module("norm2", _NoNorm())
    x = torch.randn(1, 2, 27, 25, 23, requires_grad=True)
    c = (13, 12, 11)
    model(x, torch.tensor([3]))[0, c[0], c[1], c[2]].backward()
    assert x.grad is not None
    g = x.grad.abs().sum(1)[0]                               # (27, 25, 23)
    r = (receptive_field(model.config)[0] - 1) // 2          # 10
    window = tuple(slice(ci - r, ci + r + 1) for ci in c)
    inside = torch.zeros_like(g, dtype=torch.bool)
    inside[window] = True
    assert g[~inside].max() == 0
    assert g[c[0] - r, c[1], c[2]] > 0 and g[c[0] + r, c[1], c[2]] > 0    # nonzero at the edge
    assert g[c[0], c[1] - r, c[2]] > 0 and g[c[0], c[1], c[2] + r] > 0


def test_receptive_field_formula() -> None:
    assert receptive_field(VideoUNetConfig.spatial_context(2)) == (64, 64, 32)
    assert receptive_field(VideoUNetConfig.spatial_context(4)) == (256, 256, 128)


def test_lead_time_conditioning() -> None:
    model = _model(2)
    x = torch.randn(1, 3, 8, 8, 4)
    fresh = [model(x, torch.tensor([h])) for h in (1, 7)]
    torch.testing.assert_close(fresh[0], fresh[1])           # zero-initialised FiLM: identity
    _randomise_film(model)
    a, b = (model(x, torch.tensor([h])) for h in (1, 7))
    assert (a - b).abs().max() > 1e-3


def test_training_step_moves_film() -> None:
    model = _model(2).train()
    first = model.down[0]
    assert isinstance(first, ResBlock)
    film = first.film.weight
    before = film.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 8, 8, 4)
    lead = torch.tensor([1, 2, 3, 4])
    target = x[:, -1] * lead[:, None, None, None].float()    # toy: the answer depends on the lead time
    loss = (model(x, lead) - target).abs().mean()
    loss.backward()
    opt.step()
    assert film.grad is not None and film.grad.abs().sum() > 0
    assert not torch.equal(film.detach(), before)


def test_onnx_export_dynamic_batch_matches_ort(tmp_path: Path) -> None:
    model = _model(2, super_resolution=1)
    _randomise_film(model, std=0.2)
    size = (15, 12, 7)                                       # exercises the padding and crop
    batch = torch.export.Dim("batch")
    path = tmp_path / "video_unet.onnx"
    with quiet_exporter():
        torch.onnx.export(model, (torch.randn(2, 3, *size), torch.tensor([1, 2])), str(path),
                          input_names=["volumes", "lead_time"], output_names=["frame"],
                          dynamic_shapes=({0: batch}, {0: batch}), dynamo=True,
                          external_data=False, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for lead in ([5], [1, 8, 32]):
        x = rng.standard_normal((len(lead), 3, *size)).astype(np.float32)
        lt = np.asarray(lead, dtype=np.int64)
        (got,) = sess.run(["frame"], {"volumes": x, "lead_time": lt})
        with torch.no_grad():
            want = model(torch.from_numpy(x), torch.from_numpy(lt)).numpy()
        assert got.shape == (len(lead), 30, 24, 7)
        assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("kw, msg", [
    ({"groups": 5}, "groups=5 must divide features=16"),
    ({"features_sr": 6}, "groups=4 must divide features_sr=6"),
    ({"lead_dim": 7}, "lead_dim must be even"),
    ({"downsample": ((2, 2),)}, r"downsample\[0\] must be three integers"),
    ({"downsample": ((2, 0, 1),)}, r"downsample\[0\] must be three integers"),
    ({"downsample": ((2, 2, 2), (1, 1, 1))}, r"downsample\[1\] must downsample at least one axis"),
    ({"downsample": ((2.0, 2, 1),)}, r"downsample\[0\] must be three integers"),
    ({"super_resolution": 3}, r"super_resolution must be in \[0, 2\]"),
    ({"super_resolution": -1}, r"super_resolution must be in \[0, 2\]"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"context": 0}, "context must be >= 1"),
])
def test_config_validation(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        VideoUNetConfig(**{**SMALL, **kw})


def test_config_constructors_and_toml_lists() -> None:
    assert VideoUNetConfig().downsample == DEFAULT_DOWNSAMPLE
    assert VideoUNetConfig.spatial_context(2).downsample == DEFAULT_DOWNSAMPLE[:2]
    assert VideoUNetConfig.spatial_context(0).downsample == ()
    with pytest.raises(ValueError, match="stages must be in"):
        VideoUNetConfig.spatial_context(5)
    cfg = VideoUNetConfig(downsample=[[2, 2, 1], [2, 2, 2]])  # type: ignore[arg-type]
    assert cfg.downsample == ((2, 2, 1), (2, 2, 2)) and cfg.total_factor == (4, 4, 2)
    paper = VideoUNetConfig.paper(4)
    assert (paper.features, paper.features_sr, paper.super_resolution, paper.dropout) == (128, 32, 2, 0.0)
    assert len(paper.downsample) == 4 and VideoUNetConfig.paper(256).dropout == 0.1


def test_registry_builds_from_toml_style_dict() -> None:
    spec = {"context": 3, "horizon": 8, "downsample": [[2, 2, 1]], **SMALL}
    cfg = model_config("video_unet", spec)
    assert cfg.downsample == ((2, 2, 1),)
    model = build_model("video_unet", spec)
    assert isinstance(model, VideoUNet) and count_parameters(model) > 0
    assert model(torch.randn(1, 3, 6, 6, 3), torch.tensor([2])).shape == (1, 6, 6, 3)
    with pytest.raises(ConfigError, match="super_resolution"):
        model_config("video_unet", {**spec, "super_resolution": 4})


def test_export_copy_keeps_the_function_and_normalises_axis_wise() -> None:
    torch.manual_seed(0)
    model = VideoUNet(VideoUNetConfig.spatial_context(2, context=2, horizon=4, features=8, features_sr=8,
                                                      groups=4, lead_dim=8)).eval()
    copy_ = export_copy(model)
    assert not any(type(m) is torch.nn.GroupNorm for m in copy_.modules())
    assert sum(isinstance(m, AxiswiseGroupNorm) for m in copy_.modules()) == \
        sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    x, lead = torch.randn(2, 2, 16, 12, 8), torch.tensor([1, 4])
    with torch.inference_mode():
        torch.testing.assert_close(copy_(x, lead), model(x, lead), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_volume_group_norm_is_group_norm_then_film(channels_last: bool) -> None:
    """The fused statistics + x * s + t pass equals F.group_norm followed by the block's FiLM, in any memory
    format, and gradients flow to the weights and the FiLM as through the unfused ops."""
    torch.manual_seed(0)
    gn = VolumeGroupNorm(4, 16)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = 0.7 * torch.randn(2, 16, 9, 8, 5) + 1.5
    x = x.to(memory_format=torch.channels_last_3d) if channels_last else x
    scale, shift = torch.randn(2, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True)
    got = gn.fused(x, scale, shift)      # the CUDA / exported path, here on the CPU
    xc = x.contiguous()   # the reference on the standard layout: torch 2.13's CPU group_norm backward segfaults
    want = F.group_norm(xc, 4, gn.weight, gn.bias, gn.eps) * (1 + scale[:, :, None, None, None]) \
        + shift[:, :, None, None, None]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gn.fused(x), F.group_norm(xc, 4, gn.weight, gn.bias, gn.eps), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gn(xc, scale, shift), want, atol=2e-5, rtol=1e-5)   # the CPU path
    g1 = torch.autograd.grad(got.square().sum(), (gn.weight, scale))
    g2 = torch.autograd.grad(want.square().sum(), (gn.weight, scale))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_an_exported_program_carries_the_fused_norm() -> None:
    """Programs are exported on the CPU and served on a GPU: they must hold the var_mean path, not the
    fused GroupNorm kernel that eager CPU work uses."""
    model = _model(1, context=2, features=8, groups=4).eval()
    program = torch.export.export(model, (torch.randn(1, 2, 8, 8, 4), torch.tensor([2])))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("group_norm" in op for op in ops)
    assert any("var_mean" in op for op in ops)


def test_axis_wise_group_norm_keeps_float32_accuracy_in_onnx_runtime_on_big_volumes(tmp_path: Path) -> None:
    """ONNX Runtime's InstanceNormalization accumulates a group's statistics over all its voxels in float32
    (~1e-3 off over millions of voxels); the axis-wise export stays at float32 accuracy."""
    gn = AxiswiseGroupNorm(4, 16).eval()
    torch.nn.init.normal_(gn.weight)
    x = (0.3 * torch.randn(1, 16, 160, 144, 36) + 0.5).numpy()
    with torch.inference_mode():
        want = gn.double()(torch.from_numpy(x).double()).numpy()
    path = tmp_path / "gn.onnx"
    torch.onnx.export(gn.float(), (torch.from_numpy(x),), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.abs(got - want).max() < 2e-5
