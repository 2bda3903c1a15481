"""The pipeline on recorded data (replay.player.RecordingSource, no sockets in): exact causal dF/F
through the real stages, forecasts stamped with their frame, engine errors escalated, bad engines refused."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from loopcast import app
from loopcast.realtime.engines.base import Engine
from loopcast.realtime.engines.loader import load_engine
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.forecast.stage import ForecastStage
from loopcast.realtime.metrics import Metrics
from loopcast.realtime.pipeline import Pipeline
from loopcast.realtime.preprocess.dff import causal_dff_reference
from loopcast.realtime.preprocess.stage import Preprocessed
from loopcast.realtime.preprocess.traces import TraceExtractor
from loopcast.realtime.wire.codec import Frame, decode_forecast
from loopcast.realtime.wire.transport import Publisher, Subscriber
from loopcast.replay.layout import Recording
from loopcast.replay.player import RecordingSource
from loopcast.settings import LoopcastConfig, load_settings

FRAMES = 60


def make_pipeline(cfg: LoopcastConfig, rec: Recording, engine: Engine | None = None) -> tuple[Pipeline, Subscriber]:
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=1000)
    sub = Subscriber(pub.endpoint, topics=(b"forecast/",), rcvhwm=1000)
    assert pub.wait_for_subscribers(1, 5)
    engine = engine or load_engine(app.engine_path(cfg))
    stage = ForecastStage(engine, pub, Metrics("run"))
    pipe = Pipeline(cfg.pipeline, cfg.rig, RecordingSource(rec, cfg.rig.name, stop=FRAMES),
                    rec.segmentation(), stage, stage.metrics)
    return pipe, sub


def test_pipeline_on_a_recording_matches_the_offline_reference(loop_setup: tuple[Path, list[str]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_settings(overrides=loop_setup[1])
    rec = Recording.open(cfg.paths.recording)
    pipe, sub = make_pipeline(cfg, rec)
    dffs: list[np.ndarray] = []
    monkeypatch.setattr(pipe.preprocess, "process", _capturing_dff(pipe.preprocess.process, dffs))
    report = pipe.run()
    first = max(cfg.pipeline.preprocess.dff.warmup, cfg.train.context) - 1
    forecasts = [decode_forecast(m) for m in receive(sub, FRAMES - first)]
    pipe.close()
    sub.close()

    assert report.frames == FRAMES
    assert [f.header.seq for f in forecasts] == list(range(first, FRAMES))
    assert all(f.header.frame["stimulus"] == pytest.approx(rec.stimuli()[f.header.seq].tolist())
               for f in forecasts)
    extractor = TraceExtractor(rec.segmentation())
    f_ref = np.stack([extractor.process(rec.read_volume(t)) for t in range(FRAMES)])
    ref = causal_dff_reference(f_ref, cfg.pipeline.preprocess.dff)
    np.testing.assert_allclose(np.stack(dffs), ref, atol=1e-6)


def receive(sub: Subscriber, n: int, timeout_s: float = 10.0) -> list:
    """Up to n messages: the last forecasts may still be in flight on TCP when the pipeline returns."""
    msgs: list = []
    deadline = time.monotonic() + timeout_s
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(200, limit=1000)
    return msgs


def _capturing_dff(process: Callable[[Frame], Preprocessed | None],
                   sink: list[np.ndarray]) -> Callable[[Frame], Preprocessed | None]:
    """Wrap the stage's process() to keep a copy of each frame's dF/F."""
    def wrapped(frame: Frame) -> Preprocessed | None:
        out = process(frame)
        assert out is not None
        sink.append(out.dff.copy())
        return out
    return wrapped


class BrokenEngine(OnnxEngine):
    """An engine whose every run fails, standing in for a corrupt model or a lost GPU."""

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        raise RuntimeError("engine exploded")


def test_failing_engine_is_counted_and_then_stops_the_pipeline_loudly(loop_setup: tuple[Path, list[str]]) -> None:
    cfg = load_settings(overrides=loop_setup[1])
    rec = Recording.open(cfg.paths.recording)
    pipe, sub = make_pipeline(cfg, rec, BrokenEngine(app.engine_path(cfg)))
    with pytest.raises(RuntimeError, match="engine exploded"):
        pipe.run()
    assert pipe.metrics.count("loopcast_errors_total", kind="forecast") == 10
    pipe.close()
    sub.close()


def test_engine_for_another_neuron_count_is_refused(loop_setup: tuple[Path, list[str]], tmp_path: Path) -> None:
    cfg = load_settings(overrides=loop_setup[1])
    seg = np.zeros((4, 4, 2), np.uint32)
    seg.flat[:7] = np.arange(1, 8)   # 7 neurons, the engine has 300
    with pytest.raises(app.UserError, match="trained on 300 neurons, the pipeline has 7"):
        app.build_pipeline(cfg, Metrics("run"), seg)
    with pytest.raises(EngineError, match="loopcast train"):
        load_engine(tmp_path / "nothing-here")
