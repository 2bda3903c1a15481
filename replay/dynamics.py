"""Building blocks of the fish's dynamics: coupled ensemble oscillators, stimulus input, calcium kernel,
behaviour readout weights. Construction only; FishModel (replay/fish.py) runs them frame by frame.

Latent state: one damped oscillator (x_e, y_e) per ensemble e (modulus r_e, period P_e frames), the x parts
coupled through W: near-neighbour links exp(-d_ej / (coupling_length * d_nn)) (d: centroid distance,
d_nn: median nearest-neighbour distance; rows normalised to sum 1) plus a few long-range links of weight
+-long_range_strength, all times `coupling`. If the coupled matrix would have a spectral radius above
latent_decay[1] (< 1), W is shrunk by bisection until it does not: the dynamics are stable and, with
complex eigenvalues, oscillatory. The state is rescaled so every ensemble latent has stationary std
latent_std (a similarity transform: eigenvalues unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cholesky, solve_discrete_lyapunov
from scipy.spatial import cKDTree

from loopcast.replay.protocol import N_COVARIATES


@dataclass(frozen=True)
class Latent:
    """Linear-Gaussian latent dynamics z_t = a z_{t-1} + noise * eps, x_e = z[2e]."""

    a: np.ndarray          # (2E, 2E) float64 dynamics matrix, spectral radius < 1
    noise: np.ndarray      # (2E,) float64 innovation std per state
    chol: np.ndarray       # (2E, 2E) lower Cholesky factor of the stationary covariance
    coupling: np.ndarray   # (E, E) float64 effective x_j -> x_e weights (zero diagonal)


def ensemble_coupling(centroids: np.ndarray, strength: float, length: float, long_links: float,
                      long_strength: float, rng: np.random.Generator) -> np.ndarray:
    """(E, 3) ensemble centroids -> (E, E) coupling weights W[e, j] (j drives e), zero diagonal."""
    e = len(centroids)
    if e < 2 or strength == 0:
        return np.zeros((e, e))
    d = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)       # (E, E)
    dnn = float(np.median(cKDTree(centroids).query(centroids, k=2)[0][:, 1])) or 1.0
    near = np.exp(-d / (length * dnn))
    np.fill_diagonal(near, 0.0)
    near /= near.sum(1, keepdims=True)
    far_i, far_j = np.nonzero(d > np.median(d[~np.eye(e, dtype=bool)]))    # the farther half of pairs
    n_long = min(len(far_i), int(round(long_links * e)))
    pick = rng.choice(len(far_i), n_long, replace=False)
    longw = np.zeros((e, e))
    longw[far_i[pick], far_j[pick]] = long_strength * rng.choice([-1.0, 1.0], n_long)
    return strength * (near + longw)


def _oscillators(e: int, decay: tuple[float, float], periods: tuple[float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """(2E, 2E) block diagonal of damped rotations, one per ensemble."""
    lam = np.zeros((2 * e, 2 * e))
    for k in range(e):
        r, th = rng.uniform(*decay), 2 * np.pi / rng.uniform(*periods)
        lam[2 * k:2 * k + 2, 2 * k:2 * k + 2] = r * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return lam


def _radius(a: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(a)).max())


def latent_dynamics(w: np.ndarray, decay: tuple[float, float], periods: tuple[float, float], latent_std: float,
                    rng: np.random.Generator) -> Latent:
    """Coupled oscillators: s * oscillators + coupling w (E, E), with the oscillators damped by s <= 1 (and, if
    w alone were too strong, w shrunk to radius decay[1] / 2 first) so that the spectral radius <= decay[1]."""
    e = len(w)
    lam = _oscillators(e, decay, periods, rng)
    full = np.zeros_like(lam)
    full[0::2, 0::2] = w                                                   # x_j -> x_e
    if e > 1 and _radius(full) > decay[1] / 2:
        full *= decay[1] / 2 / _radius(full)
    s = 1.0
    if _radius(lam + full) > decay[1]:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _radius(mid * lam + full) <= decay[1] else (lo, mid)
        s = lo
    a = s * lam + full
    p = solve_discrete_lyapunov(a, np.eye(2 * e))                          # stationary cov, unit noise
    d = np.sqrt(np.diag(p))                                                # (2E,)
    a = a * d[None, :] / d[:, None]                                        # D^-1 A D
    cov = latent_std ** 2 * p / np.outer(d, d)
    chol = cholesky(cov + 1e-12 * np.eye(2 * e), lower=True)
    coupling = a[0::2, 0::2] * (1.0 - np.eye(e))
    return Latent(a, latent_std / d, chol, coupling)


def stimulus_input(e: int, driven_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(E, 26) covariate -> ensemble weights: each covariate drives 1-2 of the stimulus-driven ensembles."""
    b = np.zeros((e, N_COVARIATES))
    driven = rng.permutation(e)[:int(round(e * driven_fraction))]
    if len(driven) == 0:
        return b
    for j in range(N_COVARIATES):
        tgt = rng.choice(driven, size=min(len(driven), int(rng.integers(1, 3))), replace=False)
        b[tgt, j] = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.8)
    return b


@dataclass(frozen=True)
class CalciumKernel:
    """Double-exponential indicator kernel as two AR(1) states, sampled mid-frame after the spike:

    k(t) = norm * (exp(-(t + 1/2) dt / tau_decay) - exp(-(t + 1/2) dt / tau_rise)),  t = 0, 1, ... frames,
    norm such that max_t k(t) = 1 (one isolated spike peaks at calcium 1, i.e. dF/F = dff_per_spike).
    """

    g_decay: float
    g_rise: float
    a_decay: float            # exp(-dt / 2 tau_decay): a spike's first-frame weight
    a_rise: float
    norm: float

    @classmethod
    def build(cls, dt: float, tau_rise: float, tau_decay: float) -> CalciumKernel:
        t = np.arange(int(np.ceil(20 * tau_decay / dt)) + 2) + 0.5
        k = np.exp(-t * dt / tau_decay) - np.exp(-t * dt / tau_rise)
        return cls(float(np.exp(-dt / tau_decay)), float(np.exp(-dt / tau_rise)),
                   float(np.exp(-0.5 * dt / tau_decay)), float(np.exp(-0.5 * dt / tau_rise)), float(1.0 / k.max()))

    def stationary(self, spikes_per_frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean (decay, rise) states at a constant spike rate."""
        lam = spikes_per_frame.astype(np.float32)
        return (lam * np.float32(self.a_decay / (1 - self.g_decay)),
                lam * np.float32(self.a_rise / (1 - self.g_rise)))


def behaviour_drivers(ensemble: np.ndarray, ensembles: tuple[int, ...], fraction: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Driver neurons (a random `fraction` of the members of `ensembles`, >= 1 each) and their positive
    weights summing to 1 -> ((K,) int64 sorted ids, (K,) float32 weights)."""
    ids = []
    for e in ensembles:
        members = np.flatnonzero(ensemble == e)
        k = max(1, int(round(fraction * len(members))))
        ids.append(rng.choice(members, k, replace=False))
    drivers = np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    w = rng.lognormal(0.0, 0.5, len(drivers))
    return drivers.astype(np.int64), (w / max(w.sum(), 1e-12)).astype(np.float32)
