"""Several engines in one pipeline: a dF/F forecaster, an activation predictor, a covariate forecaster
(fed the frames' stimulus, the newest held for the future steps) and a spike-probability forecaster
(waits for the spike estimator's warm-up), each with its own context buffer; real ONNX engines (toy
modules exported by conftest.export_toy), frames fed in process, outputs on real ZeroMQ (127.0.0.1)."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopcast import app
from loopcast.inprocess import MessageFeed
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.forecast.activation import ActivationStage
from loopcast.realtime.forecast.stage import ForecastConfig, ForecastStage, engine_loader, engine_watcher
from loopcast.realtime.ingest import RigConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.pipeline import Pipeline, PipelineConfig
from loopcast.realtime.preprocess.dff import DffConfig
from loopcast.realtime.preprocess.stage import PreprocessConfig, Preprocessed
from loopcast.realtime.spikes.oasis_params import OasisConfig
from loopcast.realtime.spikes.stage import SpikeConfig
from loopcast.realtime.wire.codec import Frame, FrameHeader, decode_forecast, encode_frame
from loopcast.realtime.wire.transport import Publisher, Subscriber
from loopcast.settings import load_settings

N, C, H, K = 10, 3, 2, 2
SHAPE = (8, 8, 2)
FRAMES = 16
OASIS_WARMUP = 8
# "every": the stages run side by side, each on every frame (the live default "newest" lets a busy stage
# skip frames: tests/realtime/test_parallel_stages.py); the OASIS fit inline, so the spike signal starts
# on a known frame (the live default fits in the background: tests/realtime/test_oasis.py)
CFG = PipelineConfig(preprocess=PreprocessConfig(dff=DffConfig(warmup=2),
                                                 spikes=SpikeConfig(oasis=OasisConfig(warmup=OASIS_WARMUP),
                                                                  fit_in_background=False)),
                     forecast=ForecastConfig(also_schedule="every"))
RIG = RigConfig(shape=SHAPE, dtype="uint16", n_covariates=K)


def segmentation() -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.uint32).reshape(SHAPE) % N) + 1


def stimulus(seq: int) -> tuple[float, ...]:
    return (float(seq), -0.5 * seq)


def frames(n: int, with_stimulus: bool = True, seed: int = 0) -> list[list[Any]]:
    """Encoded frames: noisy volumes with occasional bright transients, stimulus (seq, -seq / 2)."""
    rng = np.random.default_rng(seed)
    out = []
    for seq in range(n):
        vol = rng.integers(100, 120, size=SHAPE).astype(np.uint16)
        vol[rng.random(SHAPE) < 0.1] += 200
        header = FrameHeader(seq, time.time_ns(), SHAPE, "uint16", stimulus=stimulus(seq) if with_stimulus else ())
        out.append(encode_frame(header, vol))
    return out


def stage_for(path: Path, pub: Publisher, metrics: Metrics) -> ForecastStage:
    engine = OnnxEngine(path)
    kind = ActivationStage if engine.manifest.task == "activation" else ForecastStage
    return kind(engine, pub, metrics)


def run_pipeline(paths: list[Path], messages: list[list[Any]],
                 rig: RigConfig = RIG) -> tuple[Pipeline, list[Preprocessed], list[tuple[bytes, Any]]]:
    """Run a pipeline of one stage per engine over `messages`; (pipeline, every frame's preprocess
    output, every published (topic, message))."""
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=10_000)
    sub = Subscriber(pub.endpoint, topics=(b"forecast/", b"activation/"), rcvhwm=10_000)
    assert pub.wait_for_subscribers(2, 5)
    stages = [stage_for(p, pub, metrics) for p in paths]
    pipe = Pipeline(CFG, rig, MessageFeed(messages), segmentation(), stages, metrics)
    pres: list[Preprocessed] = []
    pipe.preprocess.process = capture(pipe.preprocess.process, pres)  # type: ignore[method-assign]
    pipe.run()
    expected = sum(pipe.report.published.values())
    got = receive(sub, expected)
    pipe.close()
    sub.close()
    return pipe, pres, got


def capture(process: Callable[[Frame], Preprocessed | None], sink: list[Preprocessed]) -> Callable[..., Any]:
    def wrapped(frame: Frame) -> Preprocessed | None:
        out = process(frame)
        if out is not None:
            sink.append(Preprocessed(out.seq, out.fluorescence, out.dff.copy(), out.spikes, out.ready,
                                     out.voxel_dff, out.spikes_ready))
        return out
    return wrapped


def receive(sub: Subscriber, n: int, timeout_s: float = 10.0) -> list[tuple[bytes, Any]]:
    msgs: list = []
    deadline = time.monotonic() + timeout_s
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(100, limit=10_000)
    return [(bytes(m[0]), decode_forecast(m)) for m in msgs]


def by_topic(got: list[tuple[bytes, Any]], topic: bytes) -> list[Any]:
    return [m for t, m in got if t == topic]


def test_forecaster_and_activation_stage_publish_side_by_side(toy_engines: dict[str, Path]) -> None:
    pipe, pres, got = run_pipeline([toy_engines["mean"], toy_engines["act"]], frames(FRAMES))
    fc, act = by_topic(got, b"forecast/toymean"), by_topic(got, b"activation/toyact")
    first = max(CFG.preprocess.dff.warmup, C) - 1
    assert [m.header.seq for m in fc] == [m.header.seq for m in act] == list(range(first, FRAMES))
    assert len(got) == len(fc) + len(act)
    dff = np.stack([p.dff for p in pres])
    for f, a in zip(fc, act):
        t = f.header.seq
        window = dff[t - C + 1:t + 1]
        assert f.header.kind == "forecast" and f.header.lead_times == (1, 2) and f.data.shape == (H, N)
        assert a.header.kind == "activation" and a.header.lead_times == (H,) and a.data.shape == (1, N)
        np.testing.assert_allclose(f.data, np.repeat(4 * window.mean(axis=0)[None], H, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.data[0], 1 / (1 + np.exp(-(4 * window.mean(axis=0) - 1))), rtol=1e-5)
    r = pipe.report
    assert r.frames == FRAMES and r.forecasts == len(fc) and r.first_forecast_seq == first
    assert r.published == {"forecast/toymean": len(fc), "activation/toyact": len(act)} and r.failures == {}
    assert pipe.forecast is pipe.stages[0] and pipe.context is pipe.contexts[0] and len(pipe.contexts) == 2


def test_covariate_engine_gets_context_stimuli_then_the_newest_held(toy_engines: dict[str, Path]) -> None:
    pipe, _, got = run_pipeline([toy_engines["cov"]], frames(FRAMES))
    fc = by_topic(got, b"forecast/toycov")
    assert fc and pipe.contexts[0].n == N + K
    for f in fc:
        t = f.header.seq
        fed = [stimulus(s) for s in (t - 2, t - 1, t, t, t)]          # C context steps, then H held
        want = np.asarray(fed, np.float32).reshape(-1)                 # the toy echoes (C + H) * K = N values
        np.testing.assert_array_equal(f.data, np.repeat(want[None], H, axis=0))
    assert pipe.metrics.count("loopcast_values_invalid_total", kind="missing_stimulus") == 0


def test_stage_says_how_a_covariate_engine_saw_the_future(toy_engines: dict[str, Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Trained on the recorded future stimulus: a warning and the engine-info label say the loop differs;
    a "held" engine is served quietly; an engine without covariates is labelled "none"."""
    import json
    import shutil
    metrics, pub = Metrics("run", MetricsConfig(enabled=False)), Publisher("tcp://127.0.0.1:*")
    held = tmp_path / "toycov-held" / "v0001"
    shutil.copytree(toy_engines["cov"], held)
    raw = json.loads((held / "manifest.json").read_text())
    (held / "manifest.json").write_text(json.dumps({**raw, "future_covariates": "held"}))
    for path, label, warns in ((toy_engines["cov"], "recorded", True), (held, "held", False),
                               (toy_engines["mean"], "none", False)):
        caplog.clear()
        stage = ForecastStage(OnnxEngine(path), pub, metrics)
        info = {"stage": stage.name, "engine": stage.engine.version, "model": stage.model, "future_covariates": label}
        assert metrics.registry.get_sample_value("loopcast_stage_engine_info", info) == 1
        assert ("trained on the recorded future stimulus" in caplog.text) == warns
    pub.close()


def test_frames_without_stimulus_feed_zeros_and_are_counted(toy_engines: dict[str, Path]) -> None:
    pipe, _, got = run_pipeline([toy_engines["cov"]], frames(6, with_stimulus=False))
    fc = by_topic(got, b"forecast/toycov")
    assert fc and all(not f.data.any() for f in fc)
    assert pipe.metrics.count("loopcast_values_invalid_total", kind="missing_stimulus") == 6


def test_covariate_engine_on_a_rig_with_other_k_is_refused(toy_engines: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match="takes 2 stimulus covariates; the rig sends rig.n_covariates = 26"):
        run_pipeline([toy_engines["cov"]], [], rig=RigConfig(shape=SHAPE, dtype="uint16", n_covariates=26))


def test_spike_signal_stage_waits_for_the_spike_estimator(toy_engines: dict[str, Path]) -> None:
    pipe, pres, got = run_pipeline([toy_engines["mean"], toy_engines["spk"]], frames(FRAMES))
    spk, fc = by_topic(got, b"forecast/toyspk"), by_topic(got, b"forecast/toymean")
    ready = [p.spikes_ready for p in pres]
    first_ready = ready.index(True)
    assert first_ready >= OASIS_WARMUP - 1 and not any(ready[:first_ready]) and all(ready[first_ready:])
    assert fc[0].header.seq == max(CFG.preprocess.dff.warmup, C) - 1 < spk[0].header.seq
    assert [f.header.seq for f in spk] == list(range(first_ready + C - 1, FRAMES))   # only estimates in the context
    prob = np.stack([p.spikes.prob for p in pres])
    assert prob[first_ready:].any(), "no spike estimated: the test data should have transients"
    for f in spk:
        t = f.header.seq
        want = 4 * prob[t - C + 1:t + 1].mean(axis=0)
        np.testing.assert_allclose(f.data, np.repeat(want[None], H, axis=0), rtol=1e-5, atol=1e-6)


class BrokenEngine(OnnxEngine):
    """A real engine (manifest and checks) whose every run fails."""

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        raise RuntimeError("activation engine exploded")


def test_failures_are_counted_per_stage(toy_engines: dict[str, Path]) -> None:
    metrics = Metrics("run", MetricsConfig(enabled=False))
    pub = Publisher("tcp://127.0.0.1:*")
    good = ForecastStage(OnnxEngine(toy_engines["mean"]), pub, metrics)
    bad = ActivationStage(BrokenEngine(toy_engines["act"]), pub, metrics)
    pipe = Pipeline(CFG, RIG, MessageFeed(frames(8)), segmentation(), [good, bad], metrics)
    pipe.run()
    pipe.close()
    n = 8 - (C - 1)
    assert pipe.report.published == {"forecast/toymean": n} and pipe.report.failures == {"activation/toyact": n}
    assert metrics.count("loopcast_errors_total", kind="activation") == n
    assert metrics.count("loopcast_errors_total", kind="forecast") == 0


def test_two_stages_on_one_topic_are_refused(toy_engines: dict[str, Path]) -> None:
    metrics, pub = Metrics("run", MetricsConfig(enabled=False)), Publisher("tcp://127.0.0.1:*")
    stages = [ForecastStage(OnnxEngine(toy_engines["mean"]), pub, metrics) for _ in range(2)]
    with pytest.raises(ValueError, match="same topic"):
        Pipeline(CFG, RIG, MessageFeed([]), segmentation(), stages, metrics)
    pub.close()


def test_app_serves_also_engines_over_zeromq(toy_engines: dict[str, Path]) -> None:
    frames_pub = Publisher("tcp://127.0.0.1:*", sndhwm=1000)
    cfg = load_settings(overrides=[
        f'pipeline.forecast.engine="{toy_engines["mean"].parent}"',
        f'pipeline.forecast.also=["{toy_engines["act"].parent}", "{toy_engines["cov"]}"]',
        f"rig.shape={list(SHAPE)}", f"rig.n_covariates={K}", f'endpoints.frames="{frames_pub.endpoint}"',
        'endpoints.forecasts="tcp://127.0.0.1:*"', "pipeline.preprocess.dff.warmup=2",
        'pipeline.forecast.also_schedule="every"'])
    pipe = app.build_pipeline(cfg, Metrics("run", MetricsConfig(enabled=False)), segmentation())
    assert [type(s).__name__ for s in pipe.stages] == ["ForecastStage", "ActivationStage", "ForecastStage"]
    assert [s.name for s in pipe.stages] == ["forecast/toymean", "activation/toyact", "forecast/toycov"]
    assert pipe.stages[1].watcher is not None and pipe.stages[2].watcher is None   # a pinned version dir
    out = Subscriber(pipe.forecast.publisher.endpoint, topics=(b"",), rcvhwm=1000)
    assert frames_pub.wait_for_subscribers(1, 5) and pipe.forecast.publisher.wait_for_subscribers(1, 5)
    for msg in frames(6):
        frames_pub.send(msg)
        assert any(pipe.step(timeout_ms=200) for _ in range(25)), "frame lost"
    got = receive(out, 3 * 4)
    pipe.close()
    out.close()
    frames_pub.close()
    topics = [t for t, _ in got]
    assert {t: topics.count(t) for t in set(topics)} == {b"forecast/toymean": 4, b"activation/toyact": 4,
                                                          b"forecast/toycov": 4}


def watched(entry: Path, metrics: Metrics) -> ForecastStage:
    cfg = ForecastConfig(watch_interval_s=3600.0)      # the test polls
    loader = engine_loader(cfg)
    stage = ForecastStage(loader(entry), Publisher("tcp://127.0.0.1:*"), metrics,
                          engine_watcher(entry, cfg, loader, metrics))
    stage.setup(N)
    return stage


def test_covariate_engine_hot_swaps_with_a_covariate_warm_up(tmp_path: Path, export_toy: Callable[..., Path]) -> None:
    export_toy("cov", tmp_path)
    metrics = Metrics("run", MetricsConfig(enabled=False))
    stage = watched(tmp_path / "toycov-c3-h2", metrics)
    export_toy("cov", tmp_path)
    assert stage.watcher is not None and stage.watcher.poll() is not None
    window = np.zeros((C, N + K), np.float32)
    window[:, N:] = [stimulus(s) for s in range(C)]
    header, pred = stage.process(window, FrameHeader(0, time.time_ns(), SHAPE, "uint16"))
    stage.close()
    assert header.engine_version == "toycov-c3-h2/v0002" and stage.swaps == 1
    assert pred[0].tolist() == [0.0, 0.0, 1.0, -0.5, 2.0, -1.0, 2.0, -1.0, 2.0, -1.0]


def test_engine_of_another_signal_is_refused_as_a_replacement(tmp_path: Path,
                                                              export_toy: Callable[..., Path]) -> None:
    export_toy("mean", tmp_path)
    metrics = Metrics("run", MetricsConfig(enabled=False))
    stage = watched(tmp_path / "toymean-c3-h2", metrics)
    export_toy("mean", tmp_path, signal="spike_prob")               # same entry, reads spike probabilities
    assert stage.watcher is not None and stage.watcher.poll() is None
    stage.close()
    assert metrics.count("loopcast_engine_load_failures_total", reason="signal") == 1 and stage.swaps == 0
