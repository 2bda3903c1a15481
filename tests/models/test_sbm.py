from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from loopcast.models.sbm import SBMBlock, SBMConfig, SparseBrainModel, bce_loss, normalise_positions
from loopcast.models.sbm_attention import (
    balanced_routing,
    cut_positions,
    cut_spans,
    half_swap,
    rope_tables,
    rotary_qk,
    rotate,
    scatter_mean,
    sorted_routing,
    spatial_rope_angles,
)
from loopcast.offline_training.export.engine import (
    COVARIATES_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    export_program,
)

torch.set_num_threads(1)
N = 40


@pytest.fixture
def positions() -> torch.Tensor:
    """Soma positions (N, 3) in voxels of a fish-like box."""
    gen = torch.Generator().manual_seed(1)
    return torch.rand(N, 3, generator=gen) * torch.tensor([200.0, 120.0, 30.0])


@pytest.fixture
def spikes() -> torch.Tensor:
    """Spike probabilities (2, 6, N) in [0, 1]."""
    return torch.rand(2, 6, N, generator=torch.Generator().manual_seed(2)) ** 3


def _sbm(positions: torch.Tensor, k: int = 0, **kw: Any) -> SparseBrainModel:
    torch.manual_seed(0)
    return SparseBrainModel(SBMConfig.small(N, k, **kw), positions).eval()


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("attention, routing", [("routed", "sorted"), ("routed", "topk"), ("dense", "sorted")])
def test_shapes_and_probabilities(positions: torch.Tensor, spikes: torch.Tensor, k: int, attention: str,
                                  routing: str) -> None:
    model = _sbm(positions, k, horizon=3, attention=attention, routing=routing, ffn_mult=2, membership=2)
    cov = torch.rand(2, 6 + 3, k) if k else None
    with torch.no_grad():
        logits = model.logits(spikes, None if cov is None else cov[:, :6])
        probs = model(spikes, cov)
    assert model.uses_covariates == (k > 0)
    assert logits.shape == (2, 6, N) and probs.shape == (2, 3, N)
    assert ((probs > 0) & (probs < 1)).all()


def test_config_cluster_count() -> None:
    cfg = SBMConfig.small(1000, cluster_size=256, membership=1.5, routing="topk")
    k = math.ceil(1500 / 256)                                       # topk: one centroid per cluster
    assert (cfg.cluster_width, cfg.n_clusters, cfg.routing_config.centroids) == (256, k, k)
    two_cuts = SBMConfig.small(1000, cluster_size=256, membership=2)  # sorted: 2 cuts of ceil(N / w) blocks
    assert (two_cuts.n_clusters, two_cuts.routing_config.centroids, two_cuts.routing_config.cuts) == (8, 16, 2)
    tiny = SBMConfig.small(10, cluster_size=64)                     # w > N: one cluster of all N
    assert (tiny.cluster_width, tiny.n_clusters) == (10, 1)
    paper = SBMConfig.paper(71721, 26)
    assert (paper.context, paper.cluster_size, paper.ffn_mult, paper.attention) == (12, 256, 0, "routed")
    assert (paper.routing, paper.routing_centroids) == ("sorted", 16)


@pytest.mark.parametrize("routing", ["sorted", "topk"])
def test_routed_equals_dense_with_one_cluster(positions: torch.Tensor, spikes: torch.Tensor, routing: str) -> None:
    routed = _sbm(positions, 3, cluster_size=N, routing=routing)
    dense = _sbm(positions, 3, cluster_size=N, attention="dense")
    missing, unexpected = dense.load_state_dict(routed.state_dict(), strict=False)
    assert not missing and all(key.endswith("centroids") for key in unexpected)
    assert routed.config.n_clusters == 1
    cov = torch.rand(2, 6, 3)
    with torch.no_grad():
        torch.testing.assert_close(routed.logits(spikes, cov), dense.logits(spikes, cov), atol=1e-5, rtol=1e-5)
    small = _sbm(positions, 3, cluster_size=8, routing=routing)   # 5 clusters: really different
    small.load_state_dict(dense.state_dict(), strict=False)      # same weights, its own centroids
    with torch.no_grad():
        assert (small.logits(spikes, cov) - dense.logits(spikes, cov)).abs().max() > 1e-4


@pytest.mark.parametrize("attention, routing", [("routed", "sorted"), ("routed", "topk"), ("dense", "sorted")])
def test_causal_in_time(positions: torch.Tensor, spikes: torch.Tensor, attention: str, routing: str) -> None:
    model = _sbm(positions, 3, attention=attention, routing=routing, cluster_size=8, membership=2)
    cov = torch.rand(2, 6, 3)
    changed, t = spikes.clone(), 3
    changed[:, t] = torch.rand(2, N)
    with torch.no_grad():
        a, b = model.logits(spikes, cov), model.logits(changed, cov)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=(0, 2)).min() > 0   # every later step sees it


def test_routing_is_balanced_top_w() -> None:
    gen = torch.Generator().manual_seed(3)
    keys = torch.nn.functional.normalize(torch.randn(4, 50, 8, generator=gen), dim=-1)
    cents = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    idx, weight = balanced_routing(keys, cents, 12)
    assert idx.shape == (4, 5, 12) and weight is None              # hard membership
    chunked, _ = balanced_routing(keys, cents, 12, chunk=2)        # 3 topk calls, same clusters
    assert torch.equal(chunked.sort(dim=-1).values, idx.sort(dim=-1).values)
    for s in range(4):
        for c in range(5):
            members = set(idx[s, c].tolist())
            assert len(members) == 12                              # exactly w distinct tokens
            scores = keys[s] @ cents[c]
            assert scores[list(members)].min() >= scores.sort(descending=True).values[11]


@pytest.mark.parametrize("n, w", [(48, 12), (50, 12)])
def test_sorted_routing_cuts_balanced_blocks(n: int, w: int) -> None:
    gen = torch.Generator().manual_seed(8)
    keys = torch.nn.functional.normalize(torch.randn(3, n, 8, generator=gen), dim=-1)
    cents = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    idx, best, weight = sorted_routing(keys, cents, w)
    assert weight is None                                          # hard membership
    n_blocks = math.ceil(n / w)
    assert idx.shape == (3, n_blocks, w)                           # every block exactly w tokens
    for s in range(3):
        count = torch.bincount(idx[s].reshape(-1), minlength=n)
        assert count.min() == 1 and (count > 1).sum() == n_blocks * w - n   # each once; the wrap pads repeat
        torch.testing.assert_close(best[s], (keys[s] @ cents.T).argmax(-1), atol=0, rtol=0)
        order = idx[s, :, :].reshape(-1)[:n]                       # (centroid, descending score) order
        ids, score = best[s][order], (keys[s] @ cents.T).amax(-1)[order]
        assert (ids[1:] >= ids[:-1]).all()
        same = ids[1:] == ids[:-1]
        assert (score[1:][same] <= score[:-1][same]).all()


def test_shifted_cut_doubles_memberships() -> None:
    gen = torch.Generator().manual_seed(9)
    keys = torch.nn.functional.normalize(torch.randn(2, 48, 8, generator=gen), dim=-1)
    cents = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    one = sorted_routing(keys, cents, 12)[0]
    two = sorted_routing(keys, cents, 12, cuts=2)[0]
    assert two.shape == (2, 8, 12) and torch.equal(two[:, :4], one)          # first cut unchanged
    for s in range(2):
        assert torch.equal(torch.bincount(two[s, 4:].reshape(-1), minlength=48), torch.ones(48, dtype=torch.long))
        assert torch.equal(two[s, 4:].reshape(-1), one[s].reshape(-1).roll(-6))  # the same order, shifted w / 2
    assert cut_positions(10, 4, 2).tolist() == [*range(10), 0, 1, *range(2, 10), 0, 1, 2, 3]
    assert cut_spans(10, 4, 2) == [(0, 10), (10, 12), (12, 22), (22, 24)]   # each range duplicate-free
    for a, b in cut_spans(10, 4, 2):
        assert len(set(cut_positions(10, 4, 2)[a:b].tolist())) == b - a


def test_sorted_soft_margin_weights_block_edges() -> None:
    gen = torch.Generator().manual_seed(11)
    keys = torch.nn.functional.normalize(torch.randn(2, 40, 8, generator=gen), dim=-1)
    cents = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    idx, best, weight = sorted_routing(keys, cents, 10, cuts=2, margin=0.05)
    assert torch.equal(idx, sorted_routing(keys, cents, 10, cuts=2)[0])      # same blocks, soft edges
    assert weight is not None and weight.shape == idx.shape and weight.min() < 1 and weight.max() == 1
    score = (keys @ cents.T).amax(-1).double()
    sort_key = best.double() * 4 - score                                     # (S, N)
    order = sort_key.sort(dim=-1).values
    lo, hi = order[0, 9], order[0, 10]                                       # the edge between blocks 0 and 1
    last, first = sort_key[0, idx[0, 0, -1]], sort_key[0, idx[0, 1, 0]]      # block 0's last, block 1's first
    torch.testing.assert_close(weight[0, 0, -1].double(), ((last - hi).abs() / 0.05).clamp(max=1))
    torch.testing.assert_close(weight[0, 1, 0].double(), ((first - lo).abs() / 0.05).clamp(max=1))


def test_scatter_mean_in_duplicate_free_spans_is_the_same() -> None:
    gen = torch.Generator().manual_seed(12)
    idx = cut_positions(10, 4, 2).view(1, 6, 4).repeat(2, 1, 1)              # (S=2, k=6, w=4), duplicates
    values, weight = torch.randn(2, 6, 4, 3, generator=gen), torch.rand(2, 6, 4, generator=gen)
    torch.testing.assert_close(scatter_mean(values, idx, 10, weight, cut_spans(10, 4, 2)),
                               scatter_mean(values, idx, 10, weight))


def test_folded_rope_equals_reference_rotation() -> None:
    gen = torch.Generator().manual_seed(10)
    h, weight = torch.randn(3, 7, 24, generator=gen), torch.randn(72, 24, generator=gen)
    angles = torch.randn(7, 4, generator=gen) * 3
    qk = rotary_qk(h, weight, half_swap(48, 6), *rope_tables(angles.cos(), angles.sin()), n_heads=3)
    q_ref, k_ref, _ = torch.nn.functional.linear(h, weight).view(3, 7, 3, 3, 8).unbind(2)   # (S, L, nh, dh)
    assert qk.shape == (3, 7, 6, 8) and qk.is_contiguous()
    torch.testing.assert_close(qk[:, :, :3], rotate(q_ref, angles.cos(), angles.sin()), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(qk[:, :, 3:], rotate(k_ref, angles.cos(), angles.sin()), atol=1e-6, rtol=1e-6)


def test_scatter_mean_averages_memberships() -> None:
    # token 0 in cluster 0; token 1 in clusters 0 and 1; token 2 twice in cluster 1's list; token 3 in none
    idx = torch.tensor([[[0, 1], [1, 2]], [[3, 3], [2, 0]]])         # (S=2, k=2, w=2)
    values = torch.tensor([[[[1.0], [1.0]], [[3.0], [3.0]]], [[[4.0], [6.0]], [[2.0], [8.0]]]])
    out = scatter_mean(values, idx, 4)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 2.0, 3.0, 0.0]))
    torch.testing.assert_close(out[1, :, 0], torch.tensor([8.0, 0.0, 2.0, 5.0]))


def test_soft_margin_weights_members_near_the_boundary() -> None:
    gen = torch.Generator().manual_seed(6)
    keys = torch.nn.functional.normalize(torch.randn(2, 30, 8, generator=gen), dim=-1)
    cents = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    idx, weight = balanced_routing(keys, cents, 10, margin=0.05)
    assert torch.equal(idx.sort(-1).values, balanced_routing(keys, cents, 10)[0].sort(-1).values)
    scores = torch.einsum("kd,snd->skn", cents, keys)
    best_out = scores.sort(dim=-1, descending=True).values[..., 10:11]          # best non-member
    torch.testing.assert_close(weight, ((scores.gather(-1, idx) - best_out) / 0.05).clamp(0, 1))
    assert weight is not None and weight.min() < 1 and weight.max() == 1


def test_scatter_mean_with_soft_weights() -> None:
    idx = torch.tensor([[[0, 1], [1, 2]]])                           # token 1 in both clusters
    values = torch.tensor([[[[2.0], [2.0]], [[4.0], [4.0]]]])
    weight = torch.tensor([[[0.5, 1.0], [0.5, 0.25]]])
    out = scatter_mean(values, idx, 3, weight)[0, :, 0]
    torch.testing.assert_close(out, torch.tensor([1.0, (2.0 + 2.0) / 1.5, 1.0]))   # sum(w v) / max(sum w, 1)


@pytest.mark.parametrize("routing", ["sorted", "topk"])
def test_soft_margin_is_continuous(positions: torch.Tensor, spikes: torch.Tensor, routing: str) -> None:
    hard = _sbm(positions, 0, cluster_size=8, routing=routing, membership=2)
    soft = _sbm(positions, 0, cluster_size=8, routing=routing, membership=2, routing_margin=0.05)
    with torch.no_grad():
        a = soft.logits(spikes)
        assert (a - hard.logits(spikes)).abs().max() > 0              # the boundary members count less
        noise = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(7))
        nudged = soft.logits(spikes * (1 + 1e-5 * noise))
    assert (nudged - a).abs().max() < 1e-3


@pytest.mark.parametrize("routing", ["sorted", "topk"])
def test_centroids_follow_ema_in_training_only(positions: torch.Tensor, spikes: torch.Tensor, routing: str) -> None:
    model = _sbm(positions, 0, cluster_size=8, routing=routing)
    block = model.blocks[0]
    assert isinstance(block, SBMBlock)
    before = block.spatial.centroids.clone()
    with torch.no_grad():
        model.logits(spikes)
        assert torch.equal(block.spatial.centroids, before)
        model.train().logits(spikes)
    after = block.spatial.centroids
    assert not torch.equal(after, before)
    torch.testing.assert_close(after.norm(dim=1), torch.ones(len(after)))


def test_spatial_rope_depends_on_relative_position() -> None:
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(6, 3, generator=gen)
    q, k = torch.randn(1, 6, 1, 8, generator=gen), torch.randn(1, 6, 1, 8, generator=gen)

    def scores(pos: torch.Tensor) -> torch.Tensor:
        ang = spatial_rope_angles(pos, 4, 1.0, 16.0, seed=0)
        rq, rk = rotate(q, ang.cos(), ang.sin()), rotate(k, ang.cos(), ang.sin())
        return torch.einsum("bnhd,bmhd->nm", rq, rk)

    torch.testing.assert_close(scores(p), scores(p + torch.tensor([0.3, -1.0, 2.0])), atol=1e-4, rtol=1e-4)
    assert (scores(p) - scores(p * 1.5)).abs().max() > 1e-3


def test_rollout_feeds_predictions_and_shifted_covariates(positions: torch.Tensor, spikes: torch.Tensor) -> None:
    model = _sbm(positions, 3, horizon=3)
    cov = torch.rand(2, 9, 3)
    with torch.no_grad():
        got = model(spikes, cov)
        window = spikes
        for j in range(3):
            p = torch.sigmoid(model.logits(window, cov[:, j + 1:j + 7])[:, -1])
            torch.testing.assert_close(got[:, j], p)
            window = torch.cat([window[:, 1:], p[:, None]], dim=1)


def _alternating(gen: torch.Generator, batch: int) -> torch.Tensor:
    """Each neuron spikes every other step with a random phase: x[t + 1] = 1 - x[t]. (B, 6, N)"""
    phase = torch.randint(0, 2, (batch, 1, N), generator=gen)
    return ((torch.arange(6)[None, :, None] + phase) % 2).float()


def test_training_reduces_bce(positions: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(5)
    model = _sbm(positions, 0, cluster_size=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x_val = _alternating(gen, 8)
    with torch.no_grad():
        before = bce_loss(model.logits(x_val), x_val).item()
    for _ in range(20):
        x = _alternating(gen, 8)
        loss = bce_loss(model.logits(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = bce_loss(model.logits(x_val), x_val).item()
    assert after < 0.5 * before


def test_positions_are_centred_and_scaled(positions: torch.Tensor) -> None:
    p = normalise_positions(positions.numpy(), N)
    torch.testing.assert_close(p.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    assert p.norm(dim=1).max().item() == pytest.approx(1.0)


def test_bad_inputs_raise(positions: torch.Tensor, spikes: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="positions"):
        SparseBrainModel(SBMConfig.small(N), positions[:, :2])
    with pytest.raises(ValueError, match="positions"):
        SparseBrainModel(SBMConfig.small(N), positions[:-1])
    plain, stim = _sbm(positions, 0, horizon=2), _sbm(positions, 3, horizon=2)
    with pytest.raises(ValueError, match="N=40"):
        plain(spikes[..., :-1])
    with pytest.raises(ValueError, match="covariates"):
        stim(spikes, torch.rand(2, 7, 3))                          # C + H = 8 steps expected
    with pytest.raises(ValueError, match="covariates"):
        stim(spikes)
    with pytest.raises(ValueError, match="n_covariates = 0"):
        plain(spikes, torch.rand(2, 8, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"n_neurons": 0}, "n_neurons"), ({"n_neurons": 5, "d_model": 30, "n_heads": 4}, "d_model"),
    ({"n_neurons": 5, "d_model": 12, "n_heads": 4}, "even"), ({"n_neurons": 5, "attention": "flash"}, "attention"),
    ({"n_neurons": 5, "membership": 0.0}, "membership"), ({"n_neurons": 5, "cluster_size": 0}, "cluster_size"),
    ({"n_neurons": 5, "rope_min_freq": 2.0, "rope_max_freq": 1.0}, "rope"),
    ({"n_neurons": 5, "routing_decay": 1.0}, "routing_decay"), ({"n_neurons": 5, "horizon": 0}, "horizon"),
    ({"n_neurons": 5, "routing_margin": -0.1}, "routing_margin"), ({"n_neurons": 5, "routing": "lsh"}, "routing"),
    ({"n_neurons": 5, "membership": 1.5}, "integer membership"),
    ({"n_neurons": 5, "routing_centroids": 0}, "routing_centroids"),
])
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SBMConfig(**kwargs)


@pytest.mark.parametrize("routing", ["sorted", "topk"])
def test_onnx_and_torch_export_parity(positions: torch.Tensor, tmp_path: Path, routing: str) -> None:
    model = _sbm(positions, 3, horizon=1, n_layers=1, cluster_size=16, routing=routing, membership=2)
    c, h = model.config.context, model.config.horizon
    dynamic_n = export_onnx(model, tmp_path / "sbm.onnx", c, N, horizon=h, covariates=3)
    assert not dynamic_n                                           # positions fix N per fish
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(3, c, N)).astype(np.float32) ** 3
    cov = rng.uniform(0, 1, size=(3, c + h, 3)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "sbm.onnx"), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x, COVARIATES_NAME: cov})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(cov)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                             # a failed capture only warns
        assert export_program(model, tmp_path / "sbm.pt2", (x[:2], cov[:2]), dynamic_n)
    program = torch.export.load(str(tmp_path / "sbm.pt2"))
    with torch.no_grad():
        again = program.module()(torch.from_numpy(x), torch.from_numpy(cov)).numpy()
    np.testing.assert_allclose(again, want, atol=1e-5, rtol=0)
    # the torch runtime moves the program to its device (CUDA on a rig); the meta device stands in here
    from loopcast.realtime.engines.torch_runtime import program_on
    on_meta = program_on(program, "meta")(torch.from_numpy(x).to("meta"), torch.from_numpy(cov).to("meta"))
    assert on_meta.device.type == "meta" and tuple(on_meta.shape) == want.shape


@pytest.mark.parametrize("routing", ["sorted", "topk"])
def test_soft_routing_onnx_parity(positions: torch.Tensor, tmp_path: Path, routing: str) -> None:
    model = _sbm(positions, 0, horizon=2, n_layers=1, cluster_size=8, routing=routing, membership=2,
                 routing_margin=0.05)                              # key bias in the attention
    assert not export_onnx(model, tmp_path / "soft.onnx", model.config.context, N, horizon=2)
    x = np.random.default_rng(1).uniform(0, 1, size=(2, model.config.context, N)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "soft.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], want, atol=1e-4, rtol=0)
