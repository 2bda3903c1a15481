"""Streaming and offline OASIS (realtime/spikes/oasis.py): exactness, the oasis-deconv peer, lag, warm-up,
parameter estimation and accuracy on the simulated fish."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from loopcast.realtime.preprocess.dff import CausalDff, DffConfig
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.spikes.oasis import OasisConfig, OasisParams, StreamingOasis, estimate_params, oasis_offline
from loopcast.realtime.spikes.oasis_torch import TorchStreamingOasis
from loopcast.replay.fish import FishConfig, FishModel, stimulus_schedule

DT = 0.9141
ROOT = Path(__file__).resolve().parents[2]


def ar1_traces(t: int, n: int, g: float, sigma: float, rate: float, seed: int,
               baseline: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """(spikes (T, N), dF/F (T, N) float32): AR(1) calcium of Poisson spikes, 0.1 dF/F each, plus noise."""
    rng = np.random.default_rng(seed)
    spikes = rng.poisson(rate, (t, n)).astype(np.float64)
    c = np.zeros((t, n))
    for i in range(t):
        c[i] = (g * c[i - 1] if i else 0.0) + 0.1 * spikes[i]
    return spikes, (c + baseline + rng.normal(0.0, sigma, (t, n))).astype(np.float32)


def params_for(n: int, g: float, smin: float, baseline: float = 0.02) -> OasisParams:
    f = np.float32
    return OasisParams(np.full(n, g, f), np.full(n, 0.02, f), np.full(n, baseline, f), np.full(n, smin, f))


def run(est: StreamingOasis | TorchStreamingOasis, dff: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(est.process(row)) for row in dff])


@pytest.fixture(scope="module")
def traces() -> np.ndarray:
    return ar1_traces(160, 6, 0.63, 0.02, 0.1, seed=1)[1]


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("smin", [0.0, 0.03, 0.06])
def test_offline_matches_the_oasis_deconv_peer(smin: float) -> None:
    try:
        from oasis.oasis_methods import oasisAR1
    except ImportError as e:   # pragma: no cover
        pytest.skip(f"peer oasis-deconv not importable ({e}); install the dev extra to compare")
    _, y = ar1_traces(400, 3, 0.7, 0.02, 0.1, seed=2)
    b = np.array([0.02, 0.0, 0.05])
    g = np.array([0.7, 0.6, 0.8])
    c, s = oasis_offline(y, g, smin, b)
    for j in range(3):   # the peer takes baseline-free float64 data; lam=0 leaves only s_min
        c_ref, s_ref = oasisAR1(y[:, j].astype(np.float64) - b[j], g[j], lam=0, s_min=smin)
        np.testing.assert_allclose(c[:, j], c_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s[:, j], s_ref, rtol=0, atol=1e-12)
        assert s[0, j] == 0.0 and np.all((s[:, j] == 0) | (s[:, j] >= smin - 1e-12))
    c1, s1 = oasis_offline(y[:, 1], 0.6, smin, 0.0)   # 1-D input gives 1-D output
    np.testing.assert_array_equal(s1, s[:, 1])


@pytest.mark.parametrize("lag", [0, 2])
def test_streaming_equals_offline_on_every_prefix(traces: np.ndarray, lag: int) -> None:
    t, n = traces.shape
    p = params_for(n, 0.63, 0.03)
    est = StreamingOasis(n, p, OasisConfig(lag=lag, max_pools=t))
    for i, row in enumerate(traces):
        out = est.process(row)
        if i < lag:
            assert not out.any()
            continue
        _, s = oasis_offline(traces[: i + 1], p.g, p.smin, p.baseline)
        np.testing.assert_array_equal(out, s[i - lag].astype(np.float32))
    first, c_held, s_held = est.held()
    c, s = oasis_offline(traces, p.g, p.smin, p.baseline)
    assert first == 0 and est.frames == t
    np.testing.assert_array_equal(c_held, c)
    np.testing.assert_array_equal(s_held, s)


def test_bounded_ring_stays_close_to_offline(traces: np.ndarray) -> None:
    t, n = traces.shape
    p = params_for(n, 0.63, 0.03)
    est = StreamingOasis(n, p, OasisConfig(lag=2, max_pools=4))
    out = run(est, traces)
    _, s = oasis_offline(traces, p.g, p.smin, p.baseline)
    assert np.all((out == 0) | (out >= 0.03 - 1e-6))
    for j in range(n):
        assert np.corrcoef(out[2:, j], s[:-2, j])[0, 1] > 0.95
    first, c_held, _ = est.held()
    assert first > 0 and c_held.shape == (t - first, n)
    assert np.isfinite(c_held[-4:]).all()   # the newest frames are always held


def test_lag_shifts_the_estimates(traces: np.ndarray) -> None:
    n = traces.shape[1]
    p = params_for(n, 0.63, 0.03)
    lag0 = run(StreamingOasis(n, p, OasisConfig(max_pools=64)), traces)
    lag3 = run(StreamingOasis(n, p, OasisConfig(lag=3, max_pools=64)), traces)
    assert not lag3[:3].any()
    # a look-back only changes a frame's estimate where later frames revised it
    assert np.mean(lag3[3:] == lag0[:-3]) > 0.8 and lag3[3:].sum() > 0


# ------------------------------------------------------------------ warm-up and parameters


def test_internal_warmup_matches_given_parameters(traces: np.ndarray) -> None:
    n = traces.shape[1]
    cfg = OasisConfig(warmup=40, lag=1)
    auto = StreamingOasis(n, None, cfg, DT)
    out = run(auto, traces)
    assert not out[: cfg.warmup].any() and auto.ready and auto.frames == len(traces)
    p, n_fallback = estimate_params(traces[: cfg.warmup], DT, cfg)
    ref = run(StreamingOasis(n, p, cfg, DT), traces)
    np.testing.assert_array_equal(out[cfg.warmup:], ref[cfg.warmup:])
    assert auto.n_fallback == n_fallback and auto.params is not None
    np.testing.assert_array_equal(auto.params.g, p.g)


def held_fit(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> threading.Event:
    """Make the warm-up's parameter fit wait for the returned event (and then fail, with `fail`)."""
    from loopcast.realtime.spikes import oasis
    gate, fit = threading.Event(), oasis.estimate_params

    def held(*args: object) -> tuple[OasisParams, int]:
        assert gate.wait(30)
        if fail:
            raise FloatingPointError("the fit failed")
        return fit(*args)  # type: ignore[arg-type]
    monkeypatch.setattr(oasis, "estimate_params", held)
    return gate


@pytest.mark.parametrize("impl", ["numba", "torch"])
def test_a_background_fit_gives_the_inline_outputs_from_the_frame_it_lands_on(
        traces: np.ndarray, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n, cfg, late = traces.shape[1], OasisConfig(warmup=40, lag=1), 3
    make = StreamingOasis if impl == "numba" else TorchStreamingOasis
    inline = run(make(n, None, cfg, DT), traces)
    gate = held_fit(monkeypatch)
    est = make(n, None, cfg, DT, background=True)
    out = [np.asarray(est.process(row)) for row in traces[:cfg.warmup + late]]   # the fit is held meanwhile
    assert est.fitting and not est.ready and not np.any(out)
    gate.set()
    est.wait_for_fit(30)
    out += [np.asarray(est.process(row)) for row in traces[cfg.warmup + late:]]
    assert est.ready and not est.fitting and est.frames == len(traces)
    first = cfg.warmup + late                          # the frame that found the fit done: replayed, then live
    np.testing.assert_array_equal(np.stack(out)[first:], inline[first:])
    assert inline[cfg.warmup:first].any()              # what the frames during the fit report inline


def test_a_failed_background_fit_raises_on_the_loop(traces: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OasisConfig(warmup=20)
    gate = held_fit(monkeypatch, fail=True)
    est = StreamingOasis(traces.shape[1], None, cfg, DT, background=True)
    run(est, traces[:cfg.warmup])
    gate.set()
    est.wait_for_fit(30)
    with pytest.raises(FloatingPointError, match="the fit failed"):
        est.process(traces[cfg.warmup])


def test_a_fit_that_never_ends_is_an_error_not_a_growing_buffer(traces: np.ndarray,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OasisConfig(warmup=20)
    gate = held_fit(monkeypatch)
    est = StreamingOasis(traces.shape[1], None, cfg, DT, background=True)
    run(est, traces[:2 * cfg.warmup])                  # the warm-up, then as many frames buffered
    with pytest.raises(RuntimeError, match="still running after 20 more frames"):
        est.process(traces[2 * cfg.warmup])
    gate.set()


@pytest.mark.parametrize("t", [2, 3, 10])
def test_estimate_params_on_short_data_uses_the_prior(t: int) -> None:
    _, y = ar1_traces(t, 5, 0.63, 0.02, 0.1, seed=3)
    cfg = OasisConfig(tau_decay_s=2.0)
    p, n_fallback = estimate_params(y, DT, cfg)
    assert n_fallback == 5
    np.testing.assert_allclose(p.g, math.exp(-DT / 2.0), rtol=1e-6)
    for a in (p.sigma, p.baseline, p.smin):
        assert a.shape == (5,) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.all(p.sigma >= cfg.sigma_floor)
    with pytest.raises(ValueError, match="T >= 2"):
        estimate_params(y[:1], DT, cfg)


def test_constant_traces_get_the_sigma_floor_and_no_spikes() -> None:
    y = np.full((100, 4), 0.05, np.float32)
    y[:, 1] = 0.0
    cfg = OasisConfig(sigma_floor=1e-4, smin_sigma=1.0)
    p, n_fallback = estimate_params(y, DT, cfg)
    assert n_fallback == 4   # no autocovariance: prior g
    np.testing.assert_allclose(p.sigma, 1e-4)
    np.testing.assert_allclose(p.baseline, [0.05, 0.0, 0.05, 0.05])
    np.testing.assert_allclose(p.smin, 1e-4)
    assert not run(StreamingOasis(4, p, cfg), y).any()


@pytest.mark.parametrize("g", [0.5, 0.8])
def test_estimate_params_recovers_a_known_decay(g: float) -> None:
    _, y = ar1_traces(1500, 40, g, 0.02, 0.05, seed=4)
    own, n_fallback = estimate_params(y, DT, OasisConfig(g_pool=0.0))
    pooled, _ = estimate_params(y, DT, OasisConfig())
    assert n_fallback == 0
    assert abs(float(np.median(own.g)) - g) < 0.03 and np.ptp(pooled.g) < np.ptp(own.g)
    assert abs(float(np.median(pooled.g)) - g) < 0.03
    assert abs(float(np.median(own.sigma)) / 0.02 - 1.0) < 0.15   # sparse spikes inflate it a little
    assert abs(float(np.median(own.baseline)) - 0.02) < 0.01


def test_validation() -> None:
    with pytest.raises(ValueError, match="max_pools"):
        OasisConfig(lag=3, max_pools=4)
    with pytest.raises(ValueError, match="g_min"):
        OasisConfig(g_min=0.9, g_max=0.5)
    with pytest.raises(ValueError, match="warmup"):
        OasisConfig(warmup=1)
    with pytest.raises(ValueError, match="same shape"):
        OasisParams(np.full(3, 0.5), np.ones(3), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="0 < g < 1"):
        params_for(3, 1.0, 0.0)
    with pytest.raises(ValueError, match="expected 4"):
        StreamingOasis(4, params_for(3, 0.6, 0.0))
    with pytest.raises(ValueError, match="shape"):
        StreamingOasis(3, params_for(3, 0.6, 0.0)).process(np.zeros(4, np.float32))


# ------------------------------------------------------------------ torch twin and layering


@pytest.mark.parametrize(("lag", "max_pools"), [(0, 2), (0, 5), (2, 4), (2, 200)])
def test_torch_version_gives_the_same_outputs(traces: np.ndarray, lag: int, max_pools: int) -> None:
    pytest.importorskip("torch")
    n = traces.shape[1]
    p = params_for(n, 0.63, 0.02)
    cfg = OasisConfig(lag=lag, max_pools=max_pools)
    ref = run(StreamingOasis(n, p, cfg), traces)
    out = run(TorchStreamingOasis(n, p, cfg, device="cpu"), traces)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    auto = TorchStreamingOasis(n, None, dataclasses.replace(cfg, warmup=30), device="cpu")
    np.testing.assert_allclose(run(auto, traces), run(StreamingOasis(n, None, dataclasses.replace(cfg, warmup=30)),
                                                      traces), rtol=0, atol=1e-6)


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, loopcast.realtime.spikes.oasis; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# ------------------------------------------------------------------ accuracy on the simulated fish


@pytest.fixture(scope="module")
def fish() -> tuple[np.ndarray, np.ndarray]:
    """(causal dF/F (T, N), true spikes (T, N)) of a small rendered fish, 600 frames at SNR 4."""
    cfg = FishConfig(shape=(64, 48, 8), n_neurons=300, n_ensembles=4, seed=11, snr=4.0)
    model, n_frames = FishModel(cfg), 600
    cov = stimulus_schedule(cfg, n_frames).covariates
    traces = TraceExtractor(model.anatomy.segmentation)
    dff = CausalDff(traces.n_neurons, DffConfig())
    out, spikes = np.empty((n_frames, cfg.n_neurons), np.float32), np.empty((n_frames, cfg.n_neurons), np.float32)
    for t in range(n_frames):
        frame = model.step(cov[t])
        out[t], spikes[t] = dff.process(traces.process(frame.volume))[0], frame.spikes
    return out, spikes


def median_corr(est: np.ndarray, truth: np.ndarray) -> float:
    keep = (est.std(axis=0) > 0) & (truth.std(axis=0) > 0)
    cs = [np.corrcoef(est[:, j], truth[:, j])[0, 1] if keep[j] else 0.0 for j in range(est.shape[1])]
    return float(np.median(cs))


def test_streaming_oasis_beats_the_first_difference_on_the_simulator(fish: tuple[np.ndarray, np.ndarray]) -> None:
    dff, spikes = fish
    w, n = 100, dff.shape[1]
    naive = median_corr(np.maximum(np.diff(dff, axis=0), 0)[w - 1:], spikes[w:])
    for lag in (0, 2):
        out = run(StreamingOasis(n, None, OasisConfig(warmup=w, lag=lag), DT), dff)
        corr = median_corr(out[w + lag:], spikes[w:len(dff) - lag])
        assert corr > naive + 0.02, (lag, corr, naive)
    p, _ = estimate_params(dff[:w], DT, OasisConfig(warmup=w))
    _, s = oasis_offline(dff, p.g, p.smin, p.baseline)
    assert median_corr(s[w:], spikes[w:]) > naive + 0.02
