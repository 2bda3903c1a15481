"""The live forecast skill, recomputed offline from a session's stored forecasts and dF/F.

For each stored forecast (from frame s) and lead h whose target frame s + h has a stored dF/F row:
MAE over the recorded neurons, and the mean-of-context baseline's (the mean of the `context` stored rows up
to and including frame s). The rolling figures follow the live table's row order (the order the loop
scored them in). Needs a record of every frame (`pipeline.record.frame_every = 1`, the default).
"""
from __future__ import annotations

from collections import deque

import numpy as np

from loopcast.session.data import SessionData, SkillTable


def rescore(data: SessionData, model: str) -> SkillTable:
    """The skill table of `model` recomputed from the stored rows (same rows as the live one)."""
    live = data.skill[model]
    series = next(s for s in data.forecasts.values() if s.kind == "forecast" and s.model == model)
    if data.dff is None or int(data.attrs.get("frame_every", 1)) != 1:
        raise ValueError("rescoring needs the dF/F of every frame (pipeline.record.frame_every = 1)")
    stage = next(st for st in data.attrs["stages"] if st["model"] == model and st["kind"] == "forecast")
    rows = {int(s): i for i, s in enumerate(data.dff.seq)}
    by_source = {int(s): i for i, s in enumerate(series.seq)}
    actual = data.dff.data.astype(np.float64)
    mae, base = np.empty(len(live.lead)), np.empty(len(live.lead))
    for j, (src, tgt, lead) in enumerate(zip(live.source_seq, live.target_seq, live.lead)):
        pred = series.data[by_source[int(src)], series.lead_times.index(int(lead))].astype(np.float64)
        context = [rows[s] for s in sorted(rows) if s <= src][-int(stage["context"]):]
        a = actual[rows[int(tgt)]]
        mae[j] = np.mean(np.abs(pred - a))
        base[j] = np.mean(np.abs(actual[context].mean(axis=0) - a))
    roll, roll_base = _rolling(live.lead, mae, live.window), _rolling(live.lead, base, live.window)
    return SkillTable(model, live.window, live.lead, live.source_seq, live.target_seq, mae.astype(np.float32),
                      base.astype(np.float32), roll.astype(np.float32), roll_base.astype(np.float32))


def _rolling(lead: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """Per row, the mean of the last `window` values of its lead up to it (in row order)."""
    recent: dict[int, deque[float]] = {}
    out = np.empty(len(values))
    for i, (h, v) in enumerate(zip(lead, values)):
        q = recent.setdefault(int(h), deque(maxlen=window))
        q.append(float(v))
        out[i] = np.mean(q)
    return out
