"""Video model training on a tiny synthesized recording: loss, sampling, checkpoints, resume and DDP.

The recording's condition offsets are rewritten to four 50-frame conditions so that C = 4, H = 4 windows
fit in every split. `torch.distributed.run` runs this file as a script on two ranks (the `__main__`
block), each saving what it trained to the directory given as argument.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopcast.config import ConfigError, load_toml
from loopcast.models.zoo import build_model
from loopcast.offline_training.video.data import VideoData, prepare_video
from loopcast.offline_training.video.train import (
    TraceIndex,
    VideoTrainConfig,
    sample_pairs,
    trace_loss,
    train_starts,
    train_video,
    val_mae,
    val_pairs,
    video_train_config_from_dict,
)
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[2]
OFFSETS = [0, 50, 100, 150, 200]
MODEL = {"features": 8, "features_sr": 8, "groups": 4, "downsample": [[2, 2, 1]], "lead_dim": 8}
# device="cpu": CPU numerics for the exact resume, the CPU val_mae check and the gloo DDP reference
CFG = VideoTrainConfig(context=4, horizon=4, lr=3e-3, lr_min=1e-4, batch_size=2, steps=12, val_every=4,
                       val_windows=16, val_frac=0.2, model_options=MODEL, device="cpu")


def make_recording(out: Path) -> Recording:
    """200 frames of a 48 x 32 x 8 fish (100 neurons) in 4 conditions, with its level-2 dF/F video."""
    fish = FishConfig(seed=7, shape=(48, 32, 8), n_neurons=100, n_ensembles=4, nucleus_radius_vox=(3.0, 3.0, 1.0))
    synthesize(SynthConfig(fish=fish, n_frames=200, baseline_stride=4), out, progress=False)
    meta_path = out / "loopcast.json"
    meta = json.loads(meta_path.read_text())
    meta.update(condition_offsets=OFFSETS, condition_names=[f"c{k}" for k in range(len(OFFSETS) - 1)])
    meta_path.write_text(json.dumps(meta))
    prepare_video(Recording.open(out), progress=False)
    return Recording.open(out)


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    return make_recording(tmp_path_factory.mktemp("video") / "rec")


@pytest.fixture(scope="module")
def runs(rec: Recording, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """CFG (with dropout, so the RNG restore matters) trained straight through, and interrupted + resumed."""
    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, model_options={**MODEL, "dropout": 0.1})
    base = tmp_path_factory.mktemp("runs")
    full = train_video(rec, cfg, base / "full", progress=False)
    cut = train_video(rec, cfg, base / "split", progress=False, stop_after=6)
    assert [h["step"] for h in cut.history] == [4]
    assert torch.load(cut.checkpoints["last"], weights_only=False)["state"]["step"] == 6
    with pytest.raises(ValueError, match="different \\[train_video\\] config"):
        train_video(rec, dataclasses.replace(cfg, lr=1e-3), base / "split", progress=False, resume=True)
    resumed = train_video(rec, cfg, base / "split", progress=False, resume=True)
    return {"cfg": cfg, "full": full, "resumed": resumed, "base": base}


def test_trace_loss_equals_a_per_neuron_loop(rec: Recording) -> None:
    """The batched index_add loss equals per-neuron means over the strided segmentation's voxels."""
    torch.set_num_threads(1)
    data = VideoData(rec)
    torch.manual_seed(0)
    model = build_model("video_unet", CFG.model_config())
    pairs = np.array([[10, 1], [57, 4], [120, 2]])
    loss = trace_loss(model, data, TraceIndex(data.reducer), pairs, CFG.context, torch.device("cpu"))
    vol, traces, seg = rec.volume("df_over_f", level=2), rec.traces(), rec.segmentation()[::4, ::4, :]
    errs = []
    for start, lead in pairs:
        x = np.stack([vol.read(int(start) + c) for c in range(CFG.context)])[None]       # (1, C, X, Y, Z)
        with torch.no_grad():
            frame = model(torch.from_numpy(x), torch.tensor([lead]))[0].numpy()          # (X, Y, Z)
        for i in range(traces.shape[1]):
            mask = seg == i + 1
            mean = frame[mask].mean() if mask.any() else frame.reshape(-1)[data.reducer.voxel_index[
                data.reducer.neuron_index == i]].mean()
            errs.append(abs(mean - traces[start + CFG.context - 1 + lead, i]))
    assert float(loss.detach()) == pytest.approx(float(np.mean(errs)), rel=1e-5)


def test_sampled_lead_times_and_starts_are_uniform(rec: Recording) -> None:
    starts = train_starts(CFG, OFFSETS)
    pairs = sample_pairs(np.random.default_rng(0), starts, 32, 64_000)
    assert pairs.dtype == np.int64 and pairs.shape == (64_000, 2)
    counts = np.bincount(pairs[:, 1], minlength=33)
    assert counts[0] == 0 and counts[1:].sum() == 64_000
    assert np.abs(counts[1:] / 2000 - 1).max() < 0.1                   # ~2000 each; sd ~2 %
    assert set(np.unique(pairs[:, 0])) == set(starts.tolist())         # only and every train window
    hits = np.bincount(np.searchsorted(starts, pairs[:, 0]), minlength=len(starts))
    assert hits.min() > 0.6 * hits.mean()
    val = val_pairs(CFG, OFFSETS)
    assert len(val) == CFG.val_windows and np.array_equal(val, val_pairs(CFG, OFFSETS))
    assert not set(val[:, 0].tolist()) & set(starts.tolist())
    assert val[:, 1].min() >= 1 and val[:, 1].max() <= CFG.horizon


def test_loss_decreases(rec: Recording, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, steps=60, val_every=20)
    result = train_video(rec, cfg, tmp_path, progress=False)
    first, last = result.history[0], result.history[-1]
    assert [h["step"] for h in result.history] == [20, 40, 60]
    assert last["loss"] < 0.8 * first["loss"], result.history
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, cfg.model_config())
    data = VideoData(rec)
    assert result.best_val_mae < 0.8 * val_mae(fresh, data, val_pairs(cfg, OFFSETS))
    assert last["lr"] == pytest.approx(cfg.lr_min)                      # the cosine ends at lr_min
    assert (result.n_neurons, result.data_fingerprint, result.data_source) == (100, rec.fingerprint(), rec.root)
    saved = load_toml(tmp_path / "config.toml")["train_video"]
    assert video_train_config_from_dict(saved) == cfg


def test_resume_equals_uninterrupted_run(runs: dict[str, Any]) -> None:
    full, resumed = runs["full"], runs["resumed"]
    assert resumed.history == full.history
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    last = [torch.load(r.checkpoints["last"], weights_only=False) for r in (full, resumed)]
    assert last[0]["state"] == last[1]["state"]
    for k, v in last[0]["model"].items():
        assert torch.equal(last[1]["model"][k], v), k


def test_best_checkpoint_is_the_best_val(runs: dict[str, Any], rec: Recording) -> None:
    full, cfg = runs["full"], runs["cfg"]
    vals = [h["val_mae"] for h in full.history]
    best = torch.load(full.checkpoints["best"], weights_only=False)
    assert best["val_mae"] == full.best_val_mae == min(vals)
    assert best["step"] == full.best_step == full.history[int(np.argmin(vals))]["step"]
    model = build_model(best["model_name"], best["model_config"])
    model.load_state_dict(best["model"])
    assert val_mae(model, VideoData(rec), val_pairs(cfg, OFFSETS)) == pytest.approx(best["val_mae"], rel=1e-6)
    for k, v in best["model"].items():
        assert torch.equal(full.model.state_dict()[k], v), k


def test_patience_stops_after_non_improving_checks(rec: Recording, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, lr=0.3, steps=40, val_every=2, patience=1)
    hist = train_video(rec, cfg, tmp_path, progress=False).history
    vals = [h["val_mae"] for h in hist]
    assert all(b < a for a, b in zip(vals[:-2], vals[1:-1]))            # improving until the last check
    if len(hist) < cfg.steps // cfg.val_every:
        assert vals[-1] >= min(vals[:-1])


def test_bad_config_errors() -> None:
    with pytest.raises(ValueError, match=r"\['n_blocks'\] are not options of model 'video_unet'.*features"):
        VideoTrainConfig(model_options={"n_blocks": 2})
    with pytest.raises(ValueError, match=r"\['horizon'\] are set by \[train_video\]"):
        VideoTrainConfig(model_options={"horizon": 8})
    with pytest.raises(ConfigError, match="groups=5 must divide"):
        video_train_config_from_dict({"model_options": {"groups": 5}})
    with pytest.raises(ConfigError, match="unknown key 'train_video.stpes'"):
        video_train_config_from_dict({"stpes": 5})
    with pytest.raises(ValueError, match="lr_min"):
        VideoTrainConfig(lr=1e-4, lr_min=1e-3)


@pytest.mark.parametrize("name, context, dropout", [("c4", 4, 0.0), ("c256", 256, 0.1)])
def test_paper_configs_load(name: str, context: int, dropout: float) -> None:
    cfg = video_train_config_from_dict(load_toml(ROOT / f"configs/train-video-{name}.toml")["train_video"])
    assert (cfg.context, cfg.horizon, cfg.batch_size, cfg.lr, cfg.lr_min, cfg.weight_decay) == \
        (context, 32, 1, 1e-4, 1e-7, 1e-5)
    assert cfg.model_options["dropout"] == dropout


# ------------------------------------------------------------------------------------------- DDP

DDP_CFG = dataclasses.replace(CFG, steps=4, val_every=2, ddp_device="cpu")


def worker(rec_path: Path, out_dir: Path) -> None:
    """One torchrun rank: train DDP_CFG (global batch 2 -> 1 per rank), save the weights as rank<r>.pt."""
    torch.set_num_threads(1)
    result = train_video(Recording.open(rec_path), DDP_CFG, out_dir / "run", progress=False)
    rank = int(os.environ["RANK"])
    torch.save({"state": result.model.state_dict(), "history": list(result.history)}, out_dir / f"rank{rank}.pt")


def test_ddp_two_ranks_equal_one_process(rec: Recording, tmp_path: Path, torchrun: Callable[..., Any]) -> None:
    res = torchrun(__file__, str(rec.root), str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    torch.set_num_threads(1)
    single = train_video(rec, DDP_CFG, tmp_path / "single", progress=False)
    for rank in ranks:
        for got, want in zip(rank["history"], single.history):
            assert got["val_mae"] == pytest.approx(want["val_mae"], rel=1e-5)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(rank["state"][k], v, atol=1e-5, rtol=1e-5)
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
