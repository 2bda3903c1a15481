"""Compiled kernels: the one numba decorator of loopcast.realtime, and where its kernels are cached.

Every numba kernel of the loop (traces, dF/F, the running percentile, OASIS, the voxel path) is made by
`njit` here. Its compiled code is cached on disk under `cache_dir()`: by default the user's cache
directory, `$XDG_CACHE_HOME/loopcast/numba` (`~/.cache/loopcast/numba` when that is unset), never next to
the source. numba's own `cache=True` writes into the source tree's `__pycache__`, which a fresh clone lacks
(every kernel then compiled on the loop's first frames: ~10 s at the demo scale) and an installed wheel
may not be able to write.

numba picks a kernel's cache directory when caching is enabled on it (at decoration with `cache=True`:
`Dispatcher.enable_caching` -> `FunctionCache` -> the first locator that accepts the function; with
`numba.config.CACHE_DIR` set, `UserProvidedCacheLocator`, whose path is joined once, there). Setting
`numba.config.CACHE_DIR` later does not move kernels already defined. So `njit` registers every kernel,
and `set_cache_dir` (the process's config, `[runtime] kernel_cache`, applied by the app at start) enables
caching on each of them again with `numba.config.CACHE_DIR` set to the directory for that call only (other
libraries' numba caches are left alone). A directory that cannot be written disables the cache (kernels
then compile in memory, once per process) rather than letting numba fall back to the source tree.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numba
import numpy as np
from numba.core import config as numba_config
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher
from numpy.typing import NDArray

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., object])
T = TypeVar("T", bound=np.generic)

_KERNELS: list[Dispatcher[Any]] = []


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/loopcast/numba` (an absolute XDG_CACHE_HOME only, as the XDG spec says), else
    `~/.cache/loopcast/numba`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "loopcast" / "numba"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _resolve(path: str | Path | None) -> Path | None:
    """The directory to cache in ("" / None: the default), None when it cannot be written (logged)."""
    wanted = Path(path).expanduser() if path else default_cache_dir()
    if _writable(wanted):
        return wanted.resolve()
    log.warning("numba kernel cache %s is not writable: kernels compile in memory, once per process "
                "(set [runtime] kernel_cache to a writable directory)", wanted)
    return None


_cache_dir: Path | None = _resolve(None)


def _cache_in(kernel: Dispatcher[Any], directory: Path | None) -> None:
    """Enable `kernel`'s on-disk cache under `directory` (None: no cache)."""
    if directory is None:
        kernel._cache = NullCache()  # type: ignore[attr-defined]   # numba has no public "disable"
        return
    settings = vars(numba_config)       # numba.config.CACHE_DIR: set as a module global (untyped)
    before = settings["CACHE_DIR"]
    settings["CACHE_DIR"] = str(directory)
    try:
        kernel.enable_caching()
    finally:
        settings["CACHE_DIR"] = before
    where = kernel.stats.cache_path
    if where is None or not Path(where).is_relative_to(directory):   # numba fell back to another locator
        log.warning("numba did not cache %s under %s (it chose %s): cache disabled for it",
                    kernel.py_func.__qualname__, directory, where)
        kernel._cache = NullCache()  # type: ignore[attr-defined]


def njit(*, parallel: bool = False, nogil: bool = False, error_model: Literal["python", "numpy"] = "python",
         inline: Literal["never", "always"] = "never") -> Callable[[F], Dispatcher[F]]:
    """`numba.njit` with the options the kernels use, cached under `cache_dir()` (see the module docstring)."""
    def wrap(fn: F) -> Dispatcher[F]:
        kernel = numba.njit(parallel=parallel, nogil=nogil, error_model=error_model, inline=inline)(fn)
        _KERNELS.append(kernel)
        _cache_in(kernel, _cache_dir)
        return kernel
    return wrap


def set_cache_dir(path: str | Path | None) -> Path | None:
    """Cache every kernel (those defined so far and those defined later) under `path` ("" or None: the
    default, `default_cache_dir()`). Returns the directory in use, or None when it cannot be written
    (logged; the kernels then compile in memory). Kernels already compiled in this process stay compiled."""
    global _cache_dir
    _cache_dir = _resolve(path)
    for kernel in _KERNELS:
        _cache_in(kernel, _cache_dir)
    log.debug("numba kernel cache: %s", _cache_dir or "off")
    return _cache_dir


def read_only(array: NDArray[T]) -> NDArray[T]:
    """`array` itself when read-only, else a read-only view of it. numba compiles a kernel once per
    argument type, and whether an array is writable is part of its type: volumes come read-only from
    ZeroMQ and shared memory but writable from memory, so a kernel that only reads a volume takes it
    through here and is compiled (and warmed up) once."""
    if not array.flags.writeable:
        return array
    view = array.view()
    view.flags.writeable = False
    return view


def cache_dir() -> Path | None:
    """Where kernels are cached now; None when caching is off."""
    return _cache_dir


def kernels() -> tuple[Dispatcher[Any], ...]:
    """Every kernel made by `njit` so far (tests check where each one caches)."""
    return tuple(_KERNELS)
