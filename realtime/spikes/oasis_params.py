"""Per-neuron parameters of streaming OASIS (realtime.spikes.oasis), estimated on warm-up dF/F.

The configuration of the whole method lives here too, so estimation and the compiled kernels share it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

MAD_TO_SIGMA = 1.4826                        # Gaussian sigma / median absolute deviation


@dataclass(frozen=True)
class OasisConfig:
    """Streaming OASIS settings: warm-up, look-back, parameter estimation and the pool ring."""

    warmup: int = 100                # frames used to estimate the per-neuron parameters
    lag: int = 0                     # output at frame t is the estimate for frame t - lag (0: causal)
    tau_decay_s: float = 2.0         # prior decay time, used when a neuron's fit fails or data is short
    fit_decay: bool = True           # False: every neuron uses the prior decay
    g_min: float = 0.05              # fitted g outside [g_min, g_max] falls back to the prior
    g_max: float = 0.98
    g_pool: float = 0.8              # weight of the population median fit in each neuron's g (0: own fit)
    acov_lags: int = 3               # g from autocovariance lags 1 .. acov_lags + 1
    min_fit_frames: int = 20         # fewer frames: prior g for every neuron
    smin_sigma: float = 1.0          # minimum spike size s_min = smin_sigma * sigma (dF/F)
    sigma_floor: float = 1e-4        # sigma of constant traces (dF/F)
    outlier_sigma: float = 2.5       # AR(1) residuals above median + this * sigma are spikes, not noise
    baseline_clip_sigma: float = 1.0  # baseline = median of frames below (baseline + this * sigma)
    max_pools: int = 32              # pools held per neuron; older pools are final

    def __post_init__(self) -> None:
        if self.warmup < 2 or self.lag < 0:
            raise ValueError(f"need warmup >= 2 and lag >= 0, got {self.warmup}, {self.lag}")
        if not self.tau_decay_s > 0:
            raise ValueError(f"tau_decay_s must be > 0, got {self.tau_decay_s}")
        if not 0.0 < self.g_min < self.g_max < 1.0:
            raise ValueError(f"need 0 < g_min < g_max < 1, got {self.g_min}, {self.g_max}")
        if self.acov_lags < 1 or self.min_fit_frames < self.acov_lags + 3:
            raise ValueError(f"need acov_lags >= 1 and min_fit_frames >= acov_lags + 3, "
                             f"got {self.acov_lags}, {self.min_fit_frames}")
        if not 0.0 <= self.g_pool <= 1.0:
            raise ValueError(f"g_pool must be in [0, 1], got {self.g_pool}")
        if self.smin_sigma < 0 or not self.sigma_floor > 0 or min(self.outlier_sigma, self.baseline_clip_sigma) <= 0:
            raise ValueError("need smin_sigma >= 0 and sigma_floor, outlier_sigma, baseline_clip_sigma > 0")
        if self.max_pools < self.lag + 2:
            raise ValueError(f"max_pools must be >= lag + 2 (frames t - lag - 1 .. t stay held), "
                             f"got max_pools={self.max_pools}, lag={self.lag}")


@dataclass(frozen=True)
class OasisParams:
    """Per-neuron AR(1) decay g, noise sigma, baseline and minimum spike size (all (N,) float32, dF/F)."""

    g: np.ndarray
    sigma: np.ndarray
    baseline: np.ndarray
    smin: np.ndarray

    def __post_init__(self) -> None:
        shapes = {np.shape(a) for a in (self.g, self.sigma, self.baseline, self.smin)}
        if len(shapes) != 1 or len(shapes.pop()) != 1:
            raise ValueError("g, sigma, baseline and smin must all have the same shape (N,)")
        if not (np.all(self.g > 0) and np.all(self.g < 1) and np.all(self.smin >= 0)):
            raise ValueError("need 0 < g < 1 and smin >= 0 for every neuron")


def estimate_params(dff: np.ndarray, frame_period_s: float, cfg: OasisConfig) -> tuple[OasisParams, int]:
    """Warm-up dF/F (T, N), finite -> (per-neuron parameters, number of neurons on the prior g).

    g: least-squares AR(1) fit to the autocovariance at lags >= 1 (acov(k+1) = g acov(k); white noise only
    enters lag 0), shrunk by `g_pool` towards the median fit over neurons: on ~100 frames one neuron's fit
    scatters by ~0.1 while the indicator is shared. Fits that fail or leave [g_min, g_max] use the prior.
    sigma: MAD of the AR(1) residual y_t - g y_{t-1} (noise std sigma sqrt(1 + g^2); spikes are positive
    outliers, dropped above median + outlier_sigma * sigma and the MAD retaken). baseline: median of the
    frames below baseline + baseline_clip_sigma * sigma (iterated from the median): the noise floor
    without transients (~0.25 sigma below the mean of pure noise, which OASIS reads as no calcium).
    """
    x = np.asarray(dff)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"dff must be (T, N) with T >= 2 frames, got shape {x.shape}")
    if not frame_period_s > 0:
        raise ValueError(f"frame_period_s must be > 0, got {frame_period_s}")
    xt = np.ascontiguousarray(x.T, dtype=np.float64)        # (N, T): rows sort fast
    g, ok = _decay(xt, frame_period_s, cfg)
    sigma = _noise_sigma(xt, g, cfg.sigma_floor, cfg.outlier_sigma)
    baseline = _baseline(xt, sigma, cfg.baseline_clip_sigma)
    f32 = np.float32
    params = OasisParams(g.astype(f32), sigma.astype(f32), baseline.astype(f32),
                         (cfg.smin_sigma * sigma).astype(f32))
    return params, int(xt.shape[0] - ok.sum())


def _decay(xt: np.ndarray, frame_period_s: float, cfg: OasisConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron g and whether it came from a valid fit (else the prior)."""
    prior = min(max(math.exp(-frame_period_s / cfg.tau_decay_s), cfg.g_min), cfg.g_max)
    g = np.full(xt.shape[0], prior)
    if not cfg.fit_decay or xt.shape[1] < cfg.min_fit_frames:
        return g, np.zeros(xt.shape[0], dtype=bool)
    fit = _fit_decay(xt, cfg.acov_lags)
    ok = np.isfinite(fit) & (fit >= cfg.g_min) & (fit <= cfg.g_max)
    if ok.any():
        g[ok] = (1.0 - cfg.g_pool) * fit[ok] + cfg.g_pool * np.median(fit[ok])
    return g, ok


def _fit_decay(xt: np.ndarray, lags: int) -> np.ndarray:
    """g minimising sum_{k=1..lags} (acov(k+1) - g acov(k))^2 per row of xt (N, T); NaN where undefined.

    Removing the sample mean lowers every acov(k) by about Var(mean) = (noise var + calcium var
    (1 + g) / (1 - g)) / T, which biases g low on short data; two rounds add that estimate back."""
    t = xt.shape[1]
    xc = xt - xt.mean(axis=1, keepdims=True)
    acov = np.stack([np.einsum("nt,nt->n", xc[:, k:], xc[:, :t - k]) / t for k in range(lags + 2)])
    g = _ls_ratio(acov[1:])
    for _ in range(2):
        gc = np.clip(np.nan_to_num(g, nan=0.5), 0.05, 0.95)
        calcium = np.maximum(acov[1], 0.0) / gc
        var_mean = (np.maximum(acov[0] - calcium, 0.0) + calcium * (1 + gc) / (1 - gc)) / t
        g = _ls_ratio(acov[1:] + var_mean)
    return np.where(acov[1] > 0, g, np.nan)


def _ls_ratio(a: np.ndarray) -> np.ndarray:
    """Least-squares g of a[k+1] = g a[k] over the rows of a (K + 1, N); NaN where undefined."""
    num, den = (a[:-1] * a[1:]).sum(axis=0), (a[:-1] ** 2).sum(axis=0)
    out = np.full(a.shape[1], np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _noise_sigma(xt: NDArray[np.float64], g: NDArray[np.float64], floor: float,
                 outlier: float) -> NDArray[np.floating]:
    rs = np.sort((xt[:, 1:] - g[:, None] * xt[:, :-1]).astype(np.float32), axis=1)   # sorted residuals
    med, mad = _center_spread(rs, np.full(rs.shape[0], rs.shape[1]))
    kept = np.maximum((rs <= (med + outlier * mad)[:, None]).sum(axis=1), 1)        # a prefix: no spikes
    mad = _center_spread(rs, kept)[1]
    return np.maximum(mad / np.sqrt(1.0 + g * g), floor)


def _center_spread(rs: NDArray[np.floating],
                   n: NDArray[np.integer]) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """Median and MAD-based sigma of the first n[j] entries of each sorted row j."""
    med = _row_median(rs, n)
    dev = np.where(np.arange(rs.shape[1]) < n[:, None], np.abs(rs - med[:, None]), np.inf)
    return med, MAD_TO_SIGMA * _row_median(np.sort(dev, axis=1), n)


def _baseline(xt: NDArray[np.float64], sigma: NDArray[np.floating], clip: float) -> NDArray[np.floating]:
    xs = np.sort(xt.astype(np.float32), axis=1)
    b = _row_median(xs)
    for _ in range(2):                                   # median of the frames below b + clip * sigma
        b = _row_median(xs, np.maximum((xs <= (b + clip * sigma)[:, None]).sum(axis=1), 1))
    return b


def _row_median(xs: NDArray[np.floating], k: NDArray[np.integer] | None = None) -> NDArray[np.floating]:
    """Median of the first k[j] entries of each sorted row j (all entries when k is None)."""
    k = np.full(xs.shape[0], xs.shape[1]) if k is None else k
    lo = np.take_along_axis(xs, ((k - 1) // 2)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(xs, (k // 2)[:, None], axis=1)[:, 0]
    return 0.5 * (lo + hi)
