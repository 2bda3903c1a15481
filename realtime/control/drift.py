"""The controller's drift interlock: stimulation targets are fixed points of the microscope, so when the fish
has moved away from where the registration reference put it, or the registration cannot say where it is,
the targets no longer sit on the neurons they name. Then the controller disarms.

Pure logic. The pipeline puts each frame's registration (dx, dy, dz voxels from the reference, and the
confidence) in the header of every forecast made from it (docs/architecture.md); the controller checks every
forecast it reads, before its policy, and the first rule that holds names the cause:
1. `require` is on and the forecast carries no registration (the pipeline is not registering volumes);
2. |shift| on an axis exceeds `max_shift` on that axis (0 leaves the axis unchecked);
3. the confidence is below `min_confidence` (0 = off): the volume did not match the reference (the fish
   jumped out of the search range, the image went dark or saturated, the sample changed).
When it fires while the controller is armed, the controller disarms, counts `loopcast_errors_total{kind=
"drift"}`, writes the cause to the audit log (a `state` record) and the status (`last_disarm`), and stays
disarmed until an operator arms it again; every later forecast is checked again, so an arm while the fish
is still out of place is followed by a disarm at the next forecast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

AXES = ("x", "y", "z")


@dataclass(frozen=True)
class DriftConfig:
    """`[controller.drift]`: how far from the registration reference, and how unsure, disarms."""

    max_shift: tuple[float, float, float] = (2.0, 2.0, 1.0)   # voxels per axis x, y, z (0: axis unchecked)
    min_confidence: float = 7.0   # registration confidence below this disarms (0 = off); noise alone ~4-6
    require: bool = False         # a forecast without registration disarms (rigs that must register)

    def __post_init__(self) -> None:
        values = (*self.max_shift, self.min_confidence)
        if len(self.max_shift) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"controller.drift: max_shift must be 3 finite voxel distances >= 0 and "
                             f"min_confidence finite >= 0, got {list(self.max_shift)}, {self.min_confidence}")


def drift_cause(cfg: DriftConfig, registration: tuple[float, ...]) -> str | None:
    """Why a forecast with this registration ((dx, dy, dz, confidence) or ()) must disarm; None if it need not."""
    if not registration:
        return "drift: the forecast carries no registration (controller.drift.require)" if cfg.require else None
    *shift, confidence = registration
    for axis, d, limit in zip(AXES, shift, cfg.max_shift, strict=True):
        if limit and abs(d) > limit:
            return (f"drift: the fish moved {d:+.2f} voxels in {axis} from the registration reference "
                    f"(controller.drift.max_shift {axis} = {limit:g})")
    if cfg.min_confidence and confidence < cfg.min_confidence:
        return (f"drift: registration confidence {confidence:.1f} below controller.drift.min_confidence = "
                f"{cfg.min_confidence:g}")
    return None
