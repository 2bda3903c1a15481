"""The stimulus baseline: trial phases, exact recovery of a planted trial-locked response, n/a without repeats."""
from __future__ import annotations

import numpy as np
import pytest

from loopcast.models.stimulus import StimulusBaseline, StimulusBaselineConfig, trial_phases

OFFSETS = (0, 100, 200, 300)


def planted(period: tuple[int, ...] = (10, 7, 0), n: int = 5, seed: int = 0):
    """Traces = a per-condition response that depends only on the trial phase; onsets in column 25.
    A period of 0 means no onsets (condition 2 by default): the baseline is undefined there."""
    rng = np.random.default_rng(seed)
    t = OFFSETS[-1]
    cov = np.zeros((t, 26), np.float32)
    traces = rng.normal(size=(t, n)).astype(np.float32)
    responses: list[np.ndarray | None] = []
    for k, p in enumerate(period):
        a, b = OFFSETS[k], OFFSETS[k + 1]
        if p == 0:
            responses.append(None)
            continue
        resp = rng.normal(size=(p, n)).astype(np.float32)
        tl = np.arange(b - a)
        cov[a:b, 25] = (tl % p) == 0
        traces[a:b] = resp[tl % p]
        responses.append(resp)
    return traces, cov, responses


def test_trial_phases_count_frames_since_the_last_onset() -> None:
    onsets = np.array([0, 0, 1, 0, 0, 1, 0, 1], bool)
    assert trial_phases(onsets).tolist() == [-1, -1, 0, 1, 2, 0, 1, 0]


def test_recovers_a_planted_trial_locked_response_exactly() -> None:
    traces, cov, responses = planted()
    spans = {0: (1, 70), 1: (101, 170), 2: (201, 270)}
    model = StimulusBaseline().fit(traces, cov, OFFSETS, spans)
    assert model.defined(0) and model.defined(1) and not model.defined(2)
    for k in (0, 1):
        starts = np.arange(OFFSETS[k] + 70, OFFSETS[k + 1] - 12)   # test-like windows, C = 4, H = 8
        pred = model.predict(k, starts, context=4, horizon=8)
        assert pred is not None
        frames = starts[:, None] + 4 + np.arange(8)
        np.testing.assert_array_equal(pred, traces[frames])
        assert pred.shape == (len(starts), 8, traces.shape[1]) and pred.dtype == np.float32
    assert model.predict(2, np.arange(210, 220), 4, 8) is None


def test_min_trials_and_holdout_make_it_undefined() -> None:
    traces, cov, _ = planted(period=(40, 10, 10))
    spans = {0: (1, 70), 1: (101, 170), 2: None}                     # 2: held out, no train range
    model = StimulusBaseline(StimulusBaselineConfig(min_trials=2)).fit(traces, cov, OFFSETS, spans)
    assert not model.defined(0)        # one onset (frame 40) inside the train range [1, 70)
    assert model.defined(1) and not model.defined(2)


def test_unseen_phases_fall_back_to_the_train_mean() -> None:
    traces, cov, _ = planted(period=(10, 10, 10))
    cov[50:100, 25] = 0                                             # the test part has one long trial
    model = StimulusBaseline().fit(traces, cov, OFFSETS, {0: (1, 40)})
    preds = model.predict(0, np.array([60]), context=4, horizon=8)
    assert preds is not None
    pred = preds[0]                                                 # phases 24..31: never seen
    np.testing.assert_allclose(pred, np.broadcast_to(traces[1:40].mean(axis=0), pred.shape), rtol=1e-6)


def test_rejects_covariates_without_the_onset_column() -> None:
    traces, cov, _ = planted()
    with pytest.raises(ValueError, match="onset column"):
        StimulusBaseline().fit(traces, cov[:, :10], OFFSETS, {0: (1, 70)})
