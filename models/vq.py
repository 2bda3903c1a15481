"""Vector quantisation (van den Oord et al. 2017) with a straight-through estimator.

Latents z (..., D) map to their nearest codebook vector. With `normalise` (default) latents and codes
are L2-normalised first (cosine-similarity codes, Yu et al. 2022, "ViT-VQGAN"), which keeps the losses
bounded and the codebook in use without EMA updates. The loss is the VQ-VAE pair:
codebook term ||sg[z] - e||^2 (moves the codes) + `commitment` * ||z - sg[e]||^2 (keeps the encoder
near its codes). The quantised output z + sg[e - z] equals e in the forward pass and passes the
gradient to z unchanged (straight-through). Codes unused for a while can be restarted on random
latents of the current batch (`restart_dead`), which keeps a large (512) codebook in use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VQOutput:
    """Quantised latents (straight-through), code indices, and the codebook + commitment loss."""

    quantised: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor


class VectorQuantizer(nn.Module):
    """A codebook of `size` vectors of dimension `dim`, nearest-neighbour assignment."""

    usage: torch.Tensor                      # buffer (register_buffer)

    def __init__(self, size: int, dim: int, commitment: float = 0.25, normalise: bool = True,
                 usage_decay: float = 0.9) -> None:
        super().__init__()
        if size < 2 or dim < 1:
            raise ValueError(f"codebook needs size >= 2 and dim >= 1, got size={size}, dim={dim}")
        if commitment < 0:
            raise ValueError(f"commitment must be >= 0, got {commitment}")
        self.commitment = commitment
        self.normalise = normalise
        self.usage_decay = usage_decay
        self.codebook = nn.Embedding(size, dim)
        nn.init.normal_(self.codebook.weight)
        self.register_buffer("usage", torch.ones(size))  # EMA of assignments per code (training only)

    @property
    def size(self) -> int:
        return int(self.codebook.num_embeddings)

    def codes(self) -> torch.Tensor:
        """The code vectors (K, D) (unit length if `normalise`)."""
        w = self.codebook.weight
        return nn.functional.normalize(w, dim=-1) if self.normalise else w

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as compared with the codes (unit length if `normalise`)."""
        return nn.functional.normalize(z, dim=-1) if self.normalise else z

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for every latent: z (..., D) -> (...) int64."""
        z, w = self.prepare(z), self.codes()                               # (..., D), (K, D)
        dist = (z * z).sum(-1, keepdim=True) - 2 * z @ w.t() + (w * w).sum(-1)   # (..., K)
        return dist.argmin(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of `codes` (...) -> (..., D)."""
        return nn.functional.embedding(codes, self.codes())

    def forward(self, z: torch.Tensor) -> VQOutput:
        # z: (..., D)
        z = self.prepare(z)
        codes = self.nearest(z)                                            # (...)
        e = self.lookup(codes)                                             # (..., D)
        loss = (e - z.detach()).pow(2).mean() + self.commitment * (z - e.detach()).pow(2).mean()
        if self.training:
            self._track_usage(codes)
        return VQOutput(quantised=z + (e - z).detach(), codes=codes, loss=loss)

    @torch.no_grad()
    def _track_usage(self, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes.reshape(-1), minlength=self.size).to(self.usage.dtype)
        self.usage.mul_(self.usage_decay).add_(counts / max(codes.numel(), 1) * self.size,
                                               alpha=1 - self.usage_decay)

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, threshold: float = 0.03, generator: torch.Generator | None = None) -> int:
        """Move codes whose usage EMA (1 = uniform use) fell below `threshold` onto random latents of
        z (..., D); returns how many were moved."""
        dead = torch.nonzero(self.usage < threshold).flatten()
        flat = z.detach().reshape(-1, z.shape[-1])
        if len(dead) == 0 or len(flat) == 0:
            return 0
        pick = torch.randint(0, len(flat), (len(dead),), generator=generator, device=flat.device)
        self.codebook.weight[dead] = flat[pick]
        self.usage[dead] = 1.0
        return int(len(dead))


def code_stats(codes: torch.Tensor, size: int) -> dict[str, float]:
    """Share of the codebook used by `codes` and the perplexity exp(H(code histogram))."""
    counts = torch.bincount(codes.reshape(-1), minlength=size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


__all__ = ["VectorQuantizer", "VQOutput", "code_stats"]
