"""QuantFormer (Calcagno et al.): masked auto-encoding over per-neuron patch tokens, vector-quantised,
then fine-tuned for activation prediction and for forecasting as classification over the codebook.

Each neuron is one sequence (neurons are independent batch rows, so any subset of neurons can be
trained on): [neuron-identity token, stimulus token (if n_covariates >= 1), one token per P-frame
patch of its dF/F over C context (+ H future) frames]. A patch token is Linear(patch) plus a learned
embedding of its patch index; masked patches are a learned mask token (plus the same index embedding).
A pre-norm transformer encodes the sequence; each patch output is projected to `code_dim`, quantised to
its nearest code (models/vq.py) and decoded back to the P frames.

- Pretraining (`pretrain_loss`): a random `mask_ratio` of the patch tokens is masked; loss = MSE of the
  masked patches decoded through their codes + `visible_weight` * the same on the visible ones (the
  forecasting targets are the codes of fully visible future patches, so these must decode too) + the
  VQ codebook/commitment loss.
- Activation (`activation_logits`): the H/P future patches are mask tokens; a linear head reads the
  neuron token's output and the mean of the future tokens' outputs -> one logit per neuron.
- Forecasting (`forecast_logits`, `forecast`): logits over the codebook per future patch (trained with
  CE against `target_codes`), decoded to traces by the codebook decoder: the probability-weighted code
  vector (`decode="expected"`, default: lower MAE on the synthetic fish) or the argmax code ("argmax").

Inputs are normalised per neuron with stored statistics (`set_normalisation`; identity by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loopcast.models.vq import VectorQuantizer, code_stats

DECODES = ("argmax", "expected")


@dataclass(frozen=True)
class QuantFormerConfig:
    """Neurons, covariates, C, H, patch P (divides C and H), transformer size, codebook, masking."""

    n_neurons: int = 0
    n_covariates: int = 0
    context: int = 16
    horizon: int = 8
    patch: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    ffn_mult: int = 2
    codebook_size: int = 512
    code_dim: int = 32
    commitment: float = 0.25
    mask_ratio: float = 0.5
    visible_weight: float = 0.5
    dropout: float = 0.0
    decode: str = "expected"   # forecast(): probability-weighted code vector ("expected") or "argmax" code

    def __post_init__(self) -> None:
        for name in ("n_neurons", "context", "horizon", "patch", "d_model", "n_heads", "n_layers",
                     "ffn_mult", "code_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context % self.patch or self.horizon % self.patch:
            raise ValueError(f"patch {self.patch} must divide context {self.context} and horizon {self.horizon}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}")
        if self.n_covariates < 0 or self.codebook_size < 2:
            raise ValueError(f"need n_covariates >= 0 and codebook_size >= 2, got {self.n_covariates}, "
                             f"{self.codebook_size}")
        if not 0.0 < self.mask_ratio < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) and dropout in [0, 1), got {self.mask_ratio}, "
                             f"{self.dropout}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {list(DECODES)}, got {self.decode!r}")

    @property
    def n_context_patches(self) -> int:
        return self.context // self.patch

    @property
    def n_future_patches(self) -> int:
        return self.horizon // self.patch

    @property
    def n_patches(self) -> int:
        return self.n_context_patches + self.n_future_patches

    @classmethod
    def small(cls, n_neurons: int, n_covariates: int = 0, context: int = 8, horizon: int = 4,
              patch: int = 4) -> QuantFormerConfig:
        """A tiny model for CPU tests."""
        return cls(n_neurons=n_neurons, n_covariates=n_covariates, context=context, horizon=horizon,
                   patch=patch, d_model=32, n_heads=2, n_layers=2, codebook_size=32, code_dim=8)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out (exports to plain ONNX ops)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (R, S, d)
        r, s, d = x.shape
        q, k, v = self.qkv(x).reshape(r, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads), dim=-1)   # (R, h, S, S)
        y = (self.dropout(att) @ v).transpose(1, 2).reshape(r, s, d)                          # (R, S, d)
        return self.out(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + FFN(LN x)."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                 nn.Linear(ffn_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (R, S, d)
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))                        # (R, S, d)


class QuantFormer(nn.Module):
    """Masked auto-encoder with a VQ codebook, an activation head and a code-classification head."""

    mean: torch.Tensor                       # buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, config: QuantFormerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        self.register_buffer("mean", torch.zeros(cfg.n_neurons))
        self.register_buffer("std", torch.ones(cfg.n_neurons))
        self.patch_embed = nn.Linear(cfg.patch, d)
        self.position = nn.Parameter(0.02 * torch.randn(cfg.n_patches, d))
        self.mask_token = nn.Parameter(0.02 * torch.randn(d))
        self.neuron_embed = nn.Embedding(cfg.n_neurons, d)
        self.stimulus = nn.Linear((cfg.context + cfg.horizon) * cfg.n_covariates, d) if self.uses_covariates else None
        self.special = nn.Parameter(0.02 * torch.randn(self.n_special, d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.to_code = nn.Linear(d, cfg.code_dim)
        self.vq = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.commitment)
        self.decoder = nn.Sequential(nn.Linear(cfg.code_dim, d), nn.GELU(), nn.Linear(d, cfg.patch))
        self.activation_head = nn.Linear(2 * d, 1)
        self.code_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.codebook_size))

    @property
    def uses_covariates(self) -> bool:
        return self.config.n_covariates >= 1

    @property
    def n_special(self) -> int:
        return 2 if self.uses_covariates else 1

    @torch.no_grad()
    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-neuron input statistics (N,) (e.g. of the training frames); std is floored at 1e-6."""
        n = self.config.n_neurons
        if mean.shape != (n,) or std.shape != (n,):
            raise ValueError(f"mean and std must have shape ({n},), got {tuple(mean.shape)}, {tuple(std.shape)}")
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))

    # --- encoder -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, neuron_ids: torch.Tensor, cov: torch.Tensor | None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder outputs (B, n, S, d) (S = special tokens + C/P + H/P patches) for x (B, T, n) dF/F
        with T = C (future patches masked) or C + H (patches masked where mask (B, n, C/P + H/P))."""
        cfg = self.config
        b, _, n = x.shape
        self._check(x, neuron_ids, cov)
        xn = (x - self.mean[neuron_ids]) / self.std[neuron_ids]                          # (B, T, n)
        h = torch.cat([self._special_tokens(b, neuron_ids, cov), self._patch_tokens(xn, mask)], dim=2)
        h = h.reshape(b * n, -1, cfg.d_model)                                           # (B*n, S, d)
        for block in self.blocks:
            h = block(h)
        return self.norm(h).reshape(b, n, -1, cfg.d_model)                              # (B, n, S, d)

    def _patch_tokens(self, xn: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens (B, n, Np, d) of normalised x (B, T, n); future patches of a context are masked."""
        cfg = self.config
        b, t, n = xn.shape
        tok = self.patch_embed(xn.transpose(1, 2).reshape(b, n, t // cfg.patch, cfg.patch))   # (B, n, p, d)
        if t == cfg.context:
            future = self.mask_token.expand(b, n, cfg.n_future_patches, cfg.d_model)
            tok = torch.cat([tok, future], dim=2)                                       # (B, n, Np, d)
        elif mask is not None:
            tok = torch.where(mask[..., None], self.mask_token, tok)                    # (B, n, Np, d)
        return tok + self.position

    def _special_tokens(self, b: int, neuron_ids: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        """Neuron-identity token and, with covariates, the stimulus token: (B, n, n_special, d)."""
        n, d = neuron_ids.shape[0], self.config.d_model
        special = [self.neuron_embed(neuron_ids)[None, :, None].expand(b, n, 1, d)]
        if self.stimulus is not None:
            assert cov is not None, "a model with a stimulus token takes covariates (see _check)"
            special.append(self.stimulus(cov.reshape(b, -1))[:, None, None].expand(b, n, 1, d))
        return torch.cat(special, dim=2) + self.special                                 # (B, n, s, d)

    def _check(self, x: torch.Tensor, neuron_ids: torch.Tensor, cov: torch.Tensor | None) -> None:
        cfg = self.config
        if x.dim() != 3 or x.shape[1] not in (cfg.context, cfg.context + cfg.horizon):
            raise ValueError(f"x must be (B, C={cfg.context} or C+H={cfg.context + cfg.horizon}, n), "
                             f"got {tuple(x.shape)}")
        if neuron_ids.shape != (x.shape[2],):
            raise ValueError(f"neuron_ids must be ({x.shape[2]},), got {tuple(neuron_ids.shape)}")
        want = (x.shape[0], cfg.context + cfg.horizon, cfg.n_covariates)
        if self.uses_covariates and (cov is None or tuple(cov.shape) != want):
            raise ValueError(f"covariates must be {want}, got {None if cov is None else tuple(cov.shape)}")

    def _patches(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, :, self.n_special:]                                                 # (B, n, Np, d)

    def _decode(self, code_vectors: torch.Tensor, neuron_ids: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, n, p, D) -> traces (B, p * P, n) in dF/F units."""
        b, n, p, _ = code_vectors.shape
        y = self.decoder(code_vectors).reshape(b, n, p * self.config.patch).transpose(1, 2)   # (B, T, n)
        return y * self.std[neuron_ids] + self.mean[neuron_ids]

    # --- pretraining -------------------------------------------------------------------------------
    def random_mask(self, b: int, n: int, generator: torch.Generator | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
        """(B, n, Np) bool: round(mask_ratio * Np) (clipped to [1, Np - 1]) random patches per sequence."""
        n_patches = self.config.n_patches
        k = min(max(1, round(self.config.mask_ratio * n_patches)), n_patches - 1)
        ranks = torch.rand(b, n, n_patches, generator=generator, device=device).argsort(-1).argsort(-1)
        return ranks < k

    def pretrain_loss(self, x: torch.Tensor, neuron_ids: torch.Tensor, cov: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked auto-encoding loss on x (B, C + H, n) and its parts (plus codebook usage/perplexity)."""
        cfg = self.config
        b, t, n = x.shape
        if t != cfg.context + cfg.horizon:
            raise ValueError(f"pretraining needs C + H = {cfg.context + cfg.horizon} frames, got {t}")
        if mask is None:
            mask = self.random_mask(b, n, generator, x.device)                          # (B, n, Np)
        z = self.to_code(self._patches(self.encode(x, neuron_ids, cov, mask)))          # (B, n, Np, D)
        vq = self.vq(z)
        recon = self.decoder(vq.quantised)                                              # (B, n, Np, P)
        xn = (x - self.mean[neuron_ids]) / self.std[neuron_ids]
        target = xn.transpose(1, 2).reshape(b, n, cfg.n_patches, cfg.patch)            # (B, n, Np, P)
        err = (recon - target).pow(2).mean(-1)                                          # (B, n, Np)
        masked, visible = err[mask].mean(), err[~mask].mean()
        loss = masked + cfg.visible_weight * visible + vq.loss
        values = {"loss": loss, "masked_mse": masked, "visible_mse": visible, "vq": vq.loss}
        parts = {k: float(v.detach()) for k, v in values.items()}
        return loss, {**parts, **code_stats(vq.codes, cfg.codebook_size)}

    def code_latents(self, x: torch.Tensor, neuron_ids: torch.Tensor,
                     cov: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-quantisation latents (B, n, Np, D) of an unmasked window x (B, C + H, n)."""
        return self.to_code(self._patches(self.encode(x, neuron_ids, cov)))

    @torch.no_grad()
    def target_codes(self, x: torch.Tensor, neuron_ids: torch.Tensor,
                     cov: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, n, H/P) the quantiser assigns to the true future patches of x (B, C + H, n)."""
        return self.vq.nearest(self.code_latents(x, neuron_ids, cov)[:, :, self.config.n_context_patches:])

    # --- downstream --------------------------------------------------------------------------------
    def heads(self, context: torch.Tensor, neuron_ids: torch.Tensor,
              cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation logits (B, n) and code logits (B, n, H/P, K) from context (B, C, n)."""
        if context.shape[1] != self.config.context:
            raise ValueError(f"context must be (B, C={self.config.context}, n), got {tuple(context.shape)}")
        h = self.encode(context, neuron_ids, cov)                                        # (B, n, S, d)
        future = h[:, :, self.n_special + self.config.n_context_patches:]               # (B, n, Hp, d)
        act = self.activation_head(torch.cat([h[:, :, 0], future.mean(2)], dim=-1))     # (B, n, 1)
        return act[..., 0], self.code_head(future)

    def activation_logits(self, context: torch.Tensor, neuron_ids: torch.Tensor,
                          cov: torch.Tensor | None = None) -> torch.Tensor:
        """Logit (B, n) that each neuron's mean dF/F over the next H frames meets the criterion."""
        return self.heads(context, neuron_ids, cov)[0]

    def forecast_logits(self, context: torch.Tensor, neuron_ids: torch.Tensor,
                        cov: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the codebook (B, n, H/P, K) for every future patch."""
        return self.heads(context, neuron_ids, cov)[1]

    def decode_logits(self, logits: torch.Tensor, neuron_ids: torch.Tensor,
                      decode: str | None = None) -> torch.Tensor:
        """Code logits (B, n, H/P, K) -> traces (B, H, n): argmax code or probability-weighted codes."""
        decode = decode or self.config.decode
        if decode == "argmax":
            vectors = self.vq.lookup(logits.argmax(-1))                                 # (B, n, Hp, D)
        elif decode == "expected":
            vectors = torch.softmax(logits, -1) @ self.vq.codes()               # (B, n, Hp, D)
        else:
            raise ValueError(f"decode must be one of {list(DECODES)}, got {decode!r}")
        return self._decode(vectors, neuron_ids)

    def forecast(self, context: torch.Tensor, neuron_ids: torch.Tensor, cov: torch.Tensor | None = None,
                 decode: str | None = None) -> torch.Tensor:
        """Forecast traces (B, H, n) decoded from the predicted codes of the H/P future patches."""
        return self.decode_logits(self.forecast_logits(context, neuron_ids, cov), neuron_ids, decode)


class _AllNeurons(nn.Module):
    """Base of the export wrappers: runs `model` on all N neurons (ids 0..N-1) of a (B, C, N) context."""

    ids: torch.Tensor                        # buffer (register_buffer)

    def __init__(self, model: QuantFormer) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.register_buffer("ids", torch.arange(model.config.n_neurons), persistent=False)

    @property
    def uses_covariates(self) -> bool:
        return self.config.n_covariates >= 1

    def _check(self, context: torch.Tensor) -> None:
        cfg = self.config
        if context.dim() != 3 or context.shape[1] != cfg.context or context.shape[2] != cfg.n_neurons:
            raise ValueError(f"context must be (B, C={cfg.context}, N={cfg.n_neurons}), got {tuple(context.shape)}")


class QuantFormerActivation(_AllNeurons):
    """Engine wrapper: (B, C, N)[, (B, C + H, K)] -> (B, 1, N) activation probabilities."""

    def forward(self, context: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        # context: (B, C, N); covariates: (B, C + H, K) | None
        self._check(context)
        logits = self.model.activation_logits(context, self.ids, covariates)             # (B, N)
        return torch.sigmoid(logits)[:, None, :]                                         # (B, 1, N)


class QuantFormerForecaster(_AllNeurons):
    """Engine wrapper: (B, C, N)[, (B, C + H, K)] -> (B, H, N) traces decoded from predicted codes."""

    def forward(self, context: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        # context: (B, C, N); covariates: (B, C + H, K) | None
        self._check(context)
        return self.model.forecast(context, self.ids, covariates)                        # (B, H, N)


__all__ = ["QuantFormerConfig", "QuantFormer", "QuantFormerActivation", "QuantFormerForecaster", "DECODES"]
