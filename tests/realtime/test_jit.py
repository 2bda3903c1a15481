"""Where the loop's numba kernels are cached: the kernel cache (`[runtime] kernel_cache`, by default the
user's cache dir), never the source tree's __pycache__, also when the directory is set after the kernels
were defined (numba fixes a kernel's cache directory when caching is enabled on it, not when it compiles)."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import loopcast.realtime.preprocess.stage  # noqa: F401  (every kernel of the loop: traces, dF/F, voxels, OASIS)
from loopcast.realtime import jit


@jit.njit()
def _twice(x: int) -> int:   # defined at import, before the tests below point the cache elsewhere
    return 2 * x


@pytest.fixture
def restore_cache_dir() -> Iterator[None]:
    before = jit.cache_dir()
    yield
    jit.set_cache_dir(before)


def test_every_kernel_of_the_loop_caches_in_the_kernel_cache() -> None:
    names = {f"{k.py_func.__module__.rsplit('.', 1)[-1]}.{k.py_func.__name__}" for k in jit.kernels()}
    assert {"traces._csr_means", "dff._ratio_par", "percentile_kernels.push_chunk", "percentile_kernels.push_par",
            "voxel_dff._down_f", "oasis._stream_step", "oasis._run_block"} <= names
    where = jit.cache_dir()
    assert where is not None
    for kernel in jit.kernels():
        path = kernel.stats.cache_path
        assert path is not None and Path(path).is_relative_to(where), (kernel, path)


def test_a_cache_dir_set_after_the_kernels_were_defined_is_where_they_compile_to(
        tmp_path: Path, restore_cache_dir: None) -> None:
    assert jit.set_cache_dir(tmp_path / "kernels") == (tmp_path / "kernels").resolve()
    assert _twice(21) == 42
    assert _twice.stats.cache_misses and list((tmp_path / "kernels").rglob("test_jit._twice-*.nbi"))
    assert not list(Path(__file__).parent.glob("__pycache__/*.nb[ic]"))


def test_an_unwritable_cache_dir_turns_the_cache_off_rather_than_writing_beside_the_source(
        tmp_path: Path, restore_cache_dir: None) -> None:
    (tmp_path / "a-file").write_text("")
    assert jit.set_cache_dir(tmp_path / "a-file" / "kernels") is None and jit.cache_dir() is None
    assert all(k.stats.cache_path is None for k in jit.kernels())


def test_the_default_cache_dir_is_the_users_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jit.default_cache_dir() == tmp_path / "loopcast" / "numba"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")     # the XDG spec: absolute paths only
    assert jit.default_cache_dir() == Path.home() / ".cache" / "loopcast" / "numba"


def test_the_runtime_config_sets_it_for_a_command(tmp_path: Path) -> None:
    code = ("from loopcast import app\nfrom loopcast.realtime import jit\nfrom loopcast.settings import load_settings\n"
            f"app.configure_process(load_settings(overrides=['runtime.kernel_cache=\"{tmp_path}/k\"']))\n"
            "print(jit.cache_dir(), {k.stats.cache_path.split('/')[-2] for k in jit.kernels()})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == str((tmp_path / "k").resolve()) and "'k'" in res.stdout
