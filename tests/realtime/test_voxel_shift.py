"""shift_back (numba) and shift_back_torch: identity, np.roll, scipy's trilinear map_coordinates, each other."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from loopcast.realtime.preprocess.voxel_shift import shift_back, shift_back_torch

torch = pytest.importorskip("torch")
SHAPE = (20, 16, 9)
FRACTIONAL = [(0.3, -1.6, 0.25), (-2.5, 0.0, 0.75), (0.0, 0.4, 0.0), (-25.5, 3.7, -0.5), (1.999, -0.001, 12.3)]


@pytest.fixture()
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)


def reference(vol: np.ndarray, d: tuple[float, float, float]) -> np.ndarray:
    """scipy's trilinear sample of vol at p + d, the edge voxels repeated outside the volume."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in vol.shape], indexing="ij"))
    return map_coordinates(vol.astype(np.float64), grid + np.array(d)[:, None, None, None], order=1, mode="nearest")


def test_zero_shift_is_the_identity_non_finite_voxels_included(volume: np.ndarray) -> None:
    volume[3, 4, 5], volume[7, 0, 0] = np.nan, np.inf
    out = np.full(SHAPE, -1.0, np.float32)
    assert shift_back(volume, np.zeros(3), out) is out
    np.testing.assert_array_equal(out, volume)


@pytest.mark.parametrize("d", [(1, 0, 0), (-2, 3, 1), (0, -1, -4), (5, 5, 2)])
def test_integer_shift_is_a_roll_away_from_the_edges(volume: np.ndarray, d: tuple[int, int, int]) -> None:
    out = shift_back(volume, d)
    rolled = np.roll(volume, [-s for s in d], axis=(0, 1, 2))
    inside = tuple(slice(max(0, -s), n - max(0, s)) for n, s in zip(SHAPE, d, strict=True))
    np.testing.assert_array_equal(out[inside], rolled[inside])
    np.testing.assert_allclose(out, reference(volume, d), rtol=1e-6)          # the edges: repeated


@pytest.mark.parametrize("d", FRACTIONAL)
def test_fractional_shift_is_trilinear_with_clamped_coordinates(volume: np.ndarray,
                                                                d: tuple[float, float, float]) -> None:
    np.testing.assert_allclose(shift_back(volume, d), reference(volume, d), rtol=1e-6, atol=1e-4)


def test_a_nan_reaches_the_voxels_whose_cell_holds_it(volume: np.ndarray) -> None:
    volume[5, 6, 4] = np.nan
    out = shift_back(volume, (0.5, 0.0, 0.0))                          # x fractional only: 2 voxels
    assert set(zip(*np.nonzero(np.isnan(out)), strict=True)) == {(4, 6, 4), (5, 6, 4)}
    out = shift_back(volume, (0.5, -0.5, 0.5))                         # all three: 8
    assert np.isnan(out).sum() == 8 and np.isnan(out[4:6, 6:8, 3:5]).all()


def test_input_checks(volume: np.ndarray) -> None:
    with pytest.raises(ValueError):
        shift_back(volume.astype(np.float64), (0, 0, 0))
    with pytest.raises(ValueError):
        shift_back(np.asfortranarray(volume), (0, 0, 0))
    with pytest.raises(ValueError):
        shift_back(volume, (0, 0))
    with pytest.raises(ValueError):
        shift_back(volume, (0, np.nan, 0))
    with pytest.raises(ValueError):
        shift_back(volume, (0, 0, 0), np.empty(SHAPE[::-1], np.float32))
    with pytest.raises(ValueError):
        shift_back(volume, (0, 0, 0), volume)


@pytest.mark.parametrize("d", [(0, 0, 0), (-2, 3, 1), *FRACTIONAL])
def test_torch_equals_numpy(volume: np.ndarray, d: tuple[float, float, float]) -> None:
    volume[2, 2, 2] = np.nan
    want = shift_back(volume, d)
    for tensor in (torch.from_numpy(volume), torch.from_numpy(np.asfortranarray(volume)).to(torch.float32)):
        got = shift_back_torch(tensor, d)
        assert got.dtype == torch.float32 and got.shape == SHAPE and got.data_ptr() != tensor.data_ptr()
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-4)   # NaNs at the same voxels
    with pytest.raises(ValueError):
        shift_back_torch(torch.zeros(SHAPE, dtype=torch.int32), d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_on_cuda_equals_numpy(volume: np.ndarray) -> None:
    for d in FRACTIONAL:
        got = shift_back_torch(torch.from_numpy(volume).cuda(), d)
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), shift_back(volume, d), rtol=1e-6, atol=1e-4)
