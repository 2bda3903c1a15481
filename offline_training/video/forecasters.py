"""Video forecasters: VideoUNet models and video engines as trace Forecasters (offline_training.eval.harness).

A video forecaster ignores the trace context it is handed: for each window start it loads the C
downsampled dF/F input volumes (VideoData.inputs), predicts the frame at every lead time 1..H
(`lead_batch` lead times per call), and reduces each predicted frame to per-neuron traces with the
data's VolumeReducer. The result is the (B, H, N) forecast that the harness scores on the same ZAPBench
test targets as the trace models. This module imports nothing of the harness (which imports it).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

VIDEO_TASK = "video"
MATCH_KEYS = ("input_shape", "crop_y", "level", "super_resolution")

__all__ = ["VIDEO_TASK", "VideoForecaster", "VideoTorchForecaster", "VideoEngineForecaster", "video_forecaster",
           "check_video_match"]


class VideoForecaster:
    """Shared predict(): per start, load the C input volumes, run all lead times, reduce."""

    data: Any
    lead_batch: int
    baseline: bool = False

    @property
    def context(self) -> int:
        raise NotImplementedError

    @property
    def horizon(self) -> int:
        raise NotImplementedError

    def _frames(self, volumes: np.ndarray, lead: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, x: np.ndarray | None, cov: np.ndarray | None, condition: int,
                starts: np.ndarray) -> np.ndarray:
        """(B, H, N) traces reduced from the predicted frames of the windows at `starts`."""
        if self.lead_batch < 1:
            raise ValueError(f"lead_batch must be >= 1, got {self.lead_batch}")
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        c, h = self.context, self.horizon
        out = np.empty((len(starts), h, int(self.data.reducer.n_neurons)), dtype=np.float32)
        for i in range(len(starts)):
            volumes = np.ascontiguousarray(self.data.inputs(starts[i:i + 1], c)[0], dtype=np.float32)  # (C, X, Y, Z)
            for l0 in range(0, h, self.lead_batch):
                lead = np.arange(l0 + 1, min(l0 + self.lead_batch, h) + 1, dtype=np.int64)   # (L,)
                batch = np.repeat(volumes[None], len(lead), axis=0)                         # (L, C, X, Y, Z)
                out[i, l0:l0 + len(lead)] = self.data.reducer.reduce(self._frames(batch, lead))
        return out


@dataclass
class VideoTorchForecaster(VideoForecaster):
    """A VideoUNet (torch) as a Forecaster over `data` (a VideoData)."""

    model: nn.Module
    data: Any
    lead_batch: int = 8
    device: str = "cpu"
    baseline: bool = False

    def __post_init__(self) -> None:
        config: Any = self.model.config   # a plain attribute; torch types it as a Module's
        sr = getattr(config, "super_resolution", None)
        want = int(self.data.manifest_video()["super_resolution"])
        if sr is not None and int(sr) != want:
            raise ValueError(f"model super_resolution {sr} != data super_resolution {want}")
        self.model = self.model.to(self.device).eval()

    @property
    def context(self) -> int:
        config: Any = self.model.config
        return int(config.context)

    @property
    def horizon(self) -> int:
        config: Any = self.model.config
        return int(config.horizon)

    @torch.no_grad()
    def _frames(self, volumes: np.ndarray, lead: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(volumes).to(self.device)               # (L, C, X, Y, Z)
        frames = self.model(x, torch.from_numpy(lead).to(self.device))  # (L, X', Y', Z')
        return frames.float().cpu().numpy()


@dataclass
class VideoEngineForecaster(VideoForecaster):
    """A video engine (realtime.engines.loader.load_engine, task "video") as a Forecaster over `data`."""

    engine: Any
    data: Any
    lead_batch: int = 8
    baseline: bool = False

    def __post_init__(self) -> None:
        manifest = self.engine.manifest
        if getattr(manifest, "task", None) != VIDEO_TASK:
            raise ValueError(f"engine {self.engine.version} is not a video engine "
                             f"(task {getattr(manifest, 'task', None)!r})")
        check_video_match(manifest.video, self.data.manifest_video(), str(self.engine.version))
        n = int(self.data.reducer.n_neurons)
        if manifest.n_neurons != n:
            raise ValueError(f"engine {self.engine.version} was exported for {manifest.n_neurons} "
                             f"neurons, the data has {n}")

    @property
    def context(self) -> int:
        return int(self.engine.manifest.context)

    @property
    def horizon(self) -> int:
        return int(self.engine.manifest.horizon)

    def _frames(self, volumes: np.ndarray, lead: np.ndarray) -> np.ndarray:
        return np.asarray(self.engine.run_video(volumes, lead))


def video_forecaster(engine: Any, recording: Any, lead_batch: int = 8,
                     cache: dict[tuple[int, int, int], Any] | None = None) -> VideoEngineForecaster:
    """A video engine over the recording's prepared dF/F volumes on the engine's grid (level, y crop,
    super-resolution from its manifest); `cache` shares one VideoData per grid between engines."""
    from loopcast.offline_training.video.data import VideoData, VideoDataConfig
    v = engine.manifest.video
    key = (int(v["level"]), int(v["crop_y"][1]) - int(v["crop_y"][0]), int(v["super_resolution"]))
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = VideoData(recording, VideoDataConfig(level=key[0], crop_y=key[1]), super_resolution=key[2])
    return VideoEngineForecaster(engine, cache[key], lead_batch=lead_batch)


def check_video_match(engine_video: Mapping[str, Any], data_video: Mapping[str, Any],
                      label: str = "engine") -> None:
    """Raise ValueError unless the engine's manifest "video" block matches the data's in input
    shape, y crop, multiscale level and super-resolution (the frames could not be reduced)."""
    def norm(v: Any) -> Any:
        return [int(a) for a in v] if isinstance(v, (list, tuple)) else v
    bad = [f"{k}: engine {norm(engine_video.get(k))} != data {norm(data_video.get(k))}"
           for k in MATCH_KEYS if norm(engine_video.get(k)) != norm(data_video.get(k))]
    if bad:
        raise ValueError(f"{label} does not match the video data: " + "; ".join(bad))
