"""Warm-up before the first frame: every stage runs its compiled and lazily initialised paths on synthetic
input of the real shapes before the pipeline subscribes to frames (and before a simulated rig publishes),
and no stage's state changes: a warmed pipeline computes, bit for bit, what a cold one does, and counts
the same. (The loop with an empty kernel cache losing no frame: tests/test_demo.py.)"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast import app
from loopcast.inprocess import MessageFeed
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.forecast.stage import ForecastConfig, ForecastStage
from loopcast.realtime.ingest import RigConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.pipeline import Pipeline, PipelineConfig
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.realtime.preprocess.stage import Preprocess, PreprocessConfig, Preprocessed, VoxelStageConfig
from loopcast.realtime.preprocess.voxel_dff import VoxelDffConfig
from loopcast.realtime.spikes.oasis_params import OasisConfig
from loopcast.realtime.spikes.stage import SpikeConfig
from loopcast.realtime.wire.codec import Frame, FrameHeader, decode_forecast, encode_frame
from loopcast.realtime.wire.transport import Publisher, Subscriber, TransportConfig, VolumeSender
from loopcast.replay.fish import FishConfig, FishModel
from loopcast.replay.sim import LiveSim, SimConfig
from loopcast.settings import load_settings

N, K = 10, 2                  # the toy engines' neurons and (covariate engine) stimulus covariates
SHAPE = (8, 8, 2)
FRAMES = 16
RIG = RigConfig(shape=SHAPE, dtype="uint16", n_covariates=K)
# dF/F, OASIS with a short warm-up and the per-voxel stage, so that all of them are past warm-up in FRAMES
WARM_CFG = PipelineConfig(preprocess=PreprocessConfig(
    dff=DffConfig(warmup=2), spikes=SpikeConfig(oasis=OasisConfig(warmup=8), fit_in_background=False),
    voxels=VoxelStageConfig(enabled=True, dff=VoxelDffConfig(window=16, warmup=2, decimate=8))),
    forecast=ForecastConfig(also_schedule="every"))


def segmentation() -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.uint32).reshape(SHAPE) % N) + 1


def frames(n: int) -> list[list[Any]]:
    """Encoded frames: noisy volumes with occasional bright transients."""
    rng = np.random.default_rng(0)
    out = []
    for seq in range(n):
        vol = rng.integers(100, 120, size=SHAPE).astype(np.uint16)
        vol[rng.random(SHAPE) < 0.1] += 200
        out.append(encode_frame(FrameHeader(seq, time.time_ns(), SHAPE, "uint16", stimulus=(seq, -seq)), vol))
    return out


def capture(process: Callable[[Frame], Preprocessed | None], sink: list[Preprocessed]) -> Callable[..., Any]:
    def wrapped(frame: Frame) -> Preprocessed | None:
        out = process(frame)
        if out is not None:
            sink.append(dataclasses.replace(out, dff=out.dff.copy()))
        return out
    return wrapped


def receive(sub: Subscriber, n: int, timeout_s: float = 10.0) -> list[tuple[bytes, Any]]:
    msgs: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(100, limit=10_000)
    return [(bytes(m[0]), decode_forecast(m)) for m in msgs]


def build(toy_engines: dict[str, Path]) -> tuple[Pipeline, Metrics, Subscriber]:
    """A pipeline with no source yet: a dF/F forecaster and a spike-probability forecaster."""
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=10_000)
    sub = Subscriber(pub.endpoint, topics=(b"forecast/",), rcvhwm=10_000)
    assert pub.wait_for_subscribers(1, 5)
    stages = [ForecastStage(OnnxEngine(toy_engines[k]), pub, metrics) for k in ("mean", "spk")]
    return Pipeline(WARM_CFG, RIG, None, segmentation(), stages, metrics), metrics, sub


def run(pipe: Pipeline, sub: Subscriber) -> tuple[list[Preprocessed], list[tuple[bytes, Any]]]:
    pres: list[Preprocessed] = []
    pipe.preprocess.process = capture(pipe.preprocess.process, pres)  # type: ignore[method-assign]
    pipe.connect(MessageFeed(frames(FRAMES)))
    pipe.run()
    got = receive(sub, sum(pipe.report.published.values()))
    pipe.close()
    sub.close()
    return pres, got


def test_warm_up_changes_no_state_and_a_warmed_pipeline_computes_what_a_cold_one_does(
        toy_engines: dict[str, Path]) -> None:
    warm, warm_metrics, warm_sub = build(toy_engines)
    times = warm.warm_up()
    assert set(times) == {"ingest", "preprocess.traces", "preprocess.dff", "preprocess.spikes", "preprocess.voxels",
                          "forecast/toymean", "forecast/toyspk"} and all(t > 0 for t in times.values())
    pre = warm.preprocess
    assert pre.voxels is not None and pre.voxels.frames == 0
    oasis = pre.spikes.oasis  # type: ignore[attr-defined]
    assert pre.path.dff.frames == 0 and oasis.frames == 0 and oasis.params is None
    assert warm.ingest.last_seq is None and all(c.count == 0 for c in warm.contexts)
    assert all(s.published == 0 for s in warm.stages) and warm_sub.recv_all(100) == []
    cold, cold_metrics, cold_sub = build(toy_engines)
    assert warm_metrics.counters() == cold_metrics.counters()
    assert warm_metrics.summary()["latency"] == cold_metrics.summary()["latency"]

    (warm_pres, warm_got), (cold_pres, cold_got) = run(warm, warm_sub), run(cold, cold_sub)
    assert len(warm_pres) == len(cold_pres) == FRAMES and warm_pres[-1].spikes_ready and warm_pres[-1].ready
    for w, c in zip(warm_pres, cold_pres):
        assert (w.ready, w.spikes_ready) == (c.ready, c.spikes_ready)
        assert w.voxel_dff is not None and c.voxel_dff is not None
        for a, b in ((w.fluorescence, c.fluorescence), (w.dff, c.dff), (w.spikes.count, c.spikes.count),
                     (w.voxel_dff, c.voxel_dff)):
            assert np.array_equal(a, b)
    assert [t for t, _ in warm_got] == [t for t, _ in cold_got] and len(warm_got) > FRAMES
    for (_, w_msg), (_, c_msg) in zip(warm_got, cold_got):
        assert w_msg.header.seq == c_msg.header.seq and np.array_equal(w_msg.data, c_msg.data)
    assert warm.report.published == cold.report.published
    assert warm_metrics.counters() == cold_metrics.counters()


def test_the_app_warms_every_stage_up_before_it_subscribes_to_frames(
        toy_engines: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    warm_up = Pipeline.warm_up

    def warm_then_note(self: Pipeline) -> dict[str, float]:
        times = warm_up(self)
        events.append("warm_up")
        return times

    def subscribe(*args: Any, **kwargs: Any) -> MessageFeed:
        events.append("subscribe")
        return MessageFeed([])

    monkeypatch.setattr(Pipeline, "warm_up", warm_then_note)
    monkeypatch.setattr(app, "Subscriber", subscribe)
    cfg = load_settings(overrides=[f'pipeline.forecast.engine="{toy_engines["mean"]}"', f"rig.shape={list(SHAPE)}",
                                   'endpoints.forecasts="tcp://127.0.0.1:*"', "pipeline.preprocess.dff.warmup=2"])
    app.build_pipeline(cfg, Metrics("run", MetricsConfig(enabled=False)), segmentation()).close()
    assert events == ["warm_up", "subscribe"]


def test_the_torch_backend_warms_up_on_its_device_and_keeps_its_state() -> None:
    """The torch twins (traces, dF/F, OASIS) warm up on their device: a CUDA context on a GPU rig; here
    CPU torch, the same code path."""
    pytest.importorskip("torch")
    cfg = PreprocessConfig(backend="torch", device="cpu", spikes=SpikeConfig(oasis=OasisConfig(warmup=8)))
    pre = Preprocess(segmentation(), cfg, RIG.frame_period_s, Metrics("run", MetricsConfig(enabled=False)))
    assert set(pre.warm_up("uint16")) == {"traces", "dff", "spikes"}
    oasis = pre.spikes.oasis  # type: ignore[attr-defined]
    assert type(oasis).__name__ == "TorchStreamingOasis" and oasis.frames == 0 and oasis.params is None
    assert pre.path.dff.frames == 0


FISH = FishConfig(shape=(16, 12, 4), n_neurons=30, n_ensembles=2)


def test_a_warmed_fish_renders_the_frames_an_unwarmed_one_does_into_the_warmed_buffer() -> None:
    warmed, cold = FishModel(FISH), FishModel(FISH)
    pub = Publisher("tcp://127.0.0.1:*")
    sender = VolumeSender(pub, TransportConfig())
    out = sender.warm_up(FISH.shape, "uint16", "F")
    warmed.warm_up(out)
    assert sender.buffer(0, FISH.shape, "uint16", "F") is out      # frame 0 goes into the warmed buffer
    cov = np.zeros(26)
    for _ in range(3):
        assert np.array_equal(warmed.step(cov).volume, cold.step(cov).volume)
    pub.close()


def test_the_sim_warms_its_sender_and_renderer_up_and_publishes_nothing(tmp_path: Path) -> None:
    transport = TransportConfig(kind="shm", shm_dir=str(tmp_path))
    sim = LiveSim(FishModel(FISH), SimConfig(), "rig-w", f"ipc://{tmp_path}/frames", Metrics("sim"), None, transport)
    sub = Subscriber(sim.endpoint, topics=(b"frame",))
    try:
        assert sim.publisher.wait_for_subscribers(1, 5)
        times = sim.warm_up()
        assert set(times) == {"sender", "render"} and sim.sender.ring is not None
        assert sub.recv_all(200) == [] and sim.fish.t == 0 and sim.report.frames == 0
    finally:
        sub.close()
        sim.close()
    assert not list(tmp_path.glob("loopcast-*"))
