"""Behaviour head training: input windows end at the target frame, balanced batches, a learnable toy
behaviour reaching r > 0.5 on test and holdout, permutation invariance of the trained head, scoring on
predicted inputs with missing frames, and errors on bad shapes."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loopcast.offline_training.sbm.pnm_train import (
    PNMResult,
    PNMTrainConfig,
    balanced_batch,
    build_data,
    input_frames,
    target_frames,
    train_pnm,
)

OFFSETS = (0, 100, 200, 300, 400)
CFG = PNMTrainConfig(model_options={"hidden": 16, "temporal_hidden": 32, "n_fourier": 2}, batch_size=32,
                     steps=300, val_every=25, lr=3e-3, threads=1)


def toy(t: int = 400, n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random probabilities; behaviour = how much neurons 0-9 exceed the rest at t (a rectified contrast)."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 1, (t, n)).astype(np.float32) ** 2
    behaviour = np.maximum(probs[:, :10].mean(1) - probs[:, 10:].mean(1), 0.0).astype(np.float32)
    return probs, behaviour, rng.normal(size=(n, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PNMResult, Path]:
    probs, behaviour, positions = toy()
    predicted = probs + np.float32(0.01)
    predicted[:285] = np.nan                                    # only the last frames are "predicted"
    run = tmp_path_factory.mktemp("pnm")
    return train_pnm(probs, behaviour, positions, OFFSETS, CFG, run, progress=False, predicted=predicted), run


def test_windows_end_at_the_target_frame() -> None:
    splits = CFG.splits(OFFSETS)
    for split in ("train", "val", "test"):
        for k, frames in target_frames(splits, split, 4, include_holdout=True).items():
            lo, hi = splits[k].span(split)  # type: ignore[misc]
            assert (frames - 3 >= lo).all() and (frames < hi).all()
    probs, behaviour, positions = toy()
    data = build_data(probs, behaviour, positions, OFFSETS, CFG)
    x = data.inputs(np.array([10, 50]))
    assert x.shape == (2, 4, 30) and torch.equal(x[0, -1], torch.from_numpy(probs[10]))
    assert torch.equal(x[1, 0], torch.from_numpy(probs[47]))
    assert data.target.max() == 1.0 and data.target.min() >= 0.0 and 3 not in data.frames["train"]
    assert set(input_frames(OFFSETS, CFG)) >= {t - i for t in data.frames["test"][3] for i in range(4)}


def test_balanced_batches_pair_rare_and_typical_frames() -> None:
    train, high = np.arange(100), np.array([3, 7])
    batch = balanced_batch(train, high, CFG, np.random.default_rng(0))
    assert len(batch) == 32 and np.isin(batch, high).sum() == 16
    assert np.isin(balanced_batch(train, np.empty(0, np.int64), CFG, np.random.default_rng(0)), train).all()


def test_a_learnable_behaviour_is_learned(trained: tuple[PNMResult, Path]) -> None:
    result, run = trained
    gt = result.metrics["ground_truth"]
    assert gt["test"]["r"] > 0.5 and gt["holdout"]["r"] > 0.5, gt
    saved = json.loads((run / "pnm_metrics.json").read_text())
    assert saved["ground_truth"]["test"]["r"] == pytest.approx(gt["test"]["r"])
    assert (run / "pnm.pt").is_file()


def test_predicted_inputs_are_scored_where_known(trained: tuple[PNMResult, Path]) -> None:
    sbm = trained[0].metrics["sbm_predicted"]
    gt = trained[0].metrics["ground_truth"]
    assert set(sbm["per_condition"]) == {"condition2", "condition3"}   # frames < 285 are not predicted
    assert sbm["per_condition"]["condition2"]["frames"] < gt["per_condition"]["condition2"]["frames"]
    assert sbm["holdout"]["frames"] == gt["holdout"]["frames"]
    assert sbm["holdout"]["r"] == pytest.approx(gt["holdout"]["r"], abs=1e-3)   # +0.01: z-scoring removes it


def test_the_trained_head_ignores_neuron_order(trained: tuple[PNMResult, Path]) -> None:
    model = trained[0].model
    probs, _, positions = toy(seed=1)
    x = torch.from_numpy(np.stack([probs[i:i + 4] for i in (0, 10, 20)]))
    perm = np.random.default_rng(2).permutation(30)
    with torch.no_grad():
        a, b = model(x, positions), model(x[:, :, perm], positions[perm])
    assert a.shape == (3, 1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    probs, behaviour, positions = toy()
    cfg = dataclasses.replace(CFG, steps=60, val_every=20)
    full = train_pnm(probs, behaviour, positions, OFFSETS, cfg, tmp_path / "full", progress=False)
    cut = train_pnm(probs, behaviour, positions, OFFSETS, cfg, tmp_path / "cut", progress=False, stop_after=30)
    assert [h["step"] for h in cut.metrics["history"]] == [20]                # cut between two validations
    resumed = train_pnm(probs, behaviour, positions, OFFSETS, cfg, tmp_path / "cut", progress=False)
    assert resumed.metrics == full.metrics                                     # history and every score
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_bad_inputs_raise() -> None:
    probs, behaviour, positions = toy()
    with pytest.raises(ValueError, match="behaviour must be"):
        train_pnm(probs, behaviour[:-1], positions, OFFSETS, CFG, progress=False)
    with pytest.raises(ValueError, match="positions must be"):
        train_pnm(probs, behaviour, positions[:-1], OFFSETS, CFG, progress=False)
    with pytest.raises(ValueError, match="zero on every train frame"):
        train_pnm(probs, np.zeros_like(behaviour), positions, OFFSETS, CFG, progress=False)
    with pytest.raises(ValueError, match="model_options"):
        PNMTrainConfig(model_options={"d_beh": 2})
