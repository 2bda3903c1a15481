"""RunningPercentile against np.percentile of the samples it holds: ties, constants, wrap, pops."""
from __future__ import annotations

import numpy as np
import pytest

from loopcast.realtime.preprocess.percentile import PARALLEL_MIN, RunningPercentile, order_statistics


def samples(kind: str, t: int, n: int, seed: int = 0) -> np.ndarray:
    """(T, N) float32 test series of one kind."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0, 1, (t, n)).astype(np.float32)
    if kind == "ties":                                    # few distinct values: ties everywhere
        return rng.integers(0, 4, (t, n)).astype(np.float32)
    if kind == "constant":
        return np.full((t, n), 7.5, np.float32)
    ramp = np.linspace(0, 50, t)[:, None] * np.where(np.arange(n) % 2, 1, -1)   # rising / falling
    return (500 + ramp + rng.normal(0, 2, (t, n))).astype(np.float32)


def expected(held: np.ndarray, p: float) -> np.ndarray:
    return np.percentile(held, p, axis=0).astype(np.float32)


def check(got: np.ndarray, held: np.ndarray, p: float) -> None:
    np.testing.assert_allclose(got, expected(held, p), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("window", [1, 2, 3, 17])
@pytest.mark.parametrize("p", [0.0, 8.0, 50.0, 100.0])
@pytest.mark.parametrize("kind", ["normal", "ties", "constant"])
def test_push_wraps_then_pops_to_empty(window: int, p: float, kind: str) -> None:
    x = samples(kind, 3 * window + 7, 12)                 # the ring wraps three times
    rp = RunningPercentile(12, window, p, slack=2)
    for t in range(len(x)):
        check(rp.push_value(x[t]), x[max(0, t - window + 1):t + 1], p)
        assert rp.count == min(t + 1, window)
    held = x[-window:]
    while rp.count > 1:
        rp.pop()
        held = held[1:]
        check(rp.value(), held, p)
    rp.pop()
    assert rp.count == 0
    with pytest.raises(ValueError, match="empty"):
        rp.pop()


@pytest.mark.parametrize("slack", [0, 3, 32])
def test_trends_and_noise_over_many_cycles(slack: int) -> None:
    """Rising series force refills, falling ones front inserts; noise moves the runs around."""
    x = np.concatenate([samples("trend", 300, 40), samples("normal", 300, 40, seed=3)], axis=1)
    rp = RunningPercentile(80, 37, 8.0, slack=slack)
    for t in range(len(x)):
        check(rp.push_value(x[t]), x[max(0, t - 36):t + 1], 8.0)


def test_bit_identical_to_numpy() -> None:
    x = samples("normal", 120, 50) * 300 + 600
    rp = RunningPercentile(50, 40, 8.0)
    out = rp.push_values(x)
    for t in (0, 1, 5, 39, 40, 119):
        np.testing.assert_array_equal(out[t], expected(x[max(0, t - 39):t + 1], 8.0))


def test_block_push_equals_frame_by_frame() -> None:
    x = samples("trend", 150, 30)
    one, block = RunningPercentile(30, 25, 8.0), RunningPercentile(30, 25, 8.0)
    by_frame = np.stack([one.push_value(row) for row in x])
    np.testing.assert_array_equal(block.push_values(x[:70]), by_frame[:70])
    np.testing.assert_array_equal(block.push_values(x[70:]), by_frame[70:])
    np.testing.assert_array_equal(block.value(), one.value())


def test_parallel_path_matches_numpy() -> None:
    n = PARALLEL_MIN + 3
    x = samples("normal", 30, n, seed=5)
    rp = RunningPercentile(n, 10, 8.0)
    for t in range(len(x)):
        rp.push(x[t])
    check(rp.value(), x[-10:], 8.0)


def test_interleaved_pushes_and_pops() -> None:
    """The centred-window pattern in general: any order of pushes and pops keeps it exact."""
    rng = np.random.default_rng(7)
    x = samples("ties", 400, 9)
    rp = RunningPercentile(9, 20, 30.0, slack=1)
    held: list[np.ndarray] = []
    for row in x:
        if held and rng.random() < 0.4:
            rp.pop()
            held.pop(0)
        else:
            rp.push(row)
            held = (held + [row])[-20:]
        if held:
            check(rp.value(), np.stack(held), 30.0)


def test_newest_and_errors() -> None:
    rp = RunningPercentile(3, 4, 8.0)
    np.testing.assert_array_equal(rp.newest(), 0.0)
    with pytest.raises(ValueError, match="no samples"):
        rp.value()
    rp.push(np.array([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(rp.newest(), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        rp.push(np.array([1.0, np.nan, 3.0], np.float32))
    with pytest.raises(ValueError, match="shape"):
        rp.push(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        rp.value(out=np.zeros(3, np.float64))
    with pytest.raises(ValueError):
        RunningPercentile(3, 0, 8.0)


def test_order_statistics_follow_numpy_index() -> None:
    assert order_statistics(400, 8.0)[:2] == (31, 32)
    assert order_statistics(1, 8.0)[:2] == (0, 0)
    assert order_statistics(10, 100.0)[:2] == (9, 9)
