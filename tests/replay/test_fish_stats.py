"""Statistics of the synthetic fish, measured the way the pipeline sees it: per-neuron means of the rendered
volumes (realtime.preprocess.traces.TraceExtractor) and ZAPBench's centred dF/F
(realtime.preprocess.dff.centered_dff)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from scipy.stats import skew, spearmanr

from loopcast.realtime.preprocess.dff import DffConfig, centered_dff
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.replay.fish import FishConfig, FishModel, brain_mask, stimulus_schedule

SMALL = FishConfig(seed=3, shape=(64, 48, 8), n_neurons=300, n_ensembles=6)
QUIET: dict[str, Any] = dict(base_rate_hz=1e-9, rate_spread=0.0, latent_gain=0.0, stim_gain=0.0, private_noise=0.0,
             drift_amplitude=0.0, bleach_tau_frames=0.0)            # no spikes, no slow trends: noise only
UNCLIPPED = DffConfig(window=200, clip_min=-1e9, clip_max=1e9)


def _run(cfg: FishConfig, n: int, pulses: tuple[tuple[int, np.ndarray, float, int], ...] = ()) -> dict[str, Any]:
    """Run a fresh fish for n frames; pulses: (frame, targets, gain, duration) -> traces and ground truth."""
    fish = FishModel(cfg)
    ex = TraceExtractor(fish.anatomy.segmentation)
    cov = stimulus_schedule(cfg, max(n, 20)).covariates
    keys = ("trace", "spikes", "calcium", "fluorescence", "stimulated", "behaviour")
    rec: dict[str, list] = {k: [] for k in keys}
    for t in range(n):
        for at, targets, gain, dur in pulses:
            if t == at:
                fish.stimulate(targets, gain, dur)
        f = fish.step(cov[t])
        rec["trace"].append(ex.process(f.volume))
        for k in keys[1:]:
            rec[k].append(getattr(f, k))
    return {"fish": fish, **{k: np.array(v) for k, v in rec.items()}}


@pytest.fixture(scope="module")
def small_run() -> dict[str, Any]:
    return _run(SMALL, 800)


def test_dff_distribution_is_zapbench_like(small_run: dict[str, Any]) -> None:
    d = centered_dff(small_run["trace"], UNCLIPPED)
    inside = ((d >= -0.25) & (d <= 1.5)).mean()
    assert inside >= 0.99, inside                                  # ZAPBench clips to [-0.25, 1.5]
    med, p1, p95 = np.median(d), np.percentile(d, 1), np.percentile(d, 95)
    assert 0.0 < med < 0.15 and -0.1 < p1 < 0.0, (med, p1)         # baseline near 0, small noise floor
    assert p95 > 0.15 and skew(d.ravel()) > 1.5, (p95, skew(d.ravel()))   # activity: a long positive tail


def test_ensembles_correlate_within_more_than_across(small_run: dict[str, Any]) -> None:
    d = centered_dff(small_run["trace"], DffConfig(window=200))
    c = np.corrcoef(d.T)
    np.fill_diagonal(c, np.nan)
    ens = small_run["fish"].anatomy.ensemble
    same = ens[:, None] == ens[None]
    within, across = np.nanmean(c[same]), np.nanmean(c[~same])
    assert within > 0.2 and within > across + 0.15 and within > 2 * across, (within, across)


@pytest.mark.parametrize("snr", [2.0, 6.0])
def test_measured_snr_matches_config(snr: float) -> None:
    cfg = dataclasses.replace(SMALL, snr=snr, **QUIET)
    run = _run(cfg, 300)
    assert run["spikes"].sum() == 0
    tr = run["trace"].astype(np.float64)                            # (T, N) at rest: signal + noise only
    s = tr.mean(0) - cfg.background_counts                          # signal above the camera offset
    noise = tr - tr.mean(0)
    measured = np.median(cfg.dff_per_spike * s / noise.std(0))
    assert abs(measured / snr - 1) < 0.1, (measured, snr)            # stated tolerance: 10%
    lag1 = (noise[1:] * noise[:-1]).mean(0) / noise.var(0)          # frames get fresh noise (bank offsets)
    assert abs(lag1.mean()) < 0.03, lag1.mean()


def test_snr_zero_keeps_the_given_noise() -> None:
    cfg = dataclasses.replace(SMALL, snr=0.0, shot_noise_gain=2.5, read_noise=4.0, **QUIET)
    run = _run(cfg, 200)
    assert run["fish"].shot_noise_gain == 2.5
    fish = FishModel(cfg)
    outside = ~brain_mask(cfg.shape) & (fish.anatomy.segmentation == 0)      # camera offset + read noise only
    vol = fish.step(np.zeros(26)).volume.astype(np.float64)
    assert abs(vol[outside].std() / 4.0 - 1) < 0.05 and abs(vol[outside].mean() - cfg.background_counts) < 0.5
    measured = np.median(cfg.dff_per_spike * (run["trace"].mean(0) - 100.0) / run["trace"].std(0))
    quieter = _run(dataclasses.replace(cfg, shot_noise_gain=0.5), 200)
    assert np.median(cfg.dff_per_spike * (quieter["trace"].mean(0) - 100.0) / quieter["trace"].std(0)) > measured


def test_opto_raises_rate_by_gain_after_exact_latency() -> None:
    cfg = dataclasses.replace(SMALL, opto_gain=4.0, opto_latency_frames=2, opto_network_coupling=0.0,
                              max_rate_hz=1e3)
    a, b = np.arange(0, 300, 3), np.arange(1, 300, 3)              # 100 targets at gain 1, 100 at gain 0.5
    on, dur = 20, 40
    base = _run(cfg, 70)
    stim = _run(cfg, 70, ((on, a, 1.0, dur), (on, b, 0.5, dur)))
    start = on + cfg.opto_latency_frames
    np.testing.assert_array_equal(base["spikes"][:start], stim["spikes"][:start])   # nothing before the latency
    assert not stim["stimulated"][:start].any() and not stim["stimulated"][start + dur:].any()
    assert stim["stimulated"][start:start + dur][:, np.r_[a, b]].all()
    assert stim["spikes"][start][a].sum() > 2 * base["spikes"][start][a].sum() + 5   # the first driven frame
    win = slice(start, start + dur)
    for targets, gain in ((a, 1.0), (b, 0.5)):
        ratio = stim["spikes"][win][:, targets].sum() / base["spikes"][win][:, targets].sum()
        assert abs(ratio / (1 + cfg.opto_gain * gain) - 1) < 0.15, (gain, ratio)
    others = np.setdiff1d(np.arange(300), np.r_[a, b])
    ratio = stim["spikes"][win][:, others].sum() / base["spikes"][win][:, others].sum()
    assert abs(ratio - 1) < 0.15                                    # no network kick configured: unchanged


def test_opto_dff_response_has_the_expected_size() -> None:
    cfg = dataclasses.replace(SMALL, opto_network_coupling=0.0, opto_gain=5.0)
    targets, on, dur = np.arange(0, 300, 10), 300, 8
    base = _run(cfg, 330)
    stim = _run(cfg, 330, ((on, targets, 1.0, dur),))
    f0 = np.percentile(base["trace"][:, targets], 8, axis=0)       # (K,) ZAPBench-style baseline
    win = slice(on + cfg.opto_latency_frames + 2, on + cfg.opto_latency_frames + dur)
    measured = ((stim["trace"][win, targets] - base["trace"][win, targets]) / f0).mean()
    # a priori: dF/F = dff_per_spike * calcium of the signal above the camera offset (F0 includes it)
    dcal = stim["calcium"][win, targets] - base["calcium"][win, targets]
    expected = (cfg.dff_per_spike * dcal * (f0 - cfg.background_counts) / f0).mean()
    assert expected > 0.3 and abs(measured / expected - 1) < 0.2, (measured, expected)


def test_behaviour_follows_its_driver_neurons(small_run: dict[str, Any]) -> None:
    fish, beh, spk = small_run["fish"], small_run["behaviour"], small_run["spikes"]
    drivers = fish.behaviour_neurons
    members = np.flatnonzero(np.isin(fish.anatomy.ensemble, SMALL.behaviour_ensembles))
    assert set(drivers) <= set(members) and abs(len(drivers) - SMALL.behaviour_fraction * len(members)) <= 2
    assert (beh >= 0).all() and 0.05 < (beh > 0).mean() < 0.95    # rectified: bouts and rests
    g = np.exp(-1.0 / SMALL.behaviour_tau_frames)
    h = np.zeros(len(drivers))
    drive = np.empty(len(beh))
    for t in range(len(beh)):
        h = g * h + (1 - g) * spk[t, drivers]
        drive[t] = fish.behaviour_weights @ h
    rho = spearmanr(beh[20:], drive[20:])[0]
    rng = np.random.default_rng(0)
    others = rng.choice(np.setdiff1d(np.arange(SMALL.n_neurons), members), len(drivers), replace=False)
    rho_other = spearmanr(beh[20:], spk[20:, others].sum(1))[0]
    assert rho > 0.6 and rho > rho_other + 0.3, (rho, rho_other)
    bout = beh > 0.5                                                # well above the rectification
    bout[:20] = False
    fit = np.c_[drive[bout], np.ones(bout.sum())]
    coef = np.linalg.lstsq(fit, beh[bout], rcond=None)[0]           # behaviour = drive / rest - threshold + noise
    resid = beh[bout] - fit @ coef
    assert bout.sum() > 50 and coef[0] > 0 and abs(coef[1] + SMALL.behaviour_threshold) < 0.15, coef
    assert abs(resid.std() / SMALL.behaviour_noise - 1) < 0.25, resid.std()


def test_bleaching_dims_neurons_and_neuropil() -> None:
    assert 0.2 <= 1 - np.exp(-7879 / FishConfig().bleach_tau_frames) <= 0.3   # default: ZAPBench loses 20-30%
    cfg = dataclasses.replace(SMALL, **{**QUIET, "bleach_tau_frames": 200.0})
    fish = FishModel(cfg)
    neuropil = brain_mask(cfg.shape) & (fish.anatomy.segmentation == 0)
    nuclei = fish.anatomy.segmentation > 0
    level = np.array([[v[neuropil].mean(), v[nuclei].mean()] for v in
                      (fish.step(np.zeros(26)).volume.astype(np.float64) for _ in range(200))])
    ratio = (level[-20:].mean(0) - cfg.background_counts) / (level[:20].mean(0) - cfg.background_counts)
    np.testing.assert_allclose(ratio, np.exp(-180 / 200), rtol=0.05)


def test_calcium_kernel_rise_and_decay() -> None:
    cfg = dataclasses.replace(SMALL, tau_rise_s=1.0, tau_decay_s=3.0, drift_amplitude=0.0, bleach_tau_frames=0.0)
    run = _run(cfg, 300)
    dt = cfg.frame_period_s
    t = np.arange(200) + 0.5
    k = np.exp(-t * dt / cfg.tau_decay_s) - np.exp(-t * dt / cfg.tau_rise_s)
    k /= k.max()
    assert k.argmax() >= 1                                          # a visible rise: peak after the spike's frame
    spk = run["spikes"]
    pred = np.stack([np.convolve(spk[:, i], k)[:300] for i in range(cfg.n_neurons)], 1)
    np.testing.assert_allclose(run["calcium"][100:], pred[100:], rtol=1e-3, atol=1e-3)
    base = run["fluorescence"] / (1 + cfg.dff_per_spike * run["calcium"])   # F = baseline (1 + dff c)
    np.testing.assert_allclose(base, np.broadcast_to(base[0], base.shape), rtol=1e-4)
