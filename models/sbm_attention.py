"""Attention layers of the Sparse Brain Model (models/sbm.py), paper section 2.1.

- `SpatialAttention` ("dynamic connectome layer"): attention across the neuron tokens of one time
  step, plus the stimulus token as an extra key/value. 3D geometry enters through directional
  rotary encodings (`spatial_rope_angles`). Paths with the same parameters:
    "dense":  every neuron attends to every neuron (exact, O(N^2); the reference for small N);
    "routed": balanced clusters of exactly w tokens (Roy et al. 2020, Routing Transformer); attention
              runs inside each cluster (plus the stimulus token) and the outputs are scatter-added back
              to token order and averaged over a token's memberships. Two routings (`RoutingConfig`):
      "sorted" (default, linear-time): each unit-norm routing key is scored against a FIXED small set
              of centroids and assigned to its best one; all tokens are ordered by (best centroid, then
              descending score) with one sort over N and the order is cut into ceil(N / w) consecutive
              blocks of w (the last block wraps around to the start of the order, its repeats averaged).
              `cuts` >= 2 adds cuts shifted by j * w / cuts, so every token is in `cuts` clusters.
              Cost O(N * centroids * d + N log N + N * w * d). `margin` > 0 softens the block edges:
              weight = clamp(sort-key distance to the nearest key outside the block / margin, 0, 1)
              (use it with cuts >= 2, so a token at one cut's edge sits inside another cut's block).
      "topk" (the paper as written): each of k = ceil(membership * N / w) centroids takes its top-w
              tokens (a token may be in several clusters, or in none: zero update). Its scoring is
              (S, k, N): O(N^2 / w) time, which dominates at whole-brain N. `margin` > 0 makes
              membership soft near the boundary (weight = clamp((score - best non-member score) /
              margin, 0, 1), used as a key bias log(weight) and in the weighted average).
    In training mode the centroids (buffers) follow an EMA k-means update towards the mean routing
    key of their members. Hard membership is discontinuous: two runtimes whose float results differ
    by ~1e-7 can route a boundary token differently (a visible jump at the members of a few clusters;
    at N = 71,721 with hard sorted routing ~1% of the neurons differed by > 1e-5 between torch and
    ONNX Runtime). margin > 0 makes cluster edges continuous.
- `TemporalAttention` ("temporal neuron layer"): causal attention along time within each neuron,
  standard RoPE over time indices; every (batch, neuron) pair is an independent sequence.

Rotary encodings use full-width cos and sign-folded sin, x * cos + swap_halves(x) * sin, and the
half swap is folded into the projection weights (rows of W_q, W_k permuted: `rotary_qk`), so no
slicing, concatenation or strided elementwise work; v (and the routing key) are their own matmuls.
The temporal layer works in the (B, T, N, d) layout of the block (no transposes around it).
Every projection is bias-free, so a token in no cluster really gets a zero update. Gathers and
scatters use index_select / index_add on flattened (tokens, d) tensors: they export to ONNX
(Gather / ScatterND with add) without materialising (tokens, d) index tensors. ONNX Runtime's
threaded ScatterND-add races on duplicate indices, so "sorted" scatters each cut in duplicate-free
spans (`cut_spans`); "topk" (overlapping clusters) still scatters at once: run such an exported graph
with intra_op_num_threads = 1 where bit-stable outputs matter. While exporting, attention is written
as matmul / softmax (`attend`), which ONNX Runtime fuses better than the exporter's SDPA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

ROUTING_CHUNK = 32      # centroids scored per topk call
MIN_KEY_WEIGHT = 1e-6   # floor of a soft member's key weight (keeps every attention row finite)
ROUTINGS = ("sorted", "topk")


@dataclass(frozen=True)
class RoutingConfig:
    """How SpatialAttention forms clusters: attention "routed" | "dense"; routing "sorted" | "topk";
    centroids (sorted: the fixed small set; topk: one per cluster); width w; cuts (sorted: memberships
    per token); EMA decay of the centroids; margin (soft cluster boundary, 0 = hard)."""

    attention: str = "routed"
    routing: str = "sorted"
    centroids: int = 16
    width: int = 1
    cuts: int = 1
    decay: float = 0.999
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.attention not in ("routed", "dense"):
            raise ValueError(f"attention must be 'routed' or 'dense', got {self.attention!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if min(self.centroids, self.width, self.cuts) < 1:
            raise ValueError(f"centroids, width and cuts must be >= 1, got {self.centroids}, {self.width}, "
                             f"{self.cuts}")


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a learnable gain (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of the last axis of x by angles given as cos/sin.
    The reference formula (tests); the layers use `rope_tables` + `folded_qkv` instead.

    x: (..., L, heads, dh); cos, sin: (L, dh / 2), broadcast over heads and leading axes."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]                           # (L, 1, dh / 2)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, dh / 2) -> full-width [cos, cos] and sign-folded [-sin, sin], (L, 1, dh) each, so
    that rotate(x) = x * cos_full + swap_halves(x) * sin_folded (broadcast over heads)."""
    return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]


def half_swap(d_model: int, n_heads: int) -> torch.Tensor:
    """Permutation (d,) of a (heads * dh) axis that swaps the two halves within every head."""
    return torch.arange(d_model).view(n_heads, 2, d_model // n_heads // 2).flip(1).reshape(-1)


def rotary_qk(h: torch.Tensor, weight: torch.Tensor, swap: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, n_heads: int) -> torch.Tensor:
    """RoPE'd q and k: q, k and their half-swapped copies from two matmuls (the swap folded into
    permuted weight rows), so no slicing, concatenation or strided elementwise work.

    h: (..., d); weight: (3d, d) rows [q; k; v]; swap: (2d,) = half_swap(2d, 2 nh); cos, sin: `rope_tables`
    broadcastable to (..., 2 nh, dh) -> rotated [q, k] heads (..., 2 nh, dh), contiguous."""
    d = h.shape[-1]
    shape = (*h.shape[:-1], 2 * n_heads, d // n_heads)
    qk = F.linear(h, weight[:2 * d]).view(shape)                          # (..., 2 nh, dh)
    swapped = F.linear(h, weight[:2 * d].index_select(0, swap)).view(shape)
    return qk * cos + swapped * sin


def spatial_rope_angles(positions: torch.Tensor, n_pairs: int, min_freq: float, max_freq: float,
                        seed: int) -> torch.Tensor:
    """Directional rotary angles (N, n_pairs): pair i turns by f_i * <p_n, u_i>, with u_i a fixed
    random unit direction (seeded) and f_i log-spaced in [min_freq, max_freq] (radians per unit of
    the normalised positions). Angles are linear in p, so q.k depends on p_n - p_m only."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_pairs, 3, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)                      # (P, 3) unit directions
    freqs = torch.logspace(math.log10(min_freq), math.log10(max_freq), n_pairs, dtype=torch.float64)
    return ((positions.double() @ dirs.T) * freqs).float()            # (N, P)


def time_rope(length: int, n_pairs: int, base: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Standard RoPE (Su et al. 2021) cos/sin over time indices 0..length-1: (length, n_pairs) each."""
    inv = base ** (-torch.arange(n_pairs, dtype=torch.float32, device=device) / n_pairs)   # (P,)
    ang = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv          # (T, P)
    return ang.cos(), ang.sin()


@torch.no_grad()
def balanced_routing(keys: torch.Tensor, centroids: torch.Tensor, width: int, margin: float = 0.0,
                     chunk: int = ROUTING_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routing "topk": each centroid takes the `width` tokens whose routing keys score highest against it.

    keys: (S, N, D) unit-norm routing keys; centroids: (k, D) -> token indices (S, k, width) and, if
    margin > 0, membership weights (S, k, width) = clamp((score - best non-member score) / margin,
    0, 1), which make joining or leaving a cluster continuous (None: hard membership, weight 1).
    Centroids are scored `chunk` at a time, so the (S, chunk, N) score tensor bounds the memory
    (the full (S, k, N) one grows as N^2 / w, and so does the time)."""
    soft = margin > 0 and width < keys.shape[1]
    idx, weight = [], []
    for start in range(0, centroids.shape[0], chunk):          # static k: unrolled when exported
        scores = torch.matmul(centroids[start:start + chunk], keys.transpose(1, 2))   # (S, c, N)
        top = torch.topk(scores, width + 1 if soft else width, dim=-1)               # (S, c, w [+ 1])
        idx.append(top.indices[..., :width])
        if soft:
            gap = top.values[..., :width] - top.values[..., width:]                  # (S, c, w)
            weight.append((gap / margin).clamp(0.0, 1.0))
    return torch.cat(idx, dim=1), torch.cat(weight, dim=1) if soft else None        # (S, k, w) x2


def cut_positions(n_tokens: int, width: int, cuts: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions in the sorted order of the `cuts` cuts into ceil(N / w) blocks of w: cut j starts at
    j * w // cuts and wraps around the end of the order. -> (cuts * ceil(N / w) * w,) int64."""
    span = math.ceil(n_tokens / width) * width
    starts = torch.arange(cuts, device=device) * width // cuts                         # (cuts,)
    return ((starts[:, None] + torch.arange(span, device=device)) % n_tokens).reshape(-1)


@torch.no_grad()
def sorted_routing(keys: torch.Tensor, centroids: torch.Tensor, width: int, cuts: int = 1,
                   margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Routing "sorted": assign each token to its best centroid, order the tokens by (centroid id, then
    descending score) and cut the order into consecutive blocks of exactly `width` tokens.

    keys: (S, N, D) unit-norm routing keys; centroids: (c, D) -> token indices (S, cuts * ceil(N / w), w),
    each token's best centroid (S, N) and, if margin > 0, membership weights (S, k, w) =
    clamp(distance of the member's sort key to the nearest key outside its block / margin, 0, 1):
    tokens that could swap across a block edge count ~0 there, so the edge is continuous (the sorted
    keys are continuous in the inputs; a change of best centroid is not). O(N c D + N log N)."""
    s, n, _ = keys.shape
    best_score, best = torch.matmul(keys, centroids.T).max(dim=-1)    # (S, N) x2
    sort_key = best.double() * 4.0 - best_score.double()              # (S, N): exact ordering, score in [-1, 1]
    top = torch.topk(sort_key, n, dim=-1, largest=False)              # (S, N): a full sort (ONNX TopK)
    pos = cut_positions(n, width, cuts, keys.device)                  # (k * w,)
    idx = top.indices.index_select(1, pos).view(s, -1, width)         # (S, k, w)
    if margin <= 0 or n <= width:
        return idx, best, None
    member = top.values.index_select(1, pos).view(s, -1, width)       # (S, k, w) sorted keys
    blocks = pos.view(-1, width)                                      # (k, w)
    before = top.values.index_select(1, (blocks[:, 0] - 1) % n)[..., None]     # (S, k, 1) key before the block
    after = top.values.index_select(1, (blocks[:, -1] + 1) % n)[..., None]     # (S, k, 1) key after it
    gap = torch.minimum((member - before).abs(), (after - member).abs())
    return idx, best, (gap / margin).clamp(0.0, 1.0).float()


def flat_index(idx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Indices (S, k, w) into per-sample token lists -> indices into the (S * N) flattened tokens."""
    offsets = torch.arange(idx.shape[0], device=idx.device) * n_tokens                   # (S,)
    return (idx + offsets[:, None, None]).reshape(-1)                 # (S * k * w,)


def scatter_mean(values: torch.Tensor, idx: torch.Tensor, n_tokens: int, weight: torch.Tensor | None = None,
                 spans: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Scatter-add cluster outputs back to token order and average over memberships.

    values: (S, k, w, D) outputs of cluster members; idx: (S, k, w) their token indices; weight:
    (S, k, w) membership weights (None: all 1) -> (S, N, D) = sum(weight * value) / max(sum(weight), 1)
    per token: the mean over its memberships, zeros for a token in no cluster.
    spans: ranges [a, b) of the flattened k * w members, each holding no token twice, scattered one
    after the other (None: all at once). ONNX Runtime's multi-threaded ScatterND with reduction add
    races on duplicate indices (microsoft/onnxruntime#23396: run-to-run differences of ~1e-2), so an
    exported graph needs duplicate-free scatters."""
    s, k, w, d = values.shape
    weight = values.new_ones(s, k, w) if weight is None else weight
    values, idx, weight = values.reshape(s, k * w, d), idx.reshape(s, k * w, 1), weight.reshape(s, k * w)
    total, count = values.new_zeros(s * n_tokens, d), values.new_zeros(s * n_tokens)
    for a, b in spans or [(0, k * w)]:                               # static: unrolled when exported
        flat = flat_index(idx[:, a:b], n_tokens)                      # (S * (b - a),)
        part = weight[:, a:b].reshape(-1)
        total = total.index_add(0, flat, values[:, a:b].reshape(-1, d) * part[:, None])
        count = count.index_add(0, flat, part)                        # (S * N,)
    return (total / count.clamp(min=1.0)[:, None]).reshape(s, n_tokens, d)


def cut_spans(n_tokens: int, width: int, cuts: int) -> list[tuple[int, int]]:
    """Duplicate-free member ranges of `sorted_routing`'s cuts: per cut, its first N positions (a
    permutation of the tokens) and its wrap-around pad (fewer than w distinct tokens)."""
    span = math.ceil(n_tokens / width) * width
    ranges = [(j * span + a, j * span + b) for j in range(cuts) for a, b in ((0, n_tokens), (n_tokens, span))]
    return [(a, b) for a, b in ranges if b > a]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention (S, nh, L, dh) x (S, nh, M, dh) -> (S, nh, L, dh). Eager: torch's SDPA
    kernel. While exporting: the same maths as matmul / softmax, which ONNX Runtime fuses into one
    MatMul with k transposed and scaled (the exporter's SDPA decomposition leaves a standalone
    Transpose of k, ~10-20% of a whole-brain step)."""
    if not torch.compiler.is_exporting():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5            # (S, nh, L, M)
    if causal:
        scores = scores + torch.full(scores.shape[-2:], float("-inf"), device=q.device).triu(1)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / max(|x|, eps) along the last axis (F.normalize without its exported Expand)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp(min=eps * eps))


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(S, nh, L, dh) attention output -> contiguous (S, L, nh, dh). An explicit copy: the ONNX exporter
    may decompose SDPA into another memory layout than the one a view was traced against."""
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format)


class SpatialAttention(nn.Module):
    """Multi-head attention across the neurons of each time step (+ a stimulus key/value), dense or
    routed into clusters of exactly `routing.width` tokens (see the module docstring)."""

    swap: torch.Tensor                       # buffers (register_buffer)
    cos: torch.Tensor
    sin: torch.Tensor
    centroids: torch.Tensor                  # routed attention only

    def __init__(self, d_model: int, n_heads: int, angles: torch.Tensor, routing: RoutingConfig) -> None:
        super().__init__()
        self.n_heads, self.routing = n_heads, routing
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.stim_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("swap", half_swap(2 * d_model, 2 * n_heads), persistent=False)   # (2d,)
        cos, sin = rope_tables(angles.cos(), angles.sin())
        self.register_buffer("cos", cos, persistent=False)           # (N, 1, dh)
        self.register_buffer("sin", sin, persistent=False)
        if routing.attention == "routed":
            init = F.normalize(torch.randn(routing.centroids, d_model), dim=-1)
            self.register_buffer("centroids", init)                   # (c, d)

    def forward(self, h: torch.Tensor, stim: torch.Tensor | None) -> torch.Tensor:
        # h: (S, N, d) normed neuron tokens of S = B * T time slices; stim: (S, d) | None
        d = h.shape[-1]
        weight = self.qkv.weight                                      # (3d, d) rows [q; k; v]
        qk = rotary_qk(h, weight, self.swap, self.cos, self.sin, self.n_heads)        # (S, N, 2 nh, dh)
        v = F.linear(h, weight[2 * d:])                               # (S, N, d)
        extra = None if stim is None else self._stim_kv(stim)          # 2 x (S, nh, 1, dh)
        if self.routing.attention == "dense":
            out = self._dense(qk, v, extra)                            # (S, N, d)
        else:
            out = self._routed(qk, v, extra, unit(F.linear(h, weight[d:2 * d])))   # unit routing keys
        return self.out(out)                                          # (S, N, d)

    def _stim_kv(self, stim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, d = stim.shape
        k, v = self.stim_kv(stim).view(s, 2, self.n_heads, 1, d // self.n_heads).unbind(1)
        return k, v                                                   # (S, nh, 1, dh) each

    def _dense(self, qk: torch.Tensor, v: torch.Tensor,
               extra: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        s, n, nh2, dh = qk.shape
        qk = qk.transpose(1, 2)                                       # (S, 2 nh, N, dh)
        q, k, v = qk[:, :nh2 // 2], qk[:, nh2 // 2:], v.reshape(s, n, nh2 // 2, dh).transpose(1, 2)
        if extra is not None:
            k, v = torch.cat([k, extra[0]], dim=2), torch.cat([v, extra[1]], dim=2)   # (S, nh, N + 1, dh)
        out = attend(q, k, v)                                         # (S, nh, N, dh)
        return merge_heads(out).view(s, n, nh2 // 2 * dh)

    def _route(self, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cluster members (S, k, w) and soft weights (topk with margin > 0) or None; EMA in training."""
        r = self.routing
        if r.routing == "sorted":
            idx, best, weight = sorted_routing(route, self.centroids, r.width, r.cuts, r.margin)
            if self.training:
                self._update_centroids(route, best.reshape(-1), best.numel())
            return idx, weight
        idx, weight = balanced_routing(route, self.centroids, r.width, r.margin)
        if self.training:                                             # member j of cluster c -> c
            owner = torch.arange(idx.shape[1], device=idx.device)[None, :, None].expand_as(idx)
            members = route.reshape(-1, route.shape[-1]).index_select(0, flat_index(idx, route.shape[1]))
            self._update_centroids(members, owner.reshape(-1), idx.numel())
        return idx, weight

    def _routed(self, qk: torch.Tensor, v: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None,
                route: torch.Tensor) -> torch.Tensor:
        s, n, nh2, dh = qk.shape
        nh = nh2 // 2
        idx, weight = self._route(route)                               # (S, c, w), (S, c, w) | None
        c, w = idx.shape[1], idx.shape[2]
        flat = flat_index(idx, n)                                     # (S * c * w,)
        qk = qk.reshape(s * n, nh2 * dh).index_select(0, flat).view(s * c, w, nh2, dh).transpose(1, 2)
        q, k = qk[:, :nh], qk[:, nh:]                                 # (S * c, nh, w, dh)
        v = v.reshape(s * n, nh * dh).index_select(0, flat).view(s * c, w, nh, dh).transpose(1, 2)
        if extra is not None:
            ek, ev = (e[:, None].expand(s, c, nh, 1, dh).reshape(s * c, nh, 1, dh) for e in extra)
            k, v = torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)            # (S * c, nh, w + 1, dh)
        out = attend(q, k, v, self._key_bias(weight, extra is not None))          # (S * c, nh, w, dh)
        out = merge_heads(out).view(s, c, w, nh * dh)                 # (S, c, w, d)
        r = self.routing
        spans = cut_spans(n, r.width, r.cuts) if r.routing == "sorted" else None    # topk: see scatter_mean
        return scatter_mean(out, idx, n, weight, spans)               # (S, N, d)

    @staticmethod
    def _key_bias(weight: torch.Tensor | None, stim: bool) -> torch.Tensor | None:
        """Soft membership as an additive key bias log(weight) (floored at MIN_KEY_WEIGHT; the stimulus
        key has weight 1): (S * c, 1, 1, w [+ 1]) or None for hard membership."""
        if weight is None:
            return None
        s, c, w = weight.shape
        bias = weight.clamp(min=MIN_KEY_WEIGHT).log().reshape(s * c, 1, 1, w)
        return F.pad(bias, (0, 1)) if stim else bias

    @torch.no_grad()
    def _update_centroids(self, keys: torch.Tensor, owner: torch.Tensor, count: int) -> None:
        """EMA k-means: move each centroid towards the mean of the routing keys it owns (keys (..., d)
        flattened to (count, d), owner (count,) centroid ids); centroids owning nothing stay; renormalise."""
        keys = keys.reshape(count, -1)
        total = torch.zeros_like(self.centroids).index_add(0, owner, keys)             # (c, d)
        size = keys.new_zeros(len(self.centroids)).index_add(0, owner, keys.new_ones(count))
        mean = torch.where(size[:, None] > 0, total / size.clamp(min=1.0)[:, None], self.centroids)
        new = self.routing.decay * self.centroids + (1.0 - self.routing.decay) * mean
        self.centroids.copy_(F.normalize(new, dim=-1))


class TemporalAttention(nn.Module):
    """Causal multi-head attention along time within each neuron, with RoPE over time indices."""

    swap: torch.Tensor                       # buffer (register_buffer)

    def __init__(self, d_model: int, n_heads: int, base: float = 10000.0) -> None:
        super().__init__()
        self.n_heads, self.base = n_heads, base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("swap", half_swap(2 * d_model, 2 * n_heads), persistent=False)   # (2d,)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, T, N, d) normed tokens; every (b, n) is an independent sequence along T
        b, t, n, d = h.shape
        nh, dh = self.n_heads, d // self.n_heads
        cos, sin = rope_tables(*time_rope(t, dh // 2, self.base, h.device))           # (T, 1, dh) x2
        qk = rotary_qk(h, self.qkv.weight, self.swap, cos[:, None], sin[:, None], nh)  # (B, T, N, 2 nh, dh)
        qk = qk.permute(0, 2, 3, 1, 4).reshape(b * n, 2 * nh, t, dh)                  # (B * N, 2 nh, T, dh)
        v = F.linear(h, self.qkv.weight[2 * d:]).view(b, t, n, nh, dh)
        v = v.permute(0, 2, 3, 1, 4).reshape(b * n, nh, t, dh)                        # (B * N, nh, T, dh)
        out = attend(qk[:, :nh], qk[:, nh:], v, causal=True)                          # (B * N, nh, T, dh)
        return self.out(out.view(b, n, nh, t, dh).permute(0, 3, 1, 2, 4).reshape(b, t, n, d))   # (B, T, N, d)


__all__ = ["ROUTINGS", "RMSNorm", "RoutingConfig", "SpatialAttention", "TemporalAttention", "attend",
           "balanced_routing", "cut_positions", "cut_spans", "flat_index", "half_swap", "merge_heads", "rope_tables",
           "rotary_qk", "rotate", "scatter_mean", "sorted_routing", "spatial_rope_angles", "time_rope", "unit"]
