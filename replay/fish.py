"""The synthetic fish: anatomy, stimulus protocol and a frame-by-frame simulated light-sheet rig.

Generative model (per frame t, dt = frame_period_s):
  latent  x_{t} = A x_{t-1} + (I - A) k B u_t + Q (q * eps) + opto spread    (E ensembles, stable, oscillatory)
  log-rate_i = log base_i + w_i (latent_gain x_e(i) + stim_gain (B u_t)_e(i)) + eta_i   (eta: private AR(1))
  rate_i *= 1 + opto_gain * gain while neuron i is optogenetically driven; capped at max_rate_hz
  spikes ~ Poisson(rate dt);  calcium c_t = gamma c_{t-1} + spikes,  gamma = exp(-dt / tau_decay_s)
  F_i = baseline_i * drift_i(t) * (1 + dff_per_spike * c_i)
  voxel = offset + neuropil (modulated by global activity) or F_i * nuclear profile; + shot + read noise -> uint16
Everything is drawn from `seed`: equal configs and equal inputs give equal frames, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import expm
from scipy.spatial import cKDTree

ZAPBENCH_CONDITION_OFFSETS: tuple[int, ...] = (0, 649, 2422, 3078, 3735, 5047, 5638, 6623, 7279, 7879)
CONDITION_NAMES: tuple[str, ...] = ("gain", "dots", "flash", "taxis", "turning", "position", "open loop",
                                    "rotation", "dark")
FRAME_PERIOD_S = 0.9141
N_COVARIATES = 26
# Covariate columns each condition drives; 24 (ambient luminance) and 25 (trial onset) are shared by all.
CONDITION_COVARIATES: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (3, 4, 5), (6, 7), (8, 9, 10), (11, 12, 13), (14, 15, 16), (17, 18, 19), (20, 21, 22), (23,))
# Brain as a union of ellipsoids in unit grid coordinates: cx, cy, cz, rx, ry, rz
# (telencephalon, two optic tecta, cerebellum/midbrain, hindbrain; x is rostro-caudal).
BRAIN_ELLIPSOIDS = np.array([
    (0.14, 0.50, 0.50, 0.13, 0.26, 0.48),
    (0.36, 0.30, 0.52, 0.19, 0.25, 0.48),
    (0.36, 0.70, 0.52, 0.19, 0.25, 0.48),
    (0.56, 0.50, 0.50, 0.14, 0.34, 0.48),
    (0.79, 0.50, 0.48, 0.21, 0.24, 0.48)])


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
    latent_gain: float = 1.0                  # log-rate per unit latent
    latent_decay: tuple[float, float] = (0.85, 0.97)           # eigenvalue moduli of A
    latent_period_frames: tuple[float, float] = (12.0, 80.0)   # oscillation periods of A
    coupling: float = 0.5                     # 0: ensemble pairs only; larger mixes all ensembles
    stim_driven_fraction: float = 0.6         # share of ensembles that receive covariate input
    stim_gain: float = 1.0                    # direct (fast) log-rate response to covariates
    stim_to_latent: float = 0.5               # steady-state latent response to covariates
    private_noise: float = 0.3                # per-neuron AR(1) log-rate noise std
    # calcium indicator and fluorescence
    tau_decay_s: float = 2.0
    dff_per_spike: float = 0.15
    baseline_range: tuple[float, float] = (200.0, 800.0)   # per-neuron resting F (counts)
    drift_amplitude: float = 0.03             # slow sinusoidal baseline drift (fraction)
    drift_period_frames: tuple[float, float] = (400.0, 3000.0)
    # optics and camera
    background_counts: float = 100.0          # camera offset
    neuropil_counts: float = 60.0             # unsegmented tissue inside the brain
    neuropil_coupling: float = 1.0            # neuropil gain per unit of mean dF/F
    shot_noise_gain: float = 1.0              # variance per count above offset (1 = Poisson)
    read_noise: float = 3.0                   # Gaussian read noise std (counts)
    # optogenetics
    opto_gain: float = 20.0                   # rate multiplier - 1 at gain 1
    opto_latency_frames: int = 1              # frames between stimulate() and the first driven frame
    opto_network_coupling: float = 0.3        # latent kick per fraction of an ensemble stimulated

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 2:
            raise ValueError(f"shape must be 3 sizes >= 2 (x, y, z), got {self.shape}")
        if self.n_neurons < 1 or not 1 <= self.n_ensembles <= self.n_neurons:
            raise ValueError(f"need n_neurons >= 1 and 1 <= n_ensembles <= n_neurons, "
                             f"got {self.n_neurons}, {self.n_ensembles}")
        _positive(self, "frame_period_s", "base_rate_hz", "max_rate_hz", "tau_decay_s", "min_spacing")
        _nonnegative(self, "rate_spread", "latent_std", "latent_gain", "coupling", "stim_gain", "stim_to_latent",
                     "private_noise", "dff_per_spike", "drift_amplitude", "background_counts", "neuropil_counts",
                     "neuropil_coupling", "shot_noise_gain", "read_noise", "opto_gain", "opto_latency_frames",
                     "opto_network_coupling")
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


def _positive(cfg: FishConfig, *names: str) -> None:
    for n in names:
        if not getattr(cfg, n) > 0:
            raise ValueError(f"{n} must be > 0, got {getattr(cfg, n)}")


def _nonnegative(cfg: FishConfig, *names: str) -> None:
    for n in names:
        if not getattr(cfg, n) >= 0:
            raise ValueError(f"{n} must be >= 0, got {getattr(cfg, n)}")


@dataclass(frozen=True)
class Anatomy:
    """Where the neurons are: centroids, label volume and functional ensemble of each neuron."""

    positions: np.ndarray     # (N, 3) float32 voxel centroids x, y, z
    segmentation: np.ndarray  # (x, y, z) uint32, 0 = background, label i+1 = neuron i
    ensemble: np.ndarray      # (N,) int32 ensemble id per neuron (spatially clustered)


@dataclass(frozen=True)
class FishFrame:
    """One simulated frame: the raw volume and the ground truth behind it."""

    volume: np.ndarray        # (x, y, z) uint16, C-contiguous
    spikes: np.ndarray        # (N,) float32 spike counts this frame
    calcium: np.ndarray       # (N,) float32
    fluorescence: np.ndarray  # (N,) float32 noiseless per-neuron F (nucleus-centre brightness)
    stimulated: np.ndarray    # (N,) bool: under optogenetic drive this frame


@dataclass(frozen=True)
class Schedule:
    """The stimulus protocol: covariates and condition per frame, ZAPBench-like condition blocks."""

    covariates: np.ndarray    # (T, 26) float32
    condition: np.ndarray     # (T,) int32 condition index 0..8
    offsets: tuple[int, ...]  # 10 condition offsets, ZAPBench's CONDITION_OFFSETS scaled to T


def condition_offsets(n_frames: int) -> tuple[int, ...]:
    """ZAPBench's condition offsets scaled to n_frames (each condition keeps >= 1 frame)."""
    offs = tuple(int(round(o * n_frames / ZAPBENCH_CONDITION_OFFSETS[-1])) for o in ZAPBENCH_CONDITION_OFFSETS)
    if any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"n_frames={n_frames} is too short: each of the 9 conditions needs >= 1 frame")
    return offs


def stimulus_schedule(cfg: FishConfig, n_frames: int) -> Schedule:
    """Covariates per frame: each condition drives its own columns with trial-structured waveforms."""
    offs = condition_offsets(n_frames)
    rng = np.random.default_rng([cfg.seed, 0x5715])
    cov = np.zeros((n_frames, N_COVARIATES), np.float32)
    cond = np.zeros(n_frames, np.int32)
    for c, cols in enumerate(CONDITION_COVARIATES):
        a, b = offs[c], offs[c + 1]
        cond[a:b] = c
        tl = np.arange(b - a)
        trial = int(rng.integers(10, 31))                    # trial period, frames
        for k, j in enumerate(cols):
            period = trial * int(rng.integers(1, 3))
            if k % 3 == 0:                                   # pulse train (stimulus on / off)
                cov[a:b, j] = (tl % period) < rng.uniform(0.3, 0.6) * period
            elif k % 3 == 1:                                 # smooth modulation (speed, contrast)
                cov[a:b, j] = 0.5 + 0.5 * np.sin(2 * np.pi * tl / period + rng.uniform(0, 2 * np.pi))
            else:                                            # direction held per trial: -1, 0, 1
                levels = rng.integers(-1, 2, size=(b - a) // period + 1)
                cov[a:b, j] = levels[tl // period]
        cov[a:b, 24] = 0.0 if CONDITION_NAMES[c] == "dark" else rng.uniform(0.3, 1.0)   # ambient luminance
        cov[a:b, 25] = (tl % trial) == 0                     # trial onset
    return Schedule(cov, cond, offs)


def brain_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """(x, y, z) bool: voxels inside the brain-shaped union of ellipsoids (built one z slice at a time)."""
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n for n in shape]
    mask = np.zeros(shape, bool)
    for e in BRAIN_ELLIPSOIDS:
        dx = ((axes[0] - e[0]) / e[3]) ** 2
        dy = ((axes[1] - e[1]) / e[4]) ** 2
        dxy = dx[:, None] + dy[None, :]                      # (x, y)
        for z, az in enumerate(axes[2]):
            mask[:, :, z] |= dxy + ((az - e[2]) / e[5]) ** 2 <= 1.0
    return mask


def _inside_brain(u: np.ndarray) -> np.ndarray:
    """u: (M, 3) unit grid coordinates -> (M,) bool."""
    d = (((u[:, None, :] - BRAIN_ELLIPSOIDS[:, :3]) / BRAIN_ELLIPSOIDS[:, 3:]) ** 2).sum(-1)
    return (d <= 1.0).any(axis=1)


def _place_centres(cfg: FishConfig, n_brain_vox: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) int64 nucleus centres: a jittered lattice inside the brain with a minimum spacing."""
    r = np.asarray(cfg.nucleus_radius_vox)
    shape = np.asarray(cfg.shape)
    k = (n_brain_vox / np.prod(r) / (1.3 * cfg.n_neurons)) ** (1 / 3)   # lattice step in radii
    for _ in range(60):
        step = k * r
        grids = [np.arange(step[a] / 2, shape[a], step[a]) for a in range(3)]
        pts = np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, 3)
        pts = np.rint(pts + rng.uniform(-0.15, 0.15, pts.shape) * step)
        pts = np.clip(pts, 0, shape - 1)
        pts = pts[_inside_brain((pts + 0.5) / shape)]
        close = cKDTree(pts / r).query_pairs(cfg.min_spacing, output_type="ndarray")
        pts = np.delete(pts, np.unique(close[:, 1]), axis=0) if len(close) else pts
        if len(pts) >= cfg.n_neurons:
            return pts[np.sort(rng.choice(len(pts), cfg.n_neurons, replace=False))].astype(np.int64)
        k *= 0.96
        if k * 0.7 < cfg.min_spacing:
            break
    raise ValueError(f"cannot place {cfg.n_neurons} neurons {cfg.min_spacing} nucleus radii apart in a "
                     f"{cfg.shape} grid: lower n_neurons, min_spacing or nucleus_radius_vox, or grow shape")


def _blob_offsets(radius: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets (B, 3) inside the nucleus ellipsoid and their normalised squared distance (B,)."""
    r = np.asarray(radius)
    span = [np.arange(-int(np.floor(ri)), int(np.floor(ri)) + 1) for ri in r]
    off = np.stack(np.meshgrid(*span, indexing="ij"), -1).reshape(-1, 3)
    d2 = ((off / r) ** 2).sum(1)
    return off[d2 <= 1.0], d2[d2 <= 1.0]


def _kmeans(pts: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Lloyd's algorithm on (N, 3) points -> (N,) int32 cluster ids, every cluster non-empty."""
    centres = pts[rng.choice(len(pts), k, replace=False)]
    for _ in range(iters):
        d = ((pts[:, None, :] - centres[None]) ** 2).sum(-1)     # (N, k)
        lab = d.argmin(1)
        counts = np.bincount(lab, minlength=k)
        for c in np.flatnonzero(counts == 0):                     # reseed empty clusters (rare)
            far = int(d.min(1).argmax())
            centres[c], lab[far] = pts[far], c
        counts = np.bincount(lab, minlength=k)
        centres = np.stack([np.bincount(lab, pts[:, a], k) / counts for a in range(3)], 1)
    return lab.astype(np.int32)


@dataclass(frozen=True)
class _Render:
    nuc_idx: np.ndarray      # (M,) int64 flat voxel index of each segmented voxel
    nuc_lab: np.ndarray      # (M,) int64 0-based neuron id of that voxel
    nuc_w: np.ndarray        # (M,) float32 nuclear brightness profile (1 at the centre)
    neuropil: np.ndarray     # (X*Y*Z,) float32 neuropil counts (0 outside brain and in nuclei)


def build_anatomy(cfg: FishConfig, rng: np.random.Generator) -> tuple[Anatomy, _Render]:
    """Place neurons, draw nuclei into a label volume, cluster ensembles, precompute rendering indices."""
    shape = np.asarray(cfg.shape)
    mask = brain_mask(cfg.shape)
    centres = _place_centres(cfg, int(mask.sum()), rng)                  # (N, 3)
    off, d2 = _blob_offsets(cfg.nucleus_radius_vox)                      # (B, 3), (B,)
    vox = (centres[:, None, :] + off[None]).reshape(-1, 3)               # (N*B, 3)
    lab = np.repeat(np.arange(cfg.n_neurons), len(off))
    dist = np.tile(d2, cfg.n_neurons)
    ok = ((vox >= 0) & (vox < shape)).all(1)
    flat = np.ravel_multi_index(tuple(vox[ok].T), cfg.shape)
    lab, dist = lab[ok], dist[ok]
    order = np.lexsort((dist, flat))                                     # nearest centre wins a shared voxel
    _, first = np.unique(flat[order], return_index=True)
    win = order[first]
    flat, lab, dist = flat[win], lab[win], dist[win]
    seg = np.zeros(int(np.prod(shape)), np.uint32)
    seg[flat] = lab + 1
    counts = np.bincount(lab, minlength=cfg.n_neurons)
    coords = np.stack(np.unravel_index(flat, cfg.shape), 1).astype(np.float64)
    positions = np.stack([np.bincount(lab, coords[:, a], cfg.n_neurons) / counts for a in range(3)], 1)
    ensemble = _kmeans(positions / np.asarray(cfg.nucleus_radius_vox), cfg.n_ensembles, rng)
    neuropil = _neuropil(cfg, mask, rng).reshape(-1)
    neuropil[flat] = 0.0
    anatomy = Anatomy(positions.astype(np.float32), seg.reshape(cfg.shape), ensemble)
    return anatomy, _Render(flat, lab, (1.0 - 0.3 * dist).astype(np.float32), neuropil)


def _neuropil(cfg: FishConfig, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(x, y, z) float32 neuropil counts: brain mask times a low-frequency field in about [0.6, 1.4]."""
    ax = [np.cos(2 * np.pi * (np.arange(n) / n * rng.uniform(0.5, 1.5) + rng.uniform())).astype(np.float32)
          for n in cfg.shape]
    fxy = (1.0 + 0.2 * ax[0][:, None] + 0.15 * ax[1][None, :]) * np.float32(cfg.neuropil_counts)   # (x, y)
    out = np.empty(cfg.shape, np.float32)
    for z in range(cfg.shape[2]):                        # one slice at a time keeps memory at one volume
        out[:, :, z] = (fxy + np.float32(0.05 * cfg.neuropil_counts) * ax[2][z]) * mask[:, :, z]
    return out


def _latent_dynamics(cfg: FishConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A = Q L Q^T (L: damped rotations, Q = expm(coupling * skew)) -> (A (E, E), Q (E, E), noise std q (E,))."""
    e = cfg.n_ensembles
    lam, q = np.zeros((e, e)), np.zeros(e)
    for b in range(0, e, 2):                     # construction only: one block per ensemble pair
        r = rng.uniform(*cfg.latent_decay)
        q[b:b + 2] = cfg.latent_std * np.sqrt(1.0 - r * r)   # stationary std = latent_std
        if b + 1 == e:
            lam[b, b] = r
            continue
        th = 2 * np.pi / rng.uniform(*cfg.latent_period_frames)
        lam[b:b + 2, b:b + 2] = r * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    skew = rng.standard_normal((e, e))
    qmat = expm(cfg.coupling * (skew - skew.T) / (2 * np.sqrt(e)))   # orthogonal mixing
    return qmat @ lam @ qmat.T, qmat, q


def _stimulus_input(cfg: FishConfig, rng: np.random.Generator) -> np.ndarray:
    """(E, 26) covariate -> ensemble weights: each covariate drives 1-2 of the stimulus-driven ensembles."""
    e = cfg.n_ensembles
    b = np.zeros((e, N_COVARIATES))
    driven = rng.permutation(e)[:int(round(e * cfg.stim_driven_fraction))]
    if len(driven) == 0:
        return b
    for j in range(N_COVARIATES):
        tgt = rng.choice(driven, size=min(len(driven), int(rng.integers(1, 3))), replace=False)
        b[tgt, j] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
    return b


class FishModel:
    """A simulated fish under a light-sheet microscope, advanced one frame per `step()`."""

    def __init__(self, cfg: FishConfig) -> None:
        self.cfg = cfg
        s_anat, s_dyn, s_lat, s_spk, s_noise = np.random.SeedSequence(cfg.seed).spawn(5)
        self.anatomy, self._render = build_anatomy(cfg, np.random.default_rng(s_anat))
        rng = np.random.default_rng(s_dyn)
        self._a, self._q, self._qstd = _latent_dynamics(cfg, rng)
        self._b = _stimulus_input(cfg, rng)
        n, dt = cfg.n_neurons, cfg.frame_period_s
        self._log_base = (np.log(cfg.base_rate_hz) + cfg.rate_spread * rng.standard_normal(n)).astype(np.float32)
        self._w = rng.uniform(0.3, 1.3, n).astype(np.float32)
        self._baseline = rng.uniform(*cfg.baseline_range, n).astype(np.float32)
        self._drift_omega = (2 * np.pi / rng.uniform(*cfg.drift_period_frames, n)).astype(np.float32)
        self._drift_phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        self._ens = self.anatomy.ensemble.astype(np.int64)
        self._ens_size = np.bincount(self._ens, minlength=cfg.n_ensembles).astype(np.float64)
        self._gamma = np.float32(np.exp(-dt / cfg.tau_decay_s))
        self._rng_lat = np.random.default_rng(s_lat)
        self._rng_spk = np.random.default_rng(s_spk)
        self._rng_noise = np.random.default_rng(s_noise)
        self._x = self._q @ (cfg.latent_std * self._rng_lat.standard_normal(cfg.n_ensembles))  # stationary
        self._eta = (cfg.private_noise * self._rng_lat.standard_normal(n)).astype(np.float32)
        self._calcium = (np.exp(self._log_base) * dt / (1 - self._gamma)).astype(np.float32)
        self._pulses: list[tuple[int, int, np.ndarray, float]] = []   # (start, stop, targets, gain)
        self._mean = np.empty(int(np.prod(cfg.shape)), np.float32)   # scratch buffers, (X*Y*Z,)
        self._tmp = np.empty_like(self._mean)
        self.t = 0                                                   # frames produced so far

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

    def step(self, covariates: np.ndarray) -> FishFrame:
        """Advance one frame under `covariates` (26,) and return the rendered volume and ground truth."""
        cfg = self.cfg
        u = np.asarray(covariates, dtype=np.float64).reshape(-1)
        if u.shape != (N_COVARIATES,):
            raise ValueError(f"covariates must have shape ({N_COVARIATES},), got {np.shape(covariates)}")
        drive = self._b @ u                                                  # (E,)
        opto, stimulated = self._opto(self.t)
        kick = np.bincount(self._ens, weights=opto, minlength=cfg.n_ensembles) / self._ens_size
        self._x = (self._a @ self._x + (np.eye(cfg.n_ensembles) - self._a) @ (cfg.stim_to_latent * drive)
                   + self._q @ (self._qstd * self._rng_lat.standard_normal(cfg.n_ensembles))
                   + cfg.opto_network_coupling * kick)
        rho = np.float32(0.9)
        self._eta = rho * self._eta + np.float32(cfg.private_noise * np.sqrt(1 - rho * rho)) * \
            self._rng_lat.standard_normal(cfg.n_neurons, dtype=np.float32)
        ens_drive = (cfg.latent_gain * self._x + cfg.stim_gain * drive).astype(np.float32)   # (E,)
        rate = np.exp(self._log_base + self._w * ens_drive[self._ens] + self._eta)         # (N,) Hz
        rate *= 1.0 + np.float32(cfg.opto_gain) * opto
        np.minimum(rate, np.float32(cfg.max_rate_hz), out=rate)
        spikes = self._rng_spk.poisson(rate * cfg.frame_period_s).astype(np.float32)
        self._calcium = self._gamma * self._calcium + spikes
        drift = 1.0 + np.float32(cfg.drift_amplitude) * np.sin(self._drift_omega * self.t + self._drift_phase)
        dff = np.float32(cfg.dff_per_spike) * self._calcium
        fluor = self._baseline * drift * (1.0 + dff)
        volume = self._render_volume(fluor, float(dff.mean()))
        self.t += 1
        return FishFrame(volume, spikes, self._calcium.copy(), fluor.astype(np.float32), stimulated)

    def _render_volume(self, fluor: np.ndarray, mean_dff: float) -> np.ndarray:
        """Per-neuron F (N,) -> noisy (x, y, z) uint16 volume."""
        cfg, r = self.cfg, self._render
        mean, tmp = self._mean, self._tmp
        np.multiply(r.neuropil, np.float32(1.0 + cfg.neuropil_coupling * mean_dff), out=mean)
        mean[r.nuc_idx] = fluor[r.nuc_lab] * r.nuc_w                          # signal above offset
        np.multiply(mean, np.float32(cfg.shot_noise_gain), out=tmp)           # shot variance
        tmp += np.float32(cfg.read_noise ** 2)
        np.sqrt(tmp, out=tmp)
        tmp *= self._rng_noise.standard_normal(tmp.shape, dtype=np.float32)
        mean += tmp
        mean += np.float32(cfg.background_counts + 0.5)                       # offset, + 0.5 rounds
        np.clip(mean, 0.0, 65535.0, out=mean)
        return mean.astype(np.uint16).reshape(cfg.shape)
