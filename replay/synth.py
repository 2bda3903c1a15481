"""Synthesize a recording: run the synthetic fish through the stimulus protocol and write the ZAPBench layout.

Traces are computed the way ZAPBench's come from the microscope: the mean of each neuron's segmentation
voxels in every rendered (noisy, quantised) volume, then the centred dF/F of realtime.dff.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loopcast.config import dump_toml
from realtime.dff import DffConfig, centered_dff
from replay.fish import CONDITION_NAMES, FishConfig, FishModel, stimulus_schedule
from replay.layout import CONFIG_FILE, Recording, RecordingWriter

GT_BLOCK = 64  # frames of ground truth buffered per write


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize: the fish, the length, and optional random optogenetic pulses."""

    fish: FishConfig = field(default_factory=FishConfig)
    n_frames: int = 1200
    baseline_stride: int = 8          # F0 stride of realtime.dff.centered_dff (see its docstring)
    write_raw: bool = True
    opto_period_frames: int = 0       # > 0: a pulse every this many frames (0 = no stimulation)
    opto_n_targets: int = 20          # neurons per pulse, drawn from one random ensemble
    opto_duration_frames: int = 3

    def __post_init__(self) -> None:
        if self.n_frames < 20 or self.baseline_stride < 1:
            raise ValueError(f"need n_frames >= 20 and baseline_stride >= 1, got {self.n_frames}, "
                             f"{self.baseline_stride}")
        if self.opto_period_frames < 0 or self.opto_n_targets < 1 or self.opto_duration_frames < 1:
            raise ValueError("need opto_period_frames >= 0, opto_n_targets >= 1, opto_duration_frames >= 1")


class SegmentMeans:
    """Per-neuron mean over its segmentation voxels, vectorised with np.bincount on precomputed indices."""

    def __init__(self, segmentation: np.ndarray) -> None:
        flat = segmentation.reshape(-1)
        self.idx = np.flatnonzero(flat)                        # (M,) segmented voxels
        self.lab = flat[self.idx].astype(np.int64) - 1         # (M,) 0-based neuron ids
        self.n = int(flat.max()) if flat.size else 0
        self.count = np.maximum(np.bincount(self.lab, minlength=self.n), 1).astype(np.float64)

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """(x, y, z) volume -> (N,) float32 mean intensity per neuron."""
        vals = volume.reshape(-1)[self.idx].astype(np.float64)
        return (np.bincount(self.lab, weights=vals, minlength=self.n) / self.count).astype(np.float32)


def _opto_pulse(cfg: SynthConfig, fish: FishModel, rng: np.random.Generator) -> None:
    ens = fish.anatomy.ensemble
    members = np.flatnonzero(ens == rng.integers(0, fish.cfg.n_ensembles))
    targets = rng.choice(members, size=min(len(members), cfg.opto_n_targets), replace=False)
    fish.stimulate(targets, gain=1.0, duration_frames=cfg.opto_duration_frames)


def synthesize(cfg: SynthConfig, out: str | Path, progress: bool = True, overwrite: bool = False) -> Recording:
    """Run the fish for cfg.n_frames and write a complete recording at `out`; returns it opened."""
    fc, n_t = cfg.fish, cfg.n_frames
    schedule = stimulus_schedule(fc, n_t)
    fish = FishModel(fc)
    writer = RecordingWriter(out, n_t, fc.n_neurons, fc.shape, write_raw=cfg.write_raw, overwrite=overwrite)
    anat = fish.anatomy
    writer.write_static(anat.segmentation, anat.positions, anat.ensemble, schedule.covariates)
    means = SegmentMeans(anat.segmentation)
    f_raw = np.empty((n_t, fc.n_neurons), np.float32)                      # (T, N) segment means
    gt = {k: np.empty((GT_BLOCK, fc.n_neurons), dt) for k, dt in
          (("spikes", np.float32), ("calcium", np.float32), ("stimulated", bool))}
    opto_rng = np.random.default_rng([fc.seed, 0x0970])
    bar = tqdm(total=n_t, desc=f"synth {Path(out).name}", unit="vol", disable=not progress)
    t_loop = time.perf_counter()
    for t in range(n_t):
        if cfg.opto_period_frames and t % cfg.opto_period_frames == cfg.opto_period_frames // 2:
            _opto_pulse(cfg, fish, opto_rng)
        frame = fish.step(schedule.covariates[t])
        if cfg.write_raw:
            writer.write_volume(t, frame.volume)
        f_raw[t] = means(frame.volume)
        k = t % GT_BLOCK
        gt["spikes"][k], gt["calcium"][k], gt["stimulated"][k] = frame.spikes, frame.calcium, frame.stimulated
        if k == GT_BLOCK - 1 or t == n_t - 1:
            writer.write_ground_truth_block(t - k, gt["spikes"][:k + 1], gt["calcium"][:k + 1],
                                            gt["stimulated"][:k + 1])
        bar.update(1)
        if t % 20 == 19 or t == n_t - 1:
            bar.set_postfix(vol_per_s=f"{(t + 1) / (time.perf_counter() - t_loop):.0f}")
    bar.close()
    writer.write_traces(centered_dff(f_raw, DffConfig(), stride=cfg.baseline_stride))
    dump_toml(cfg, Path(out) / CONFIG_FILE)
    meta = {"condition_offsets": list(schedule.offsets), "condition_names": list(CONDITION_NAMES),
            "frame_period_s": fc.frame_period_s, "seed": fc.seed, "source": "synthetic",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return writer.finish(meta)
