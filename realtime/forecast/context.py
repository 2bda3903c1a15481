"""Context ring buffer: the last C frames of per-neuron values, read as one contiguous (C, N) window."""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike


class ContextBuffer:
    """Fixed-size history; every row is written twice so a window is a slice, never a copy."""

    def __init__(self, context: int, n: int, dtype: DTypeLike = np.float32) -> None:
        if context < 1 or n < 1:
            raise ValueError("context and n must be >= 1")
        self.context = context
        self.n = n
        self._buf = np.zeros((2 * context, n), dtype=dtype)
        self._next = 0
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.context

    def push(self, row: np.ndarray) -> None:
        """row (N,) -> appended as the newest time step."""
        if row.shape != (self.n,):
            raise ValueError(f"expected a row of shape ({self.n},), got {row.shape}")
        self._buf[self._next] = row
        self._buf[self._next + self.context] = row
        self._next = (self._next + 1) % self.context
        self.count += 1

    def window(self) -> np.ndarray:
        """(C, N) oldest -> newest; a view valid until the next push."""
        if not self.full:
            raise RuntimeError(f"context holds {self.count} of {self.context} frames")
        return self._buf[self._next:self._next + self.context]
