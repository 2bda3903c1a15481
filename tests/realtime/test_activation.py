"""The activation stage: real ONNX activation engines (toy modules exported by conftest.export_toy),
published on `activation/<model>` over real ZeroMQ (127.0.0.1), read by the activation policy, hot
swapped at a frame boundary; forecast and activation stages refuse each other's engines."""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from loopcast.realtime.control.policy import PolicyConfig, PolicyError, build_policy
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.forecast.activation import ActivationStage
from loopcast.realtime.forecast.stage import ForecastConfig, ForecastStage, engine_loader, engine_watcher
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.wire.codec import Forecast, FrameHeader, decode_forecast
from loopcast.realtime.wire.transport import Publisher, Subscriber

N, C, H = 10, 3, 2


def frame(seq: int) -> FrameHeader:
    return FrameHeader(seq=seq, t_src_ns=time.time_ns(), shape=(8, 8, 2), dtype="uint16")


def windows(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.3, size=(k, C, N)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def receive(sub: Subscriber, n: int, timeout_s: float = 10.0) -> list[tuple[bytes, Forecast]]:
    msgs: list = []
    deadline = time.monotonic() + timeout_s
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(100, limit=1000)
    return [(bytes(m[0]), decode_forecast(m)) for m in msgs]


@pytest.fixture()
def wire() -> Iterator[tuple[Publisher, Subscriber]]:
    """A publisher and a subscriber to both forecast/ and activation/ on 127.0.0.1."""
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=1000)
    sub = Subscriber(pub.endpoint, topics=(b"forecast/", b"activation/"), rcvhwm=1000)
    assert pub.wait_for_subscribers(2, 5)
    yield pub, sub
    sub.close()
    pub.close()


def test_activation_stage_publishes_probabilities(toy_engines: dict[str, Path],
                                                  wire: tuple[Publisher, Subscriber]) -> None:
    pub, sub = wire
    metrics = Metrics("test", MetricsConfig(enabled=False))
    stage = ActivationStage(OnnxEngine(toy_engines["act"]), pub, metrics)
    stage.setup(N)
    assert (stage.name, stage.window, stage.row_size(N)) == ("activation/toyact", H, N)
    xs = windows(4)
    returned = [stage.process(x, frame(i)) for i, x in enumerate(xs)]
    got = receive(sub, 4)

    assert [t for t, _ in got] == [b"activation/toyact"] * 4
    for i, ((_, msg), (header, pred)) in enumerate(zip(got, returned)):
        h = msg.header
        assert (h.kind, h.model, h.seq, h.lead_times, h.shape) == ("activation", "toyact", i, (H,), (1, N))
        assert h.engine_version == "toyact-c3-h2/v0001" and h == header
        np.testing.assert_array_equal(msg.data, pred)
        np.testing.assert_allclose(msg.data[0], sigmoid(4 * xs[i].mean(axis=0) - 1), rtol=1e-5)
    assert metrics.count("loopcast_activations_published_total", model="toyact") == 4
    assert metrics.count("loopcast_forecasts_published_total", model="toyact") == 0
    assert metrics.latency("activation").summary()["count"] == 4 and metrics.latency("forecast").summary()["count"] == 0
    info = {"stage": "activation/toyact", "engine": "toyact-c3-h2/v0001", "model": "toyact",
            "future_covariates": "none"}
    assert metrics.registry.get_sample_value("loopcast_stage_engine_info", info) == 1


def test_activation_message_drives_the_activation_policy(toy_engines: dict[str, Path],
                                                          wire: tuple[Publisher, Subscriber]) -> None:
    pub, sub = wire
    stage = ActivationStage(OnnxEngine(toy_engines["act"]), pub, Metrics("test", MetricsConfig(enabled=False)))
    stage.setup(N)
    hot = np.full((C, N), 0.5, np.float32)             # sigmoid(4 * 0.5 - 1) = 0.731
    stage.process(hot, frame(0))
    (_, msg), = receive(sub, 1)
    cfg = PolicyConfig(kind="activation_threshold", monitor="indices:0,1", targets="indices:2", lead=H,
                       level=0.7, mode="above", model="toyact")
    decision = build_policy(cfg, N, {}).evaluate(msg)
    assert decision is not None and decision.lead == H
    assert decision.value == pytest.approx(sigmoid(np.array(1.0)), rel=1e-5)
    one_frame = PolicyConfig(kind="activation_threshold", monitor="all", targets="all", lead=1)
    with pytest.raises(PolicyError, match="window_mismatch"):
        build_policy(one_frame, N, {}).evaluate(msg)
    forecast_policy = build_policy(PolicyConfig(monitor="all", targets="all", lead=H, level=-1.0), N, {})
    assert forecast_policy.evaluate(msg) is None        # a forecast policy never reads activations


def test_stages_refuse_each_others_engines(toy_engines: dict[str, Path]) -> None:
    metrics = Metrics("test", MetricsConfig(enabled=False))
    with pytest.raises(EngineError, match="'activation' engine cannot run as the forecaster"):
        ForecastStage(OnnxEngine(toy_engines["act"]), None, metrics)  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="'forecast' engine cannot run as the activation predictor"):
        ActivationStage(OnnxEngine(toy_engines["mean"]), None, metrics)  # type: ignore[arg-type]


@pytest.fixture()
def act_registry(tmp_path: Path, export_toy: Callable[..., Path]) -> Path:
    """A registry whose entry toyact-c3-h2 holds v0001 (scale 4)."""
    export_toy("act", tmp_path / "engines")
    return tmp_path / "engines" / "toyact-c3-h2"


def watched_stage(entry: Path, pub: Publisher) -> ActivationStage:
    metrics = Metrics("test", MetricsConfig(enabled=False))
    cfg = ForecastConfig(watch_interval_s=3600.0)      # the test polls
    loader = engine_loader(cfg)
    stage = ActivationStage(loader(entry), pub, metrics, engine_watcher(entry, cfg, loader, metrics))
    stage.setup(N)
    return stage


def test_activation_engine_hot_swaps_at_a_frame_boundary(act_registry: Path, export_toy: Callable[..., Path],
                                                         wire: tuple[Publisher, Subscriber]) -> None:
    pub, sub = wire
    stage = watched_stage(act_registry, pub)
    x = windows(1)[0]
    assert stage.process(x, frame(0))[0].engine_version == "toyact-c3-h2/v0001"
    export_toy("act", act_registry.parent, scale=-4.0)            # training publishes v0002
    assert stage.watcher is not None and stage.watcher.poll() is not None
    header, pred = stage.process(x, frame(1))
    stage.close()
    assert header.engine_version == "toyact-c3-h2/v0002" and header.kind == "activation" and stage.swaps == 1
    np.testing.assert_allclose(pred[0], sigmoid(-4 * x.mean(axis=0) - 1), rtol=1e-5)
    assert [m.header.engine_version for _, m in receive(sub, 2)] == ["toyact-c3-h2/v0001", "toyact-c3-h2/v0002"]


def test_forecast_engine_cannot_replace_an_activation_engine(act_registry: Path, toy_engines: dict[str, Path],
                                                              wire: tuple[Publisher, Subscriber]) -> None:
    stage = watched_stage(act_registry, wire[0])
    shutil.copytree(toy_engines["mean"], act_registry / "v0002")  # a forecaster published under this entry
    assert stage.watcher is not None and stage.watcher.poll() is None
    assert stage.metrics.count("loopcast_engine_load_failures_total", reason="task") == 1
    assert stage.process(windows(1)[0], frame(0))[0].engine_version == "toyact-c3-h2/v0001"
    stage.close()
