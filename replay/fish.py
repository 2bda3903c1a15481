"""The synthetic fish: its config and a frame-by-frame simulated light-sheet rig.

Generative model (per frame t, dt = frame_period_s; E ensembles, N neurons):
  latent   z_t = A z_{t-1} + (I - A) k B u_t + noise + opto kick   (coupled damped oscillators, replay/dynamics.py)
  log-rate_i = log base_i + w_i (latent_gain x_e(i) + stim_gain (B u_t)_e(i)) + eta_i   (eta: private AR(1))
  rate_i *= 1 + opto_gain * gain while neuron i is optogenetically driven; capped at max_rate_hz
  spikes ~ Poisson(rate dt);  calcium c = spikes * double-exponential kernel (peak 1 per isolated spike)
  F_i = baseline_i * drift_i(t) * bleach(t) * (1 + dff_per_spike * c_i),  bleach(t) = exp(-t / bleach_tau_frames)
  behaviour = max(0, sum_k v_k h_k / rest - behaviour_threshold + behaviour_noise * eps),  h: driver spikes
              smoothed over behaviour_tau_frames, rest: their expected value at the base rates
  volume = camera offset + neuropil (x bleach x (1 + neuropil_coupling * mean dF/F)) or F_i * nuclear profile,
           + shot + read noise -> uint16, Fortran (x, y, z) order (replay/render.py, its approximations there)
  motion: with cfg.motion on, the expected image moves rigidly by shift_t (x, y, z voxels, sub-voxel) before the
          camera noise (replay/motion.py); frame.shift is that true shift (zeros when off)
SNR: with snr > 0 the shot-noise gain is solved so that the median over neurons of
  (one isolated spike's peak change of the segment-mean trace) / (std of that trace's noise at rest) = snr
(formula in replay.render.trace_snr); snr = 0 uses shot_noise_gain and read_noise as given.
Everything is drawn from `seed`: equal configs and equal inputs give equal frames, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loopcast.replay.anatomy import Anatomy, brain_mask, build_anatomy  # noqa: F401  (re-exported)
from loopcast.replay.dynamics import (
    CalciumKernel,
    behaviour_drivers,
    ensemble_coupling,
    latent_dynamics,
    stimulus_input,
)
from loopcast.replay.motion import MotionConfig, RigidMotion
from loopcast.replay.protocol import (  # noqa: F401  (the constants and condition_offsets are re-exported)
    CONDITION_COVARIATES,
    CONDITION_NAMES,
    FRAME_PERIOD_S,
    N_COVARIATES,
    ZAPBENCH_CONDITION_OFFSETS,
    Schedule,
    condition_offsets,
    schedule_for_seed,
)
from loopcast.replay.render import Renderer, solve_shot_gain


@dataclass(frozen=True)
class FishConfig:
    """Size, dynamics, indicator, optics and optogenetics of the simulated fish (defaults: small demo fish)."""

    seed: int = 0
    shape: tuple[int, int, int] = (128, 96, 16)       # x, y, z voxels
    n_neurons: int = 3000
    n_ensembles: int = 12
    frame_period_s: float = 0.9141
    # anatomy: nuclear blob radii (voxels) and minimum centre spacing in units of those radii
    nucleus_radius_vox: tuple[float, float, float] = (1.2, 1.2, 0.8)
    min_spacing: float = 1.5
    # dynamics
    base_rate_hz: float = 0.2                 # median spontaneous rate
    rate_spread: float = 0.5                  # log-normal sigma of per-neuron base rates
    max_rate_hz: float = 30.0
    latent_std: float = 1.0                   # stationary std of each ensemble latent
    latent_gain: float = 0.8                  # log-rate per unit latent
    latent_decay: tuple[float, float] = (0.85, 0.97)           # oscillator moduli; hi caps the spectral radius
    latent_period_frames: tuple[float, float] = (12.0, 80.0)   # oscillation periods
    coupling: float = 0.1                     # total near-neighbour input weight per ensemble (0: independent)
    coupling_length: float = 1.0              # near coupling decay length / median nearest-centroid distance
    long_range_links: float = 0.5             # long-range links per ensemble (between the farther half of pairs)
    long_range_strength: float = 0.5          # |weight| of a long-range link, relative to a near row (sum 1)
    stim_driven_fraction: float = 0.6         # share of ensembles that receive covariate input
    stim_gain: float = 1.0                    # direct (fast) log-rate response to covariates
    stim_to_latent: float = 0.5               # steady-state latent response to covariates
    private_noise: float = 0.3                # per-neuron AR(1) log-rate noise std
    # calcium indicator and fluorescence
    tau_rise_s: float = 0.5
    tau_decay_s: float = 2.0
    dff_per_spike: float = 0.1                # peak dF/F of one isolated spike (above the camera offset)
    baseline_range: tuple[float, float] = (200.0, 800.0)   # per-neuron resting F (counts above offset)
    drift_amplitude: float = 0.03             # slow sinusoidal baseline drift (fraction)
    drift_period_frames: tuple[float, float] = (400.0, 3000.0)
    bleach_tau_frames: float = 30000.0        # exponential photobleaching (0 = none): -23% over 7879 frames
    # behaviour readout (swim vigor)
    behaviour_ensembles: tuple[int, ...] = (0, 1)   # ensembles whose neurons drive it
    behaviour_fraction: float = 0.5           # share of those ensembles' neurons that are drivers
    behaviour_tau_frames: float = 2.0         # smoothing of the drivers' spikes
    behaviour_threshold: float = 1.5          # in units of the drivers' resting drive
    behaviour_noise: float = 0.1
    # optics and camera
    background_counts: float = 100.0          # camera offset
    neuropil_counts: float = 60.0             # unsegmented tissue inside the brain
    neuropil_coupling: float = 1.0            # neuropil gain per unit of mean dF/F
    snr: float = 4.0                          # > 0: solve shot_noise_gain for this median trace SNR (see above)
    shot_noise_gain: float = 1.0              # variance per count above offset (1 = Poisson); used if snr = 0
    read_noise: float = 3.0                   # Gaussian read noise std (counts)
    # optogenetics
    opto_gain: float = 20.0                   # rate multiplier - 1 at gain 1
    opto_latency_frames: int = 1              # frames between stimulate() and the first driven frame
    opto_network_coupling: float = 0.3        # latent kick per fraction of an ensemble stimulated
    # rigid motion of the fish (off by default; replay/motion.py, configs/motion.toml)
    motion: MotionConfig = field(default_factory=MotionConfig)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 2:
            raise ValueError(f"shape must be 3 sizes >= 2 (x, y, z), got {self.shape}")
        if self.n_neurons < 1 or not 1 <= self.n_ensembles <= self.n_neurons:
            raise ValueError(f"need n_neurons >= 1 and 1 <= n_ensembles <= n_neurons, "
                             f"got {self.n_neurons}, {self.n_ensembles}")
        _positive(self, "frame_period_s", "base_rate_hz", "max_rate_hz", "tau_rise_s", "tau_decay_s",
                  "min_spacing", "coupling_length", "behaviour_tau_frames")
        _nonnegative(self, "rate_spread", "latent_std", "latent_gain", "coupling", "long_range_links",
                     "long_range_strength", "stim_gain", "stim_to_latent", "private_noise", "dff_per_spike",
                     "drift_amplitude", "bleach_tau_frames", "behaviour_threshold", "behaviour_noise",
                     "background_counts", "neuropil_counts", "neuropil_coupling", "snr", "shot_noise_gain",
                     "read_noise", "opto_gain", "opto_latency_frames", "opto_network_coupling")
        if min(self.nucleus_radius_vox) < 0.5:
            raise ValueError(f"nucleus_radius_vox must be >= 0.5 voxels, got {self.nucleus_radius_vox}")
        lo, hi = self.latent_decay
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"latent_decay must satisfy 0 < lo <= hi < 1 (stability), got {self.latent_decay}")
        for name in ("latent_period_frames", "baseline_range", "drift_period_frames"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if self.latent_period_frames[0] < 2.0:
            raise ValueError("latent_period_frames must be >= 2 frames (Nyquist)")
        if not 0.0 <= self.stim_driven_fraction <= 1.0 or self.drift_amplitude >= 1.0:
            raise ValueError("stim_driven_fraction must be in [0, 1] and drift_amplitude < 1")
        if self.tau_rise_s >= self.tau_decay_s:
            raise ValueError(f"tau_rise_s must be < tau_decay_s, got {self.tau_rise_s}, {self.tau_decay_s}")
        be = self.behaviour_ensembles
        if len(set(be)) != len(be) or any(not 0 <= e < self.n_ensembles for e in be):
            raise ValueError(f"behaviour_ensembles must be distinct ensemble ids in [0, {self.n_ensembles}), "
                             f"got {be}")
        if not 0.0 < self.behaviour_fraction <= 1.0:
            raise ValueError(f"behaviour_fraction must be in (0, 1], got {self.behaviour_fraction}")


def _positive(cfg: FishConfig, *names: str) -> None:
    for n in names:
        if not getattr(cfg, n) > 0:
            raise ValueError(f"{n} must be > 0, got {getattr(cfg, n)}")


def _nonnegative(cfg: FishConfig, *names: str) -> None:
    for n in names:
        if not getattr(cfg, n) >= 0:
            raise ValueError(f"{n} must be >= 0, got {getattr(cfg, n)}")


@dataclass(frozen=True)
class FishFrame:
    """One simulated frame: the raw volume and the ground truth behind it."""

    volume: np.ndarray        # (x, y, z) uint16, Fortran order (z planes of y rows of x)
    spikes: np.ndarray        # (N,) float32 spike counts this frame
    calcium: np.ndarray       # (N,) float32 indicator state (1 = one isolated spike's peak)
    fluorescence: np.ndarray  # (N,) float32 noiseless per-neuron F above offset (nucleus-centre brightness)
    stimulated: np.ndarray    # (N,) bool: under optogenetic drive this frame
    behaviour: float          # swim vigor, >= 0
    shift: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))   # (3,) float32 true x, y, z


def stimulus_schedule(cfg: FishConfig, n_frames: int) -> Schedule:
    """The fish's stimulus protocol: ZAPBench-like condition blocks over n_frames (seeded by cfg.seed)."""
    return schedule_for_seed(cfg.seed, n_frames)


class FishModel:
    """A simulated fish under a light-sheet microscope, advanced one frame per `step()`.

    Public: cfg, anatomy, t (frames produced), behaviour_neurons / behaviour_weights (readout drivers),
    coupling ((E, E) effective ensemble coupling), dynamics ((2E, 2E) latent matrix), shot_noise_gain
    (the one used, solved when cfg.snr > 0), kernel (the calcium kernel).
    """

    def __init__(self, cfg: FishConfig) -> None:
        self.cfg = cfg
        s_anat, s_dyn, s_lat, s_spk, s_noise, s_beh = np.random.SeedSequence(cfg.seed).spawn(6)
        self.anatomy, nuclei, neuropil = build_anatomy(cfg.shape, cfg.n_neurons, cfg.n_ensembles,
                                                       cfg.nucleus_radius_vox, cfg.min_spacing,
                                                       cfg.neuropil_counts, np.random.default_rng(s_anat))
        rng = np.random.default_rng(s_dyn)
        self._init_network(rng)
        self._init_neurons(rng)
        self.shot_noise_gain = (solve_shot_gain(nuclei, self._baseline, cfg.dff_per_spike, cfg.read_noise, cfg.snr)
                                if cfg.snr > 0 else cfg.shot_noise_gain)
        self._renderer = Renderer(cfg.shape, nuclei, neuropil, cfg.background_counts, self.shot_noise_gain,
                                  cfg.read_noise, np.random.default_rng(s_noise))
        self._rng_lat, self._rng_spk = np.random.default_rng(s_lat), np.random.default_rng(s_spk)
        self._rng_beh = np.random.default_rng(s_beh)
        self._z = self._latent.chol @ self._rng_lat.standard_normal(2 * cfg.n_ensembles)   # stationary start
        self._eta = (cfg.private_noise * self._rng_lat.standard_normal(cfg.n_neurons)).astype(np.float32)
        lam = np.exp(self._log_base) * np.float32(cfg.frame_period_s)                       # spikes / frame
        self._cd, self._cr = self.kernel.stationary(lam)
        self._h = lam[self.behaviour_neurons].astype(np.float32)
        self._rest = float(np.dot(self.behaviour_weights, self._h)) or 1.0
        self._pulses: list[tuple[int, int, np.ndarray, float]] = []   # (start, stop, targets, gain)
        self._motion = RigidMotion(cfg.motion) if cfg.motion.enabled else None
        self.t = 0

    def _init_network(self, rng: np.random.Generator) -> None:
        cfg, ens = self.cfg, self.anatomy.ensemble
        e = cfg.n_ensembles
        pos = self.anatomy.positions / np.asarray(cfg.nucleus_radius_vox, np.float32)   # isotropic units
        centroids = np.stack([np.bincount(ens, pos[:, a], e) for a in range(3)], 1) / np.bincount(ens)[:, None]
        w = ensemble_coupling(centroids, cfg.coupling, cfg.coupling_length, cfg.long_range_links,
                              cfg.long_range_strength, rng)
        self._latent = latent_dynamics(w, cfg.latent_decay, cfg.latent_period_frames, cfg.latent_std, rng)
        self.coupling, self.dynamics = self._latent.coupling, self._latent.a
        self._i_minus_a = np.eye(2 * e) - self._latent.a
        self._b = stimulus_input(e, cfg.stim_driven_fraction, rng)
        self._ens = ens.astype(np.int64)
        self._ens_size = np.bincount(self._ens, minlength=e).astype(np.float64)

    def _init_neurons(self, rng: np.random.Generator) -> None:
        cfg, n = self.cfg, self.cfg.n_neurons
        self._log_base = (np.log(cfg.base_rate_hz) + cfg.rate_spread * rng.standard_normal(n)).astype(np.float32)
        self._w = rng.uniform(0.3, 1.3, n).astype(np.float32)
        self._baseline = rng.uniform(*cfg.baseline_range, n).astype(np.float32)
        self._drift_omega = (2 * np.pi / rng.uniform(*cfg.drift_period_frames, n)).astype(np.float32)
        self._drift_phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        self.kernel = CalciumKernel.build(cfg.frame_period_s, cfg.tau_rise_s, cfg.tau_decay_s)
        self.behaviour_neurons, self.behaviour_weights = behaviour_drivers(
            self.anatomy.ensemble, cfg.behaviour_ensembles, cfg.behaviour_fraction, rng)

    def stimulate(self, targets: np.ndarray, gain: float, duration_frames: int) -> None:
        """Drive neurons `targets` (0-based ids) at `gain` x the configured opto_gain for `duration_frames`
        frames, starting `opto_latency_frames` frames after the next frame (latency 0: the next frame)."""
        tg = np.unique(np.asarray(targets, dtype=np.int64).reshape(-1))
        if tg.size and (tg[0] < 0 or tg[-1] >= self.cfg.n_neurons):
            raise ValueError(f"stimulation targets must be neuron ids in [0, {self.cfg.n_neurons})")
        if gain < 0 or duration_frames < 1:
            raise ValueError(f"need gain >= 0 and duration_frames >= 1, got {gain}, {duration_frames}")
        start = self.t + self.cfg.opto_latency_frames
        self._pulses.append((start, start + int(duration_frames), tg, float(gain)))

    def _opto(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Opto drive at frame t -> ((N,) float32 gain sum, (N,) bool stimulated)."""
        drive = np.zeros(self.cfg.n_neurons, np.float32)
        self._pulses = [p for p in self._pulses if p[1] > t]
        for start, _, tg, gain in self._pulses:                      # a few pulses, never a loop over neurons
            if start <= t:
                drive[tg] += gain
        return drive, drive > 0

    def warm_up(self, out: np.ndarray | None = None) -> None:
        """Render one blank volume into `out` (as `step` takes it; a scratch volume when None) without
        advancing the fish or drawing from its random streams: its frames stay what an unwarmed fish's
        would be (replay.render.Renderer.warm_up)."""
        self._renderer.warm_up(self.cfg.n_neurons, self._renderer.check_out(out))

    def step(self, covariates: np.ndarray, out: np.ndarray | None = None) -> FishFrame:
        """Advance one frame under `covariates` (26,); render into `out` ((x, y, z) uint16 F-contiguous,
        returned as frame.volume without a copy) or into a fresh array when None."""
        u = np.asarray(covariates, dtype=np.float64).reshape(-1)
        if u.shape != (N_COVARIATES,):
            raise ValueError(f"covariates must have shape ({N_COVARIATES},), got {np.shape(covariates)}")
        volume = self._renderer.check_out(out)
        spikes, stimulated = self._spikes(u)
        calcium = self._calcium(spikes)
        behaviour = self._behaviour(spikes)
        cfg, t = self.cfg, self.t
        bleach = np.float32(np.exp(-t / cfg.bleach_tau_frames) if cfg.bleach_tau_frames > 0 else 1.0)
        drift = 1.0 + np.float32(cfg.drift_amplitude) * np.sin(self._drift_omega * t + self._drift_phase)
        dff = np.float32(cfg.dff_per_spike) * calcium
        fluor = (self._baseline * bleach) * drift * (1.0 + dff)                  # (N,) float32
        shift = self._motion.next() if self._motion is not None else np.zeros(3, np.float32)
        self._renderer.render(fluor, bleach * (1.0 + cfg.neuropil_coupling * float(dff.mean())), volume, shift)
        self.t += 1
        return FishFrame(volume, spikes, calcium, fluor, stimulated, behaviour, shift)

    def _spikes(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latent, private noise, rates and Poisson spikes for covariates u -> ((N,) spikes, (N,) stimulated)."""
        cfg, e = self.cfg, self.cfg.n_ensembles
        drive = self._b @ u                                                  # (E,)
        opto, stimulated = self._opto(self.t)
        kick = cfg.opto_network_coupling * np.bincount(self._ens, weights=opto, minlength=e) / self._ens_size
        target = np.zeros(2 * e)
        target[0::2] = cfg.stim_to_latent * drive
        self._z = (self._latent.a @ self._z + self._i_minus_a @ target
                   + self._latent.noise * self._rng_lat.standard_normal(2 * e))
        self._z[0::2] += kick
        rho = np.float32(0.9)
        self._eta = rho * self._eta + np.float32(cfg.private_noise * np.sqrt(1 - rho * rho)) * \
            self._rng_lat.standard_normal(cfg.n_neurons, dtype=np.float32)
        ens_drive = (cfg.latent_gain * self._z[0::2] + cfg.stim_gain * drive).astype(np.float32)   # (E,)
        rate = np.exp(self._log_base + self._w * ens_drive[self._ens] + self._eta)              # (N,) Hz
        rate *= 1.0 + np.float32(cfg.opto_gain) * opto
        np.minimum(rate, np.float32(cfg.max_rate_hz), out=rate)
        return self._rng_spk.poisson(rate * cfg.frame_period_s).astype(np.float32), stimulated

    def _calcium(self, spikes: np.ndarray) -> np.ndarray:
        """Advance the two indicator states -> (N,) float32 calcium (peak 1 per isolated spike)."""
        k = self.kernel
        self._cd = np.float32(k.g_decay) * self._cd + np.float32(k.a_decay) * spikes
        self._cr = np.float32(k.g_rise) * self._cr + np.float32(k.a_rise) * spikes
        return np.float32(k.norm) * (self._cd - self._cr)

    def _behaviour(self, spikes: np.ndarray) -> float:
        """Swim vigor: rectified, noisy readout of the drivers' smoothed spiking."""
        cfg = self.cfg
        g = np.float32(np.exp(-1.0 / cfg.behaviour_tau_frames))
        self._h = g * self._h + (1 - g) * spikes[self.behaviour_neurons]
        level = float(np.dot(self.behaviour_weights, self._h)) / self._rest
        noise = cfg.behaviour_noise * float(self._rng_beh.standard_normal())
        return max(0.0, level - cfg.behaviour_threshold + noise)
