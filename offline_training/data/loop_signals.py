"""What the live pipeline computes per neuron, recomputed offline over a whole recording.

Models that the loop feeds with its own causal signals must be trained on those signals, not on the
recording's centred (ZAPBench) dF/F: `loop_dff` is the pipeline's causal dF/F of the raw segment means
(realtime.preprocess.dff, bit-equal to CausalDff row by row) and `loop_spike_probs` runs the pipeline's spike
estimator (realtime.spikes, streaming OASIS by default) over it frame by frame, giving the probability of
at least one spike per frame that the Sparse Brain Model consumes. Both are cached beside a local
recording (`<root>/loop_signals/`), keyed by a hash of the settings that produced them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from loopcast.config import to_dict
from loopcast.realtime.preprocess.dff import DffConfig, causal_dff
from loopcast.realtime.preprocess.stage import PreprocessConfig
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.spikes.stage import make_spike_estimator
from loopcast.replay.layout import Recording, RecordingError
from loopcast.replay.store import is_remote

log = logging.getLogger(__name__)
CACHE_DIR = "loop_signals"


def loop_dff(rec: Recording, dff: DffConfig = DffConfig(), progress: bool = False) -> np.ndarray:
    """(T, N) float32: the pipeline's causal dF/F of the recording's raw segment means (stored as
    `traces_raw`, or extracted from the `raw` volumes as the pipeline does). A recording with neither
    falls back to its own stored dF/F, with a warning."""
    if not (rec.has("traces_raw") or rec.has("raw")):
        log.warning("%s has no raw traces or volumes: using its stored (centred) dF/F, which the live loop "
                    "never sees", rec.root)
        return rec.traces()
    key = _digest("dff", to_dict(dff))
    return _cached(rec, f"causal_dff-{key}", lambda: causal_dff(segment_means(rec, progress), dff))


def segment_means(rec: Recording, progress: bool = False) -> np.ndarray:
    """(T, N) float32 raw segment means: `traces_raw` if stored, else `extract_segment_means` (cached)."""
    if rec.has("traces_raw"):
        return rec.raw_traces()
    return _cached(rec, "segment_means", lambda: extract_segment_means(rec, progress))


def extract_segment_means(rec: Recording, progress: bool = False) -> np.ndarray:
    """(T, N) float32: the pipeline's trace extraction (realtime.preprocess.traces) over every raw volume."""
    extractor = TraceExtractor(rec.segmentation())
    out = np.empty((rec.n_frames, extractor.n_neurons), np.float32)
    frames = rec.volume("raw").stream(range(rec.n_frames))
    for t, vol in tqdm(frames, total=rec.n_frames, desc="segment means", unit="frame", leave=False,
                       disable=not progress):
        out[t] = extractor.process(vol)
    return out


def loop_spike_probs(rec: Recording, pre: PreprocessConfig = PreprocessConfig(),
                     progress: bool = False) -> np.ndarray:
    """(T, N) float32 in [0, 1]: the pipeline's causal spike probability per frame (zeros in warm-up)."""
    spikes = {k: v for k, v in to_dict(pre.spikes).items() if k != "fit_in_background"}   # inline here
    key = _digest("spikes", {"dff": to_dict(pre.dff), "spikes": spikes,
                             "period": rec.frame_period_s})
    return _cached(rec, f"spike_prob-{key}",
                   lambda: spike_probs(loop_dff(rec, pre.dff, progress), pre, rec.frame_period_s, progress))


def spike_probs(dff: np.ndarray, pre: PreprocessConfig, frame_period_s: float,
                progress: bool = False) -> np.ndarray:
    """dF/F (T, N) -> the configured causal spike estimator's probabilities (T, N), frame by frame. The
    OASIS fit runs inline here, so the result is reproducible: the live loop fits in the background and
    reports zeros for the frame or two that come during the fit, where this has their values."""
    if dff.ndim != 2:
        raise ValueError(f"expected dF/F of shape (T, N), got {dff.shape}")
    inline = dataclasses.replace(pre.spikes, fit_in_background=False)
    estimator = make_spike_estimator(dff.shape[1], inline, frame_period_s)
    out = np.empty(dff.shape, dtype=np.float32)
    for t in tqdm(range(dff.shape[0]), desc="causal spikes", unit="frame", leave=False, disable=not progress):
        out[t] = estimator.process(np.ascontiguousarray(dff[t])).prob
    return out


def _digest(kind: str, settings: dict) -> str:
    blob = json.dumps({"kind": kind, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _cached(rec: Recording, name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    """`make()` once per recording and settings: stored as <root>/loop_signals/<name>.npy (local only)."""
    if is_remote(rec.root):
        return np.asarray(make(), dtype=np.float32)
    path = Path(rec.root) / CACHE_DIR / f"{name}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            log.warning("%s is unreadable: computing it again", path)
    arr = np.asarray(make(), dtype=np.float32)
    if arr.shape != (rec.n_frames, rec.n_neurons):
        raise RecordingError(f"{rec.root}: {name} has shape {arr.shape}, expected "
                             f"({rec.n_frames}, {rec.n_neurons})")
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr
