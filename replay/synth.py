"""Synthesize a recording: run the synthetic fish through the stimulus protocol and write the ZAPBench layout.

Traces are computed the way ZAPBench's come from the microscope: the mean of each neuron's segmentation
voxels in every rendered (noisy, quantised) volume (realtime.preprocess.traces, as the pipeline does), then the
centred dF/F of realtime.preprocess.dff. Rendering, trace extraction and compression overlap: the writer compresses
and writes earlier volumes on TensorStore's threads while the fish renders the next one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loopcast.config import dump_toml
from loopcast.realtime.preprocess.dff import DffConfig, centered_dff
from loopcast.realtime.preprocess.shifted_traces import ShiftedTraces
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.replay.fish import CONDITION_NAMES, FishConfig, FishModel, stimulus_schedule
from loopcast.replay.layout import CONFIG_FILE, Recording
from loopcast.replay.store import ZAPBENCH_CODEC, BloscCodec
from loopcast.replay.writer import RecordingWriter

GT_BLOCK = 64  # frames of ground truth buffered per write


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize: the fish, the length, and optional random optogenetic pulses."""

    fish: FishConfig = field(default_factory=FishConfig)
    n_frames: int = 1200
    baseline_stride: int = 8          # F0 stride of realtime.preprocess.dff.centered_dff (see its docstring)
    write_raw: bool = True
    opto_period_frames: int = 0       # > 0: a pulse every this many frames (0 = no stimulation)
    opto_n_targets: int = 20          # neurons per pulse, drawn from one random ensemble
    opto_duration_frames: int = 3
    codec: BloscCodec = ZAPBENCH_CODEC   # raw volume compression (ZAPBench's: blosc zstd 4, byte shuffle)
    voxel_size_nm: tuple[float, float, float] = (0.0, 0.0, 0.0)   # written as dimension units when set

    def __post_init__(self) -> None:
        if self.n_frames < 20 or self.baseline_stride < 1:
            raise ValueError(f"need n_frames >= 20 and baseline_stride >= 1, got {self.n_frames}, "
                             f"{self.baseline_stride}")
        if self.opto_period_frames < 0 or self.opto_n_targets < 1 or self.opto_duration_frames < 1:
            raise ValueError("need opto_period_frames >= 0, opto_n_targets >= 1, opto_duration_frames >= 1")


def _opto_pulse(cfg: SynthConfig, fish: FishModel, rng: np.random.Generator) -> None:
    ens = fish.anatomy.ensemble
    members = np.flatnonzero(ens == rng.integers(0, fish.cfg.n_ensembles))
    targets = rng.choice(members, size=min(len(members), cfg.opto_n_targets), replace=False)
    fish.stimulate(targets, gain=1.0, duration_frames=cfg.opto_duration_frames)


def synthesize(cfg: SynthConfig, out: str | Path, progress: bool = True, overwrite: bool = False) -> Recording:
    """Run the fish for cfg.n_frames and write a complete recording at `out`; returns it opened."""
    fc, n_t = cfg.fish, cfg.n_frames
    t_start = time.perf_counter()
    schedule = stimulus_schedule(fc, n_t)
    fish = FishModel(fc)
    t_built = time.perf_counter()
    voxel = cfg.voxel_size_nm if min(cfg.voxel_size_nm) > 0 else None
    writer = RecordingWriter(out, n_t, fc.n_neurons, fc.shape, write_raw=cfg.write_raw, overwrite=overwrite,
                             codec=cfg.codec, voxel_size_nm=voxel, frame_period_s=fc.frame_period_s)
    anat = fish.anatomy
    writer.write_static(anat.segmentation, anat.positions, anat.ensemble, schedule.covariates)
    f_raw = _frame_loop(cfg, fish, schedule.covariates, writer, progress, str(Path(out).name))
    t_frames = time.perf_counter()
    writer.write_traces(centered_dff(f_raw, DffConfig(), stride=cfg.baseline_stride), raw=f_raw)
    dump_toml(cfg, Path(out) / CONFIG_FILE)
    timing = {"fish_build_s": t_built - t_start, "frames_s": t_frames - t_built,
              "traces_s": time.perf_counter() - t_frames}
    meta = {"condition_offsets": list(schedule.offsets), "condition_names": list(CONDITION_NAMES),
            "frame_period_s": fc.frame_period_s, "seed": fc.seed, "source": "synthetic", "timing": timing,
            "behaviour_neurons": [int(i) for i in fish.behaviour_neurons],
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
    return writer.finish(meta)


def _frame_loop(cfg: SynthConfig, fish: FishModel, covariates: np.ndarray, writer: RecordingWriter,
                progress: bool, name: str) -> np.ndarray:
    """Render every frame, write it and its ground truth; returns (T, N) float32 segment means, registered:
    with motion on, read through the frame's true shift (as ZAPBench's traces come from its `aligned` volumes)."""
    fc, n_t = cfg.fish, cfg.n_frames
    means = TraceExtractor(fish.anatomy.segmentation)
    registered = ShiftedTraces(means) if fc.motion.enabled else None
    buf = np.empty(fc.shape, np.uint16, order="F")                          # rendered into, then copied
    f_raw = np.empty((n_t, fc.n_neurons), np.float32)                       # (T, N)
    gt = {k: np.empty((GT_BLOCK, *shape), dt) for k, shape, dt in
          (("spikes", (fc.n_neurons,), np.float32), ("calcium", (fc.n_neurons,), np.float32),
           ("stimulated", (fc.n_neurons,), bool), ("behaviour", (), np.float32), ("shifts", (3,), np.float32))}
    opto_rng = np.random.default_rng([fc.seed, 0x0970])
    bar = tqdm(total=n_t, desc=f"synth {name}", unit="vol", disable=not progress)
    t_loop = time.perf_counter()
    for t in range(n_t):
        if cfg.opto_period_frames and t % cfg.opto_period_frames == cfg.opto_period_frames // 2:
            _opto_pulse(cfg, fish, opto_rng)
        frame = fish.step(covariates[t], out=buf)
        if cfg.write_raw:
            writer.write_volume(t, frame.volume)
        f_raw[t] = means.process(frame.volume) if registered is None else registered.process(frame.volume, frame.shift)
        k = t % GT_BLOCK
        gt["spikes"][k], gt["calcium"][k], gt["stimulated"][k] = frame.spikes, frame.calcium, frame.stimulated
        gt["behaviour"][k], gt["shifts"][k] = frame.behaviour, frame.shift
        if k == GT_BLOCK - 1 or t == n_t - 1:
            b = {g: a[:k + 1] for g, a in gt.items()}
            writer.write_ground_truth_block(t - k, b["spikes"], b["calcium"], b["stimulated"], b["behaviour"],
                                            b["shifts"] if fc.motion.enabled else None)
        bar.update(1)
        if t % 10 == 9 or t == n_t - 1:
            bar.set_postfix(vol_per_s=f"{(t + 1) / (time.perf_counter() - t_loop):.2f}")
    writer.flush()
    bar.close()
    return f_raw
