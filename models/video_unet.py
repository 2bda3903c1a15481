"""Lead-time conditioned 3D UNet for volumetric video forecasting ("Forecasting Whole-Brain Neuronal
Activity from Volumetric Video", sections 3.1-3.3 and appendix A.1).

The C context frames of a (X, Y, Z) dF/F volume are the input channels; the network predicts the single
frame at an integer lead time h in [1, H], which conditions every residual block through FiLM.

Architecture (appendix A.1):
  - input conv 3x3x3, C -> F;
  - down path: ONE residual block at every resolution, then a learned downsampling conv
    (kernel = stride = factor);
  - lowest resolution: that one block plus three more (4 in all);
  - up path: learned upsampling (ConvTranspose3d, kernel = stride = factor), add the skip (the
    down-path block output at that resolution), then TWO blocks (3 per resolution in all);
  - super-resolution (optional, past the input resolution): 1x1x1 conv F -> F', then per stage a
    (2, 2, 1) ConvTranspose3d and ONE block at F';
  - output conv 3x3x3, (F' or F) -> 1.
Removing the lowest stage swaps its 4 blocks for 1 more block one resolution up, which costs about the
same since every stage shrinks the volume by >= 4 (paper 3.2): FLOPs stay roughly constant while the
receptive field changes. A residual block is pre-activation: GroupNorm, Swish, conv, GroupNorm, FiLM
on the lead time (h * (1 + scale) + shift), Swish, dropout, conv, plus the identity.

Spatial sizes that are not multiples of the cumulative downsampling factor are zero-padded at the high
end and the output is cropped back to (X * 2**sr, Y * 2**sr, Z).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_DOWNSAMPLE: tuple[tuple[int, int, int], ...] = ((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
LOWEST_BLOCKS = 4      # residual blocks at the lowest resolution (1 down path + 3 more)
UP_BLOCKS = 2          # residual blocks after each upsampling (1 down path + 2 = 3 per resolution)
SR_FACTOR = (2, 2, 1)  # one super-resolution stage
MAX_SUPER_RESOLUTION = 2


@dataclass(frozen=True)
class VideoUNetConfig:
    """Context C (input frames as channels), horizon H, widths F / F', GroupNorm groups, per-stage
    (x, y, z) downsampling factors, super-resolution stages, lead-time embedding size, dropout."""

    context: int = 4
    horizon: int = 32
    features: int = 128          # F
    features_sr: int = 32        # F': width of the super-resolution stages
    groups: int = 16             # GroupNorm groups; divides F and F'
    downsample: tuple[tuple[int, int, int], ...] = DEFAULT_DOWNSAMPLE
    super_resolution: int = 0    # (2, 2, 1) upsampling stages past the input resolution
    lead_dim: int = 32           # sinusoidal lead-time embedding size (even)
    dropout: float = 0.0         # feature dropout in every block (paper: 0.1 for C = 256)

    def __post_init__(self) -> None:
        for name in ("context", "horizon", "features", "features_sr", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("features", "features_sr"):
            if getattr(self, name) % self.groups:
                raise ValueError(f"groups={self.groups} must divide {name}={getattr(self, name)}")
        if self.lead_dim < 2 or self.lead_dim % 2:
            raise ValueError(f"lead_dim must be even and >= 2, got {self.lead_dim}")
        if not 0 <= self.super_resolution <= MAX_SUPER_RESOLUTION:
            raise ValueError(f"super_resolution must be in [0, {MAX_SUPER_RESOLUTION}], "
                             f"got {self.super_resolution}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "downsample", _normalise_downsample(self.downsample))

    @classmethod
    def spatial_context(cls, stages: int, **kw: Any) -> VideoUNetConfig:
        """The paper's receptive-field study: the first `stages` default downsampling stages."""
        if not 0 <= stages <= len(DEFAULT_DOWNSAMPLE):
            raise ValueError(f"stages must be in [0, {len(DEFAULT_DOWNSAMPLE)}], got {stages}")
        return cls(downsample=DEFAULT_DOWNSAMPLE[:stages], **kw)

    @classmethod
    def paper(cls, context: int, **kw: Any) -> VideoUNetConfig:
        """The paper's model (Figure 3): F=128, F'=32, 4 stages, 2 super-resolution stages."""
        base = dict(context=context, features=128, features_sr=32, groups=16,
                    downsample=DEFAULT_DOWNSAMPLE, super_resolution=2,
                    dropout=0.1 if context >= 256 else 0.0)
        return cls(**{**base, **kw})

    @property
    def total_factor(self) -> tuple[int, int, int]:
        """Cumulative downsampling factor per axis."""
        x, y, z = (math.prod(f[a] for f in self.downsample) for a in range(3))
        return x, y, z


def _normalise_downsample(value: Any) -> tuple[tuple[int, int, int], ...]:
    """Lists (TOML) -> tuple of (x, y, z) tuples of integer factors >= 1, not all 1."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"downsample must be a list of (x, y, z) factors, got {value!r}")
    out = []
    for i, f in enumerate(value):
        if (not isinstance(f, (list, tuple)) or len(f) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in f)):
            raise ValueError(f"downsample[{i}] must be three integers >= 1 (x, y, z), got {f!r}")
        if all(v == 1 for v in f):
            raise ValueError(f"downsample[{i}] must downsample at least one axis, got {f!r}")
        out.append((f[0], f[1], f[2]))
    return tuple(out)


def receptive_field(cfg: VideoUNetConfig) -> tuple[int, int, int]:
    """Receptive field in input voxels per axis (paper eq. 4 and A.1.1): without downsampling the
    centre voxel plus 2 per 3x3x3 conv (4 blocks x 2 + input + output = 10 convs) = 21; otherwise the
    cumulative factor x 4 lowest-resolution blocks x 4 (2 convs, each widening it by 2)."""
    if not cfg.downsample:
        return (1 + (LOWEST_BLOCKS * 2 + 2) * 2,) * 3
    x, y, z = (f * LOWEST_BLOCKS * 4 for f in cfg.total_factor)
    return x, y, z


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class VolumeGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same function) for large volumes, with the block's FiLM folded in.
    Statistics come from one var_mean reduction per group, then a single fused x * s + t pass applies
    normalisation, affine and FiLM. PyTorch's fused CUDA kernel gives each group's moments to one thread
    block, so at batch 1 with 16 groups of millions of voxels it kept 16 of an H100's 132 SMs busy: 16 ms
    per call at 512 x 288 x 72, 57 % of the paper UNet's forward (bench/gpu/probe.py video). Works on any
    memory format (channels-last included) without a copy. Used on CUDA and in exported programs; eager
    CPU work keeps PyTorch's kernel."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, X, Y, Z); scale, shift: (B, C) FiLM of the lead time, or None
        if x.is_cuda or torch.compiler.is_exporting():   # exported programs may be served on a GPU
            return self.fused(x, scale, shift)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # faster on the CPU
        if scale is None:
            return y
        assert shift is not None, "FiLM needs scale and shift"
        return y * (1.0 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]

    def fused(self, x: torch.Tensor, scale: torch.Tensor | None = None,
              shift: torch.Tensor | None = None) -> torch.Tensor:
        """The GPU path: per-group statistics, then one x * s + t pass (slower on the CPU than PyTorch's
        own kernel followed by FiLM, so eager CPU work keeps that)."""
        mean, rstd = self.moments(x)                                             # (B, G) each
        return self.apply_affine(x, mean, rstd, scale, shift)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group mean and 1 / std (biased variance, as GroupNorm), at least float32, (B, G)."""
        g = x.unflatten(1, (self.num_groups, x.shape[1] // self.num_groups))    # (B, G, C/G, X, Y, Z) view
        var, mean = torch.var_mean(g, dim=tuple(range(2, g.ndim)), correction=0)  # (B, G)
        acc = torch.promote_types(x.dtype, torch.float32)                       # bf16 -> float32
        return _cast(mean, acc), torch.rsqrt(_cast(var, acc) + self.eps)

    def apply_affine(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
        """((x - mean) * rstd * weight + bias) * (1 + scale) + shift as one x * s + t."""
        b, c = x.shape[:2]
        per = c // self.num_groups
        s = rstd[:, :, None].expand(b, self.num_groups, per).reshape(b, c)      # (B, C)
        m = mean[:, :, None].expand(b, self.num_groups, per).reshape(b, c)      # (B, C)
        if self.affine:
            s = s * self.weight
        t = -m * s + (self.bias if self.affine else 0.0)                        # (B, C)
        if scale is not None and shift is not None:
            s, t = s * (1.0 + scale), t * (1.0 + scale) + shift
        shape = (b, c) + (1,) * (x.ndim - 2)
        return torch.addcmul(_cast(t.reshape(shape), x.dtype), x, _cast(s.reshape(shape), x.dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), except while torch.export traces: a cast there is recorded with the traced dtype and
    asserted at run time, and the torch runtime runs fp32-exported programs under bf16 autocast. There
    type promotion decides instead (the norm's output is then float32, as autocast's own group_norm)."""
    return t if torch.compiler.is_exporting() else t.to(dtype)


class AxiswiseGroupNorm(VolumeGroupNorm):
    """VolumeGroupNorm with its statistics taken as means one axis at a time: the same function, but it
    exports to ONNX as short ReduceMeans. ONNX Runtime's InstanceNormalization (what GroupNorm becomes)
    accumulates each group's statistics over all its voxels in float32 and drifts by ~1e-3 over the
    millions of voxels of a ZAPBench volume; axis-wise means stay at float32 accuracy. Used for export
    (`export_copy`)."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.fused(x, scale, shift)   # always: this norm exists to be exported

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = x.shape[:2]
        g = x.reshape(b, self.num_groups, c // self.num_groups, *x.shape[2:])   # (B, G, C/G, X, Y, Z)
        mean = _axis_mean(g)                                                     # (B, G, 1, 1, 1, 1)
        var = _axis_mean((g - mean).square())                                    # (B, G, 1, 1, 1, 1)
        return mean.flatten(1), torch.rsqrt(var.flatten(1) + self.eps)


def _axis_mean(g: torch.Tensor) -> torch.Tensor:
    """Mean over every axis after the first two, one axis at a time (keepdim)."""
    for d in range(g.ndim - 1, 1, -1):
        g = g.mean(dim=d, keepdim=True)
    return g


def export_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose GroupNorms are AxiswiseGroupNorm (same weights, same function), for export."""
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            # exactly these two (an AxiswiseGroupNorm is a GroupNorm too)
            if isinstance(child, nn.GroupNorm) and type(child) in (nn.GroupNorm, VolumeGroupNorm):
                new = AxiswiseGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
    return out


def lead_embedding(lead: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer lead times: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=lead.device)
                      * (-math.log(10000.0) / half))                  # (dim/2,)
    angles = lead.to(torch.float32)[:, None] * freqs[None, :]         # (B, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """Pre-activation residual block with lead-time FiLM; `level` is its resolution (0 = input,
    k = after k downsamplings, -s = super-resolution stage s)."""

    def __init__(self, channels: int, cond_dim: int, groups: int, dropout: float, level: int) -> None:
        super().__init__()
        self.level = level
        self.norm1 = VolumeGroupNorm(groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = VolumeGroupNorm(groups, channels)
        self.film = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)   # a fresh block's FiLM is the identity
        nn.init.zeros_(self.film.bias)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, ch, X, Y, Z), cond: (B, cond_dim)
        h = self.conv1(F.silu(self.norm1(x)))                        # (B, ch, X, Y, Z)
        scale, shift = self.film(cond).chunk(2, dim=1)               # (B, ch) x2
        h = self.norm2(h, scale, shift)                              # norm, then h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))                      # (B, ch, X, Y, Z)
        return x + h


class VideoUNet(nn.Module):
    """Forecast the frame at lead time h: (B, C, X, Y, Z), (B,) int64 -> (B, X*2**sr, Y*2**sr, Z)."""

    def __init__(self, config: VideoUNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or VideoUNetConfig()
        f, n, cond = cfg.features, len(cfg.downsample), 4 * cfg.lead_dim
        self.lead_mlp = nn.Sequential(nn.Linear(cfg.lead_dim, cond), nn.SiLU())
        self.stem = nn.Conv3d(cfg.context, f, 3, padding=1)

        def block(ch: int, level: int) -> ResBlock:
            return ResBlock(ch, cond, cfg.groups, cfg.dropout, level)

        self.down = nn.ModuleList(block(f, i) for i in range(n))
        self.pool = nn.ModuleList(nn.Conv3d(f, f, k, stride=k) for k in cfg.downsample)
        self.bottom = nn.ModuleList(block(f, n) for _ in range(LOWEST_BLOCKS))
        self.unpool = nn.ModuleList(nn.ConvTranspose3d(f, f, k, stride=k) for k in cfg.downsample)
        self.up = nn.ModuleList(nn.ModuleList(block(f, i) for _ in range(UP_BLOCKS)) for i in range(n))
        sr, fs = cfg.super_resolution, cfg.features_sr
        self.sr_proj = nn.Conv3d(f, fs, 1) if sr else None
        self.sr_unpool = nn.ModuleList(nn.ConvTranspose3d(fs, fs, SR_FACTOR, stride=SR_FACTOR)
                                       for _ in range(sr))
        self.sr_blocks = nn.ModuleList(block(fs, -(s + 1)) for s in range(sr))
        self.head = nn.Conv3d(fs if sr else f, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
        # x: (B, C, X, Y, Z) float32, lead: (B,) int64 in [1, H]
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.context:
            raise ValueError(f"expected volumes (batch, {cfg.context}, X, Y, Z), got {tuple(x.shape)}")
        if lead.ndim != 1:
            raise ValueError(f"expected lead_time (batch,), got {tuple(lead.shape)}")
        size = x.shape[2:]
        cond = self.lead_mlp(lead_embedding(lead, cfg.lead_dim))      # (B, 4 lead_dim)
        h = self.stem(self._pad(x))                                   # (B, F, Xp, Yp, Zp)
        h = self._unet(h, cond)                                       # (B, F, Xp, Yp, Zp)
        if self.sr_proj is not None:
            h = self.sr_proj(h)                                       # (B, F', Xp, Yp, Zp)
        for unpool, blk in zip(self.sr_unpool, self.sr_blocks):
            h = blk(unpool(h), cond)                                  # (B, F', 2 Xp, 2 Yp, Zp) per stage
        s = 2 ** cfg.super_resolution
        out = self.head(h)[:, 0]                                      # (B, Xp s, Yp s, Zp)
        return out[:, :size[0] * s, :size[1] * s, :size[2]]           # (B, X s, Y s, Z)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad X, Y, Z at the high end to multiples of the cumulative downsampling factor."""
        # x: (B, C, X, Y, Z) -> (B, C, Xp, Yp, Zp)
        extra = [(-s) % f for s, f in zip(x.shape[2:], self.config.total_factor)]
        if not any(extra):
            return x
        return F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]))

    def _unet(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Down path (1 block + downsampling per stage), 4 lowest blocks, up path (upsample + skip +
        2 blocks per stage)."""
        # h: (B, F, Xp, Yp, Zp), cond: (B, 4 lead_dim)
        skips = []
        for blk, pool in zip(self.down, self.pool):
            h = blk(h, cond)                                          # (B, F, x, y, z) at level i
            skips.append(h)
            h = pool(h)                                               # (B, F, x/fx, y/fy, z/fz)
        for blk in self.bottom:
            h = blk(h, cond)                                          # (B, F, lowest resolution)
        for i in reversed(range(len(self.up))):
            h = self.unpool[i](h) + skips[i]                          # (B, F, x, y, z) at level i
            for blk in cast(nn.ModuleList, self.up[i]):
                h = blk(h, cond)
        return h                                                      # (B, F, Xp, Yp, Zp)


__all__ = ["VideoUNetConfig", "VideoUNet", "ResBlock", "DEFAULT_DOWNSAMPLE", "receptive_field",
           "count_parameters", "lead_embedding"]
