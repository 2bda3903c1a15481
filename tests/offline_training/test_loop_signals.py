"""The offline recomputation of the pipeline's signals equals what the live Preprocess stage computes."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from loopcast.offline_training.data.loop_signals import CACHE_DIR, extract_segment_means, loop_dff, loop_spike_probs
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.realtime.preprocess.stage import Preprocess, PreprocessConfig
from loopcast.realtime.spikes.oasis import OasisConfig
from loopcast.realtime.spikes.stage import SpikeConfig
from loopcast.realtime.wire.codec import Frame, FrameHeader
from loopcast.replay.fish import FishConfig
from loopcast.replay.layout import Recording
from loopcast.replay.synth import SynthConfig, synthesize

PRE = PreprocessConfig(dff=DffConfig(window=60, warmup=5),
                       spikes=SpikeConfig(dff_per_spike=0.08, oasis=OasisConfig(warmup=30),
                                          fit_in_background=False))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    fish = FishConfig(seed=3, shape=(40, 32, 8), n_neurons=120, n_ensembles=3)
    return synthesize(SynthConfig(fish=fish, n_frames=120, write_raw=True),
                      tmp_path_factory.mktemp("sig") / "rec", progress=False)


def live_signals(rec: Recording) -> tuple[np.ndarray, np.ndarray]:
    """Every raw volume through the real Preprocess stage: (dF/F, spike probability), both (T, N)."""
    stage = Preprocess(rec.segmentation(), PRE, rec.frame_period_s, Metrics("t", MetricsConfig(enabled=False)))
    dff, prob = [], []
    for t in range(rec.n_frames):
        vol = rec.read_volume(t)
        header = FrameHeader(t, time.time_ns(), vol.shape, str(vol.dtype), "F" if vol.flags.f_contiguous else "C")
        out = stage.process(Frame(header, vol, time.time_ns()))
        assert out is not None
        dff.append(out.dff.copy())
        prob.append(out.spikes.prob.copy())
    return np.stack(dff), np.stack(prob)


def test_offline_signals_equal_the_live_stage(recording: Recording) -> None:
    dff, prob = live_signals(recording)
    np.testing.assert_allclose(loop_dff(recording, PRE.dff), dff, atol=1e-6)
    got = loop_spike_probs(recording, PRE)
    np.testing.assert_allclose(got, prob, atol=1e-6)
    assert got.shape == (recording.n_frames, recording.n_neurons)
    assert 0.0 <= got.min() and got.max() <= 1.0 and got[40:].max() > 0.1   # spikes after the warm-up


def test_extracted_segment_means_match_the_stored_raw_traces(recording: Recording) -> None:
    np.testing.assert_allclose(extract_segment_means(recording), recording.raw_traces(), rtol=1e-5, atol=1e-3)


def test_results_are_cached_per_setting(recording: Recording) -> None:
    a = loop_spike_probs(recording, PRE)
    other = PreprocessConfig(dff=PRE.dff, spikes=SpikeConfig(dff_per_spike=0.2, oasis=PRE.spikes.oasis))
    b = loop_spike_probs(recording, other)
    files = sorted(p.name for p in (Path(recording.root) / CACHE_DIR).glob("spike_prob-*.npy"))
    assert len(files) == 2 and not np.array_equal(a, b)
    np.testing.assert_array_equal(loop_spike_probs(recording, PRE), a)
