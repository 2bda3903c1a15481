"""Forecast stage for video engines: downsampled dF/F volumes in, per-neuron forecasts out.

The pipeline's context buffer holds the last C causal dF/F volumes of the preprocess voxel stage
(`pipeline.preprocess.voxels`, 4x mean-downsampled in xy), each centre-cropped in y to the engine's
grid and flattened. Per frame the engine predicts one volume per configured lead time (batched over
lead times, `lead_batch` per call), every predicted volume is reduced to per-neuron means through the
strided segmentation (realtime.forecast.video_reduce; on the engine's device for the torch runtime), and the
(L, N) forecast is published exactly like a trace model's, with the same header (lead_times = the
configured ones).

Hot swap: trace engines only for now; a video stage serves the engine it started with.
"""
from __future__ import annotations

import logging

import numpy as np

from loopcast.realtime.engines.base import Engine
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.forecast.stage import ForecastStage
from loopcast.realtime.forecast.video_reduce import VideoGrid, VolumeReducer
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.preprocess.stage import Preprocessed
from loopcast.realtime.wire.transport import Publisher

log = logging.getLogger(__name__)


class VideoForecastStage(ForecastStage):
    """Stage 3 with a video engine: (C, X*Y*Z) window of volumes -> (L, N) forecast, published."""

    def __init__(self, engine: Engine, publisher: Publisher, metrics: Metrics, segmentation: np.ndarray,
                 lead_times: tuple[int, ...] = (), lead_batch: int = 8) -> None:
        if lead_batch < 1:
            raise ValueError(f"lead_batch must be >= 1, got {lead_batch}")
        self._wanted_leads, self.lead_batch = tuple(int(h) for h in lead_times), lead_batch
        super().__init__(engine, publisher, metrics, watcher=None)
        video = engine.manifest.video or {}
        self.grid = VideoGrid.from_manifest(video)
        sx, sy, sz = (int(s) for s in video["input_shape"])      # 3 sizes: the manifest checks them on load
        self.input_shape = (sx, sy, sz)
        y0, y1 = (int(v) for v in video["crop_y"])                # 2 rows: VideoGrid checked them
        self.crop_y = (y0, y1)
        self.reducer = VolumeReducer(segmentation, self.grid, engine.manifest.n_neurons)
        log.info("video engine %s: input %s, lead times %s in batches of %d; traces from the segmentation "
                 "strided by %d (%s)", engine.version, self.input_shape, list(self.lead_times), lead_batch,
                 self.grid.stride, self.reducer.stats)

    def _check(self, engine: Engine) -> None:
        m = engine.manifest
        if m.task != "video":
            raise EngineError(f"{m.path}: a {m.task!r} engine cannot run as the video forecaster")
        bad = [h for h in self._wanted_leads if h not in m.lead_times]
        if bad:
            raise EngineError(f"pipeline.forecast.lead_times {bad} are outside engine {engine.version}'s "
                              f"lead times 1..{m.horizon}")

    def _serve(self, engine: Engine) -> None:
        super()._serve(engine)
        self.lead_times = self._wanted_leads or tuple(engine.manifest.lead_times)

    def setup(self, n_neurons: int) -> None:
        """Check the pipeline's neuron count against the engine and the segmentation's reduction."""
        super().setup(n_neurons)
        if self.reducer.n_neurons != n_neurons:
            raise EngineError(f"the segmentation has {self.reducer.n_neurons} neurons, the pipeline {n_neurons}")

    def row_size(self, n_neurons: int) -> int:
        """Values per frame in the context buffer: the voxels of one cropped input volume."""
        return int(np.prod(self.input_shape))

    def row(self, pre: Preprocessed) -> np.ndarray:
        """The frame's downsampled causal dF/F volume, cropped in y to the engine's grid, flattened."""
        vol = pre.voxel_dff
        if vol is None:
            raise EngineError("a video engine needs the per-voxel dF/F stage: set "
                              "pipeline.preprocess.voxels.enabled = true (factor "
                              f"{self.grid.factor}, as the engine was trained)")
        x, y, z = self.input_shape
        y0, y1 = self.crop_y
        if vol.shape[0] != x or vol.shape[2] != z or vol.shape[1] < y1:
            raise EngineError(f"voxel dF/F volume {vol.shape} does not fit the engine's grid: input {self.input_shape}"
                              f" cropped from y [{y0}, {y1}) (downsampling factor {self.grid.factor})")
        return np.ascontiguousarray(vol[:, y0:y1, :]).reshape(-1)

    def _predict(self, engine: Engine, window: np.ndarray) -> np.ndarray:
        """window (C, X*Y*Z) -> (L, N): one predicted volume per lead time, each reduced to traces."""
        c = window.shape[0]
        vols = window.reshape(1, c, *self.input_shape)                       # (1, C, X, Y, Z), a view
        out = []
        for i in range(0, len(self.lead_times), self.lead_batch):
            leads = np.asarray(self.lead_times[i:i + self.lead_batch], dtype=np.int64)
            batch = np.ascontiguousarray(np.broadcast_to(vols, (len(leads), *vols.shape[1:])))
            out.append(engine.run_video_traces(batch, leads, self.reducer))  # (b, N)
        return np.concatenate(out, axis=0)                                  # (L, N)
