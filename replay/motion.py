"""Rigid motion of the simulated fish: slow drift (a random walk) and occasional jumps, sub-voxel in x, y, z.

Per frame t (shift_0 = 0, voxels, axes x, y, z):
  shift_{t+1} = clip(shift_t + drift_speed * n_t + jump_size * sqrt(k_t) * m_t, -max_shift, max_shift)
  n_t, m_t ~ N(0, I_3),  k_t ~ Poisson(jump_rate)   (k_t jumps this frame, each N(0, jump_size^2) per axis)
The shift moves the fish's content: the expected image at voxel v is mu(v - shift), by linear interpolation
along each axis (replay.render.shift_volume); the camera's noise is added afterwards (the camera stays put).
Everything is drawn from `seed`: equal configs give equal shift sequences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class MotionConfig:
    """Rigid motion of the fish (all off by default: no drift, no jumps)."""

    drift_speed: Vec3 = (0.0, 0.0, 0.0)   # random-walk step std per frame (voxels), x, y, z
    jump_rate: float = 0.0                # jumps per frame (Poisson)
    jump_size: Vec3 = (2.0, 2.0, 0.5)     # std of one jump per axis (voxels)
    max_shift: Vec3 = (8.0, 8.0, 2.0)     # the shift is clamped to +- this per axis (voxels)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drift_speed", "jump_size", "max_shift"):
            v = getattr(self, name)
            if len(v) != 3 or min(v) < 0:
                raise ValueError(f"motion.{name} must be 3 values >= 0 (x, y, z), got {v}")
        if not 0.0 <= self.jump_rate <= 1.0:
            raise ValueError(f"motion.jump_rate must be in [0, 1] per frame, got {self.jump_rate}")

    @property
    def enabled(self) -> bool:
        """Whether the fish moves at all (some drift, or jumps of some size, within a non-zero clamp)."""
        moves = max(self.drift_speed) > 0 or (self.jump_rate > 0 and max(self.jump_size) > 0)
        return moves and max(self.max_shift) > 0


class RigidMotion:
    """The shift (x, y, z) float32 voxels of each frame, one per `next()`, reproducible from cfg.seed."""

    def __init__(self, cfg: MotionConfig) -> None:
        self.cfg = cfg
        self._rng = np.random.default_rng([cfg.seed, 0x5F1F7])
        self._pos = np.zeros(3)
        self._drift = np.asarray(cfg.drift_speed, np.float64)
        self._jump = np.asarray(cfg.jump_size, np.float64)
        self._max = np.asarray(cfg.max_shift, np.float64)
        self.n_jumps = 0            # jumps so far

    def next(self) -> np.ndarray:
        """This frame's shift (3,) float32; then advance one frame (a fixed 7 draws per frame)."""
        shift = self._pos.astype(np.float32)
        n, m = self._rng.standard_normal(3), self._rng.standard_normal(3)
        k = int(self._rng.poisson(self.cfg.jump_rate))
        self.n_jumps += k
        step = self._drift * n + self._jump * math.sqrt(k) * m
        self._pos = np.clip(self._pos + step, -self._max, self._max)
        return shift

    def sequence(self, n_frames: int) -> np.ndarray:
        """The next n_frames shifts, (n_frames, 3) float32."""
        out = np.zeros((n_frames, 3), np.float32)
        for t in range(n_frames):
            out[t] = self.next()
        return out


def motion_sequence(cfg: MotionConfig, n_frames: int) -> np.ndarray:
    """(n_frames, 3) float32: the shifts a fish with motion `cfg` has at frames 0 .. n_frames - 1."""
    return RigidMotion(cfg).sequence(n_frames)
