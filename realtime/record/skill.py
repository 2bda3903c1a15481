"""Live forecast skill: each forecast of a trace forecast stage scored against the signal that came.

A forecast computed from frame s holds, for each of its lead times h, the prediction of frame s + h. When
frame s + h arrives (or at once, if it already has: a stage served beside the first may publish after later
frames came), that row is scored:

    mae          = mean over the recorded neurons of |forecast[h] - actual(s + h)|
    baseline_mae = the same for the mean-of-context baseline: the mean of the `context` rows up to and
                   including frame s (what the engine saw), held for every lead time

and the rolling figures are the means of the last `window` scores of that lead, in the order they were
scored. A target frame that never arrives (lost upstream, rejected) leaves its rows unscored. Pure logic:
`SkillTracker` sees rows and forecasts, never a clock or a socket; the session recorder feeds it in the
order of its queue, and an offline recomputation from the stored rows in table order gives the same
figures (tests/realtime/test_record.py).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SkillRow:
    """One (forecast, lead) scored."""

    source_seq: int
    target_seq: int
    lead: int
    mae: float
    baseline_mae: float
    rolling_mae: float
    rolling_baseline_mae: float


@dataclass
class _Pending:
    source_seq: int
    lead: int
    prediction: np.ndarray   # (S,)
    baseline: np.ndarray     # (S,)


class SkillTracker:
    """Scores one stage's forecasts (lead times `lead_times`, context `context` rows) per lead."""

    def __init__(self, lead_times: tuple[int, ...], context: int, window: int) -> None:
        if window < 1 or context < 1 or not lead_times or min(lead_times) < 1:
            raise ValueError(f"need window >= 1, context >= 1 and lead times >= 1; got {window}, {context}, "
                             f"{lead_times}")
        self.lead_times = tuple(int(h) for h in lead_times)
        self.context = context
        self.window = window
        self._keep = context + max(self.lead_times) + 64   # rows kept: a late forecast still finds its targets
        self._rows: dict[int, np.ndarray] = {}
        self._order: deque[int] = deque()
        self._pending: dict[int, list[_Pending]] = {}
        self._recent = {h: (deque[float](maxlen=window), deque[float](maxlen=window)) for h in self.lead_times}

    def observe(self, seq: int, actual: np.ndarray) -> list[SkillRow]:
        """A frame's signal (S,) arrived: keep it, score the forecasts that predicted it."""
        self._rows[seq] = actual
        self._order.append(seq)
        while len(self._order) > self._keep:
            self._rows.pop(self._order.popleft(), None)
        for stale in [t for t in self._pending if t < seq]:   # targets that never came
            del self._pending[stale]
        return [self._score(p, seq, actual) for p in self._pending.pop(seq, [])]

    def add(self, source_seq: int, prediction: np.ndarray) -> list[SkillRow]:
        """A forecast (H, S) computed from frame `source_seq`; rows whose target already came are scored now.
        Without the source frame's context rows (none observed yet) nothing is scored."""
        baseline = self.baseline(source_seq)
        if baseline is None:
            return []
        newest = self._order[-1] if self._order else -1
        out: list[SkillRow] = []
        for i, h in enumerate(self.lead_times):
            p = _Pending(source_seq, h, prediction[i], baseline)
            target = source_seq + h
            if target in self._rows:
                out.append(self._score(p, target, self._rows[target]))
            elif target > newest:
                self._pending.setdefault(target, []).append(p)
        return out

    def baseline(self, source_seq: int) -> np.ndarray | None:
        """Mean of the last `context` rows up to and including `source_seq` (float64), or None."""
        seqs = [s for s in self._order if s <= source_seq][-self.context:]
        if not seqs or seqs[-1] != source_seq:
            return None
        out: np.ndarray = np.stack([self._rows[s] for s in seqs]).mean(axis=0, dtype=np.float64)
        return out

    def _score(self, p: _Pending, target: int, actual: np.ndarray) -> SkillRow:
        a = actual.astype(np.float64)
        mae = float(np.mean(np.abs(p.prediction.astype(np.float64) - a)))
        base = float(np.mean(np.abs(p.baseline - a)))
        recent, recent_base = self._recent[p.lead]
        recent.append(mae)
        recent_base.append(base)
        return SkillRow(p.source_seq, target, p.lead, mae, base, math.fsum(recent) / len(recent),
                        math.fsum(recent_base) / len(recent_base))
