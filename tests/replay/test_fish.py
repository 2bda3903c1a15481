"""The synthetic fish: config validation, anatomy, determinism, output buffers, coupling, optogenetics.
Its statistics (dF/F, SNR, kernel, behaviour, bleaching, opto response size) are in test_fish_stats.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.spatial import cKDTree

from loopcast.replay.fish import (
    CONDITION_COVARIATES,
    N_COVARIATES,
    FishConfig,
    FishModel,
    condition_offsets,
    stimulus_schedule,
)
from loopcast.replay.layout import Recording


def _run(model: FishModel, cov: np.ndarray, n: int, stim_at: int | None = None,
         targets: np.ndarray | None = None, duration: int = 15) -> list:
    frames = []
    for t in range(n):
        if stim_at is not None and t == stim_at:
            assert targets is not None
            model.stimulate(targets, gain=1.0, duration_frames=duration)
        frames.append(model.step(cov[t]))
    return frames


@pytest.mark.parametrize("change, word", [
    ({"shape": (48, 32)}, "shape"), ({"n_neurons": 0}, "n_neurons"), ({"n_ensembles": 151}, "n_ensembles"),
    ({"latent_decay": (0.9, 1.0)}, "latent_decay"), ({"tau_decay_s": 0.0}, "tau_decay_s"),
    ({"opto_latency_frames": -1}, "opto_latency_frames"), ({"baseline_range": (800.0, 200.0)}, "baseline_range"),
    ({"tau_rise_s": 3.0}, "tau_rise_s"), ({"behaviour_ensembles": (0, 4)}, "behaviour_ensembles"),
    ({"behaviour_ensembles": (1, 1)}, "behaviour_ensembles"), ({"behaviour_fraction": 0.0}, "behaviour_fraction"),
    ({"snr": -1.0}, "snr"), ({"bleach_tau_frames": -5.0}, "bleach_tau_frames"),
    ({"coupling_length": 0.0}, "coupling_length"),
])
def test_config_validation(tiny_fish: FishConfig, change: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        dataclasses.replace(tiny_fish, **change)


def test_too_many_neurons_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot place"):
        FishModel(FishConfig(shape=(16, 16, 4), n_neurons=2000, n_ensembles=4))


def test_determinism_by_seed(tiny_fish: FishConfig) -> None:
    cov = stimulus_schedule(tiny_fish, 40).covariates
    a, b = FishModel(tiny_fish), FishModel(tiny_fish)
    for f in ("positions", "segmentation", "ensemble"):
        np.testing.assert_array_equal(getattr(a.anatomy, f), getattr(b.anatomy, f))
    for fa, fb in zip(_run(a, cov, 40), _run(b, cov, 40)):
        np.testing.assert_array_equal(fa.volume, fb.volume)
        np.testing.assert_array_equal(fa.spikes, fb.spikes)
        assert fa.behaviour == fb.behaviour
    c = FishModel(dataclasses.replace(tiny_fish, seed=tiny_fish.seed + 1))
    assert not np.array_equal(c.anatomy.segmentation, a.anatomy.segmentation)


def test_out_buffer_is_zero_copy_and_bit_identical() -> None:
    cfg = FishConfig(seed=2, shape=(160, 96, 40), n_neurons=600, n_ensembles=5)   # several render chunks
    cov = stimulus_schedule(cfg, 20).covariates
    fresh, into = FishModel(cfg), FishModel(cfg)
    buf = np.full(cfg.shape, 7, np.uint16, order="F")
    for t in range(3):
        a, b = fresh.step(cov[t]), into.step(cov[t], out=buf)
        assert b.volume is buf and a.volume.flags.f_contiguous and a.volume is not buf
        assert a.volume.tobytes(order="F") == buf.tobytes(order="F")
    with pytest.raises(ValueError, match="Fortran"):
        into.step(cov[3], out=np.zeros(cfg.shape, np.uint16))                    # C order
    with pytest.raises(ValueError, match="uint16"):
        into.step(cov[3], out=np.zeros(cfg.shape, np.float32, order="F"))
    with pytest.raises(ValueError, match="uint16"):
        into.step(cov[3], out=np.zeros((160, 96, 39), np.uint16, order="F"))
    ro = np.zeros(cfg.shape, np.uint16, order="F")
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        into.step(cov[3], out=ro)
    assert into.t == 3                                                         # a rejected call advances nothing


def test_anatomy(tiny_fish: FishConfig) -> None:
    anat = FishModel(tiny_fish).anatomy
    n, seg = tiny_fish.n_neurons, anat.segmentation
    assert seg.dtype == np.uint32 and seg.shape == tiny_fish.shape
    assert anat.positions.shape == (n, 3) and anat.positions.dtype == np.float32
    assert anat.ensemble.shape == (n,) and anat.ensemble.dtype == np.int32
    counts = np.bincount(seg.ravel(), minlength=n + 1)
    assert seg.max() == n and (counts[1:] >= 1).all()              # labels 1..N present, one per voxel
    assert 0.5 * seg.size < counts[0] < seg.size                   # background and neuropil in between
    assert (anat.positions >= 0).all() and (anat.positions <= np.array(tiny_fish.shape) - 1).all()
    for i in (0, n // 2, n - 1):                                   # positions are segment centroids
        np.testing.assert_allclose(np.argwhere(seg == i + 1).mean(0), anat.positions[i], atol=1e-4)
    norm = anat.positions / np.array(tiny_fish.nucleus_radius_vox)
    d, _ = cKDTree(norm).query(norm, k=2)
    assert d[:, 1].min() > 1.0                                      # nuclei keep apart
    assert set(np.unique(anat.ensemble)) == set(range(tiny_fish.n_ensembles))
    dist = np.linalg.norm(anat.positions[:, None] - anat.positions[None], axis=-1)
    same = anat.ensemble[:, None] == anat.ensemble[None]
    assert dist[same].mean() < 0.7 * dist[~same].mean()            # spatially clustered


def _ensemble_spike_corr(cfg: FishConfig, n: int) -> tuple[FishModel, np.ndarray, np.ndarray]:
    """Run without stimulus -> (fish, (E, E) correlation of ensemble spike counts, (E, E) centroid distance)."""
    fish = FishModel(cfg)
    ens, e = fish.anatomy.ensemble, cfg.n_ensembles
    counts = np.array([np.bincount(ens, fish.step(np.zeros(N_COVARIATES)).spikes, e) for _ in range(n)])
    pos = fish.anatomy.positions / np.array(cfg.nucleus_radius_vox)
    cen = np.stack([pos[ens == k].mean(0) for k in range(e)])
    return fish, np.corrcoef(counts.T), np.linalg.norm(cen[:, None] - cen[None], axis=-1)


def test_coupled_ensembles_stable_oscillatory_and_local() -> None:
    cfg = FishConfig(seed=4, shape=(96, 64, 12), n_neurons=800, n_ensembles=16, coupling=0.2, stim_gain=0.0,
                     stim_to_latent=0.0)
    fish, c, d = _ensemble_spike_corr(cfg, 1500)
    eig = np.linalg.eigvals(fish.dynamics)
    assert np.abs(eig).max() <= cfg.latent_decay[1] + 1e-9                   # stable
    assert (np.abs(eig.imag) > 1e-3).all()                                     # oscillating
    w, e = fish.coupling, cfg.n_ensembles
    assert w.shape == (e, e) and (np.diag(w) == 0).all()
    nearest = np.argsort(d, axis=1)[:, 1]
    unlinked = (d > np.median(d[~np.eye(e, dtype=bool)])) & (np.abs(w) < 1e-3) & (np.abs(w.T) < 1e-3)
    near_w = w[np.arange(e), nearest]
    assert (near_w > 0).all() and near_w.mean() > 5 * np.abs(w[unlinked]).mean()   # decays with distance
    far = d > np.median(d[~np.eye(e, dtype=bool)])
    assert 0 < (far & (np.abs(w) > 0.3 * near_w.mean())).sum() <= e                # a few long-range links
    near_c, far_c = c[np.arange(e), nearest].mean(), c[unlinked].mean()
    assert near_c > far_c + 0.15, (near_c, far_c)                                  # neighbours co-fluctuate
    free, c0, _ = _ensemble_spike_corr(dataclasses.replace(cfg, coupling=0.0), 1500)
    assert (free.coupling == 0).all() and abs(c0[np.arange(e), nearest].mean() - c0[unlinked].mean()) < 0.08


def test_schedule(tiny_fish: FishConfig) -> None:
    s = stimulus_schedule(tiny_fish, 200)
    assert s.covariates.shape == (200, N_COVARIATES) and s.covariates.dtype == np.float32
    assert s.offsets == condition_offsets(200) and len(s.offsets) == 10 and s.offsets[-1] == 200
    assert s.condition.dtype == np.int32 and list(np.unique(s.condition)) == list(range(9))
    for c, cols in enumerate(CONDITION_COVARIATES):                # each condition drives its own columns
        inside = s.condition == c
        assert np.abs(s.covariates[inside][:, cols]).sum() > 0
        assert np.abs(s.covariates[~inside][:, cols]).sum() == 0
    with pytest.raises(ValueError, match="too short"):
        condition_offsets(5)


def test_step_outputs(tiny_fish: FishConfig) -> None:
    m = FishModel(tiny_fish)
    f = m.step(np.zeros(N_COVARIATES, np.float32))
    assert f.volume.shape == tiny_fish.shape and f.volume.dtype == np.uint16 and f.volume.flags.f_contiguous
    assert isinstance(f.behaviour, float) and f.behaviour >= 0
    for arr, dt in ((f.spikes, np.float32), (f.calcium, np.float32), (f.fluorescence, np.float32),
                    (f.stimulated, np.bool_)):
        assert arr.shape == (tiny_fish.n_neurons,) and arr.dtype == dt
    assert m.t == 1
    with pytest.raises(ValueError, match="covariates"):
        m.step(np.zeros(25))


def test_traces_quality(tiny_recording: Recording) -> None:
    tr = tiny_recording.traces()
    assert ((tr <= -0.25) | (tr >= 1.5)).mean() < 0.05             # mostly inside the clip range
    assert (tr.std(0) > 0.01).all()
    ens = tiny_recording.ground_truth("ensemble")
    c = np.corrcoef(tr.T)
    np.fill_diagonal(c, np.nan)
    same = ens[:, None] == ens[None]
    within, across = np.nanmean(c[same]), np.nanmean(c[~same])
    assert within > across + 0.1, (within, across)


def test_optogenetic_response(tiny_fish: FishConfig) -> None:
    cov = stimulus_schedule(tiny_fish, 80).covariates
    targets = np.arange(0, tiny_fish.n_neurons, 15)                 # 10 neurons
    on, lat, dur = 30, tiny_fish.opto_latency_frames, 15
    base = _run(FishModel(tiny_fish), cov, 80)
    model = FishModel(tiny_fish)
    stim = _run(model, cov, 80, stim_at=on, targets=targets, duration=dur)
    for t in range(on + lat):                                       # nothing changes before the latency
        np.testing.assert_array_equal(base[t].volume, stim[t].volume)
        assert not stim[t].stimulated.any()
    flags = np.array([f.stimulated for f in stim])
    assert flags[on + lat:on + lat + dur][:, targets].all() and not flags[on + lat + dur:].any()
    assert flags[:, np.setdiff1d(np.arange(tiny_fish.n_neurons), targets)].sum() == 0
    win = slice(on + lat, on + lat + dur)
    r_stim = np.mean([f.spikes[targets] for f in stim[win]])
    r_base = np.mean([f.spikes[targets] for f in base[win]])
    assert r_stim > 5 * r_base + 1.0, (r_stim, r_base)
    seg = model.anatomy.segmentation
    vox = np.isin(seg, targets + 1)                                 # raw intensity of the targets' voxels
    before = np.mean([base[t].volume[vox].mean() for t in range(on - 5, on)])
    within_two = stim[on + lat + 1].volume[vox].mean()
    assert within_two > 1.5 * before, (within_two, before)


@pytest.mark.parametrize("latency", [0, 3])
def test_opto_latency(tiny_fish: FishConfig, latency: int) -> None:
    cfg = dataclasses.replace(tiny_fish, opto_latency_frames=latency)
    model = FishModel(cfg)
    cov = np.zeros(N_COVARIATES, np.float32)
    for _ in range(5):
        model.step(cov)
    model.stimulate(np.array([3, 4]), gain=1.0, duration_frames=2)
    flags = [model.step(cov).stimulated[3] for _ in range(latency + 4)]
    assert flags == [False] * latency + [True, True] + [False] * 2
    with pytest.raises(ValueError, match="targets"):
        model.stimulate(np.array([cfg.n_neurons]), 1.0, 1)
