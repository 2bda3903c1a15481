from __future__ import annotations

import numpy as np
import pytest

from loopcast.offline_training.data.splits import (
    ZAPBENCH_OFFSETS,
    condition_splits,
    gather_windows,
    split_windows,
    window_starts,
)


def test_zapbench_condition0_context4() -> None:
    c0 = condition_splits(ZAPBENCH_OFFSETS, context=4)[0]
    assert (c0.name, c0.index) == ("gain", 0)
    assert c0.train == (1, 455)
    assert c0.val == (451, 519)
    assert c0.test == (515, 648)


def test_zapbench_condition0_context256_same_targets() -> None:
    c0 = condition_splits(ZAPBENCH_OFFSETS, context=256)[0]
    assert c0.train == (1, 455)
    assert c0.val == (455 - 256, 519)
    assert c0.test == (519 - 256, 648)


@pytest.mark.parametrize("context", [4, 256])
def test_targets_do_not_depend_on_context(context: int) -> None:
    short = condition_splits(ZAPBENCH_OFFSETS, context=4)
    long = condition_splits(ZAPBENCH_OFFSETS, context=context)
    for a, b in zip(short, long):
        assert a.test[0] + 4 == b.test[0] + context  # first test target
        if not a.holdout:
            assert a.val is not None and b.val is not None and a.train is not None
            assert a.val[0] + 4 == b.val[0] + context
            assert a.train[1] == a.val[0] + 4  # val targets start where train ends


def test_holdout_is_scored_over_whole_range() -> None:
    splits = condition_splits(ZAPBENCH_OFFSETS, context=4)
    taxis = splits[3]
    assert taxis.name == "taxis" and taxis.holdout
    assert taxis.train is None and taxis.val is None
    assert taxis.test == (3079 + 256 - 4, 3734)
    assert condition_splits(ZAPBENCH_OFFSETS, context=256)[3].test == (3079, 3734)
    assert sum(s.holdout for s in splits) == 1


def test_windows_stay_inside_their_range() -> None:
    context, horizon = 4, 32
    for split in ("train", "val", "test"):
        for cs in condition_splits(ZAPBENCH_OFFSETS, context=context):
            span = cs.span(split)
            if span is None:
                continue
            starts = window_starts(span, context, horizon)
            assert len(starts) == span[1] - span[0] - context - horizon + 1
            assert starts.min() == span[0] and starts.max() + context + horizon == span[1]
            assert np.all(np.diff(starts) == 1)


def test_short_range_yields_no_windows_with_warning() -> None:
    with pytest.warns(UserWarning, match="shorter than one window"):
        starts = window_starts((10, 21), context=4, horizon=8)
    assert starts.shape == (0,)
    assert len(window_starts((10, 22), context=4, horizon=8)) == 1


def test_split_windows_skips_holdout_and_gathers() -> None:
    splits = condition_splits(ZAPBENCH_OFFSETS, context=4)
    train = split_windows(splits, "train", 4, 8)
    assert sorted(train) == [0, 1, 2, 4, 5, 6, 7, 8]
    assert 3 in split_windows(splits, "test", 4, 8, include_holdout=True)
    traces = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    x, y = gather_windows(traces, np.array([0, 5]), 4, 8)
    assert x.shape == (2, 4, 3) and y.shape == (2, 8, 3)
    np.testing.assert_array_equal(y[1, 0], traces[9])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        condition_splits((0, 10, 5), context=4)
    with pytest.raises(ValueError):
        condition_splits(ZAPBENCH_OFFSETS, context=4, holdout=(9,))
    with pytest.raises(ValueError):
        condition_splits(ZAPBENCH_OFFSETS, context=300)
