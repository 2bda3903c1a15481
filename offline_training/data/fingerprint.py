"""The data fingerprint every trainer records beside its engine: what the model was trained on."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def data_fingerprint(traces: np.ndarray, offsets: Sequence[int]) -> str:
    """sha256 over shape, dtype, condition offsets and the trace bytes."""
    h = hashlib.sha256()
    h.update(f"{traces.shape}|{traces.dtype}|{list(offsets)}".encode())
    h.update(np.ascontiguousarray(traces).data)
    return "sha256:" + h.hexdigest()
