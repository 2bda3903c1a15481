"""ZAPBench splits and windows, on time indices of a (T, N) trace array.

Per condition k the frames are [o_k, o_{k+1}); one padding step is dropped at each end, leaving the
usable span [o_k + 1, o_{k+1} - 1) of length L. In time order it is cut into train, val
(int(0.1 L) steps) and test (int(0.2 L) steps). Ranges returned here are DATA ranges: val and test
start C steps early so that their first window's context lies before their first target, exactly
as in google-research/zapbench. A held-out condition has no train/val; its test range starts
`max_context - C` steps after its first usable step, so every C <= max_context scores the same targets.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ZAPBENCH_OFFSETS: tuple[int, ...] = (0, 649, 2422, 3078, 3735, 5047, 5638, 6623, 7279, 7879)
CONDITION_NAMES: tuple[str, ...] = ("gain", "dots", "flash", "taxis", "turning", "position",
                                    "open loop", "rotation", "dark")
Split = Literal["train", "val", "test"]
Span = tuple[int, int]  # [start, stop) in frames


@dataclass(frozen=True)
class ConditionSplit:
    """One condition's data ranges; `train`/`val` are None for a held-out condition."""

    name: str
    index: int
    train: Span | None
    val: Span | None
    test: Span
    holdout: bool = False

    def span(self, split: Split) -> Span | None:
        """The data range of `split` (None where this condition has none)."""
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def condition_splits(offsets: Sequence[int], context: int, holdout: Sequence[int] = (3,),
                     val_frac: float = 0.1, test_frac: float = 0.2, padding: int = 1,
                     max_context: int = 256, names: Sequence[str] | None = None) -> list[ConditionSplit]:
    """ZAPBench train/val/test data ranges for every condition delimited by `offsets`."""
    offsets = [int(o) for o in offsets]
    if len(offsets) < 2 or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets must be strictly increasing with >= 2 entries, got {offsets}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    n_cond = len(offsets) - 1
    bad = [h for h in holdout if not 0 <= h < n_cond]
    if bad:
        raise ValueError(f"holdout conditions {bad} out of range for {n_cond} conditions")
    if names is None:
        names = CONDITION_NAMES if n_cond == len(CONDITION_NAMES) else [f"condition{k}" for k in range(n_cond)]
    out = []
    for k in range(n_cond):
        start, end = offsets[k] + padding, offsets[k + 1] - padding
        if k in holdout:
            out.append(_holdout_split(names[k], k, start, end, context, max_context))
        else:
            out.append(_standard_split(names[k], k, start, end, context, val_frac, test_frac))
    return out


def _standard_split(name: str, k: int, start: int, end: int, context: int,
                    val_frac: float, test_frac: float) -> ConditionSplit:
    length = max(end - start, 0)
    test_start = end - int(test_frac * length)
    val_start = test_start - int(val_frac * length)
    if val_start - context < start:
        # As in ZAPBench the context is not clamped: it reaches back past the condition's start.
        warnings.warn(f"condition {name}: train part ({val_start - start} steps) is shorter than "
                      f"C={context}; val/test contexts reach into the previous frames", stacklevel=3)
    return ConditionSplit(name=name, index=k, train=(start, val_start),
                          val=(max(val_start - context, 0), test_start),
                          test=(max(test_start - context, 0), end))


def _holdout_split(name: str, k: int, start: int, end: int, context: int,
                   max_context: int) -> ConditionSplit:
    if context > max_context:
        raise ValueError(f"context {context} > max_context {max_context} for held-out scoring")
    return ConditionSplit(name=name, index=k, train=None, val=None,
                          test=(start + max_context - context, end), holdout=True)


def window_starts(rng: Span, context: int, horizon: int, where: str = "") -> np.ndarray:
    """Stride-1 start frames of windows (C context + H targets) lying wholly inside `rng`.

    A range too short for one window yields an empty array and a warning naming it.
    """
    start, stop = rng
    last = stop - (context + horizon)  # last valid start (inclusive)
    if last < start:
        label = f" ({where})" if where else ""
        warnings.warn(f"range [{start}, {stop}){label} is shorter than one window "
                      f"(C={context} + H={horizon}); it yields no windows", stacklevel=2)
        return np.empty(0, dtype=np.int64)
    return np.arange(start, last + 1, dtype=np.int64)


def split_windows(splits: Sequence[ConditionSplit], split: Split, context: int, horizon: int,
                  include_holdout: bool = False) -> dict[int, np.ndarray]:
    """Window starts of `split` per condition index (conditions without that split are skipped)."""
    out: dict[int, np.ndarray] = {}
    for cs in splits:
        span = cs.span(split)
        if span is None or (cs.holdout and not include_holdout):
            continue
        out[cs.index] = window_starts(span, context, horizon, where=f"{cs.name} {split}")
    return out


def gather_windows(traces: np.ndarray, starts: np.ndarray, context: int,
                   horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts (B, C, N) and targets (B, H, N) for window `starts` of traces (T, N)."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context + horizon)[None, :]
    w = traces[idx]  # (B, C + H, N)
    return w[:, :context], w[:, context:]
