"""Shared scoring helpers: Pearson correlation, per neuron (columns) and of two series."""
from __future__ import annotations

import numpy as np


def column_r(a: np.ndarray, b: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """Pearson r of each column of two (T, N) arrays (per-neuron r over time), (N,) float64; `fill`
    where either column is constant."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    out = np.full(a.shape[1], fill, dtype=np.float64)
    np.divide((a * b).sum(0), den, out=out, where=den > 0)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two series, flattened, in float64 (NaN where either is constant)."""
    return float(column_r(np.asarray(a, np.float64).reshape(-1, 1), np.asarray(b, np.float64).reshape(-1, 1))[0])
