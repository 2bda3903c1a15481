"""Engine hot swap: a version published while forecasts flow takes over at a frame boundary, with no
frame dropped and every header naming the engine that made the forecast; half-written or incompatible
versions are refused and counted while the old engine keeps serving; pinned versions are not watched.
Real ONNX Runtime sessions of NLinear engines exported with offline_training.export.engine.export_engine."""
from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loopcast import app
from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.offline_training.export.engine import export_engine
from loopcast.offline_training.export.versions import publish, staging_dir
from loopcast.offline_training.trace.train import TrainConfig
from loopcast.realtime.engines.manifest import EngineError
from loopcast.realtime.engines.onnx_runtime import OnnxEngine
from loopcast.realtime.engines.watch import EngineWatcher
from loopcast.realtime.forecast.stage import ForecastConfig, ForecastStage, engine_loader, engine_watcher
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.wire.codec import Forecast, FrameHeader, decode_forecast, encode_frame
from loopcast.realtime.wire.transport import Publisher, Subscriber
from loopcast.settings import load_settings

N, C, H = 16, 4, 8
CFG = TrainConfig(context=C, horizon=H, threads=1)
NAME = "nlinear-c4-h8"
FAILURES = "loopcast_engine_load_failures_total"
SWAPS = "loopcast_engine_swaps_total"


@pytest.fixture(scope="module")
def models() -> list[NLinear]:
    torch.set_num_threads(1)
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(NLinear(NLinearConfig(C, H)).eval())
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, models: list[NLinear]) -> list[Path]:
    """Version dirs of engine A (seed 0) and B (seed 1), to publish copies of into test registries."""
    root = tmp_path_factory.mktemp("sources")
    return [export_engine(m, CFG, root, N, {"val": {}}, "sha256:test", "unit-test") for m in models]


def publish_copy(src: Path, registry: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Publish a copy of a version dir as the next version, the way export does (staging + rename)."""
    staged = staging_dir(registry, NAME)
    shutil.copytree(src, staged, dirs_exist_ok=True)

    def finalize(d: Path, version: str) -> None:
        raw = json.loads((d / "manifest.json").read_text())
        raw["version"] = version
        if edit is not None:
            edit(raw)
        (d / "manifest.json").write_text(json.dumps(raw))
    return publish(staged, finalize)[1]


def make_stage(path: Path, interval_s: float = 0.02, watch: bool = True) -> tuple[ForecastStage, Subscriber]:
    """A forecast stage built as loopcast.app builds it, publishing on 127.0.0.1, set up for N neurons."""
    metrics = Metrics("test", MetricsConfig(enabled=False))
    cfg = ForecastConfig(watch=watch, watch_interval_s=interval_s)
    loader = engine_loader(cfg)
    pub = Publisher("tcp://127.0.0.1:*", sndhwm=100_000)
    sub = Subscriber(pub.endpoint, topics=(b"forecast/",), rcvhwm=100_000)
    assert pub.wait_for_subscribers(1, 5)
    stage = ForecastStage(loader(path), pub, metrics, engine_watcher(path, cfg, loader, metrics))
    stage.setup(N)
    return stage, sub


@pytest.fixture()
def registry(tmp_path: Path, sources: list[Path]) -> Path:
    """A registry whose entry NAME holds v0001 = engine A."""
    publish_copy(sources[0], tmp_path / "engines")
    return tmp_path / "engines"


def watcher_of(stage: ForecastStage) -> EngineWatcher:
    assert stage.watcher is not None
    return stage.watcher


@pytest.fixture()
def stage(registry: Path) -> Iterator[ForecastStage]:
    """A stage serving NAME (v0001) whose watcher polls only when the test calls poll()."""
    s, sub = make_stage(registry / NAME, interval_s=3600.0)
    yield s
    s.close()
    sub.close()


def frame(seq: int) -> FrameHeader:
    return FrameHeader(seq=seq, t_src_ns=time.time_ns(), shape=(8, 8, 2), dtype="uint16")


def windows(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.3, size=(k, C, N)).astype(np.float32)


def receive(sub: Subscriber, n: int, timeout_s: float = 10.0) -> list[Forecast]:
    msgs: list = []
    deadline = time.monotonic() + timeout_s
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += sub.recv_all(100, limit=10_000)
    return [decode_forecast(m) for m in msgs]


def test_publish_while_forecasting_swaps_once_at_a_frame_boundary(registry: Path,
                                                                   models: list[NLinear]) -> None:
    stage, sub = make_stage(registry / NAME)
    xs = windows(64)
    train_args: tuple[Any, ...] = (models[1], CFG, registry, N, {}, "sha256:b", "test")
    trainer = threading.Thread(target=export_engine, args=train_args)
    returned: list[tuple[Any, np.ndarray]] = []
    deadline = time.monotonic() + 20
    after_swap = 0
    while after_swap < 30:                          # one thread: the frame loop
        assert time.monotonic() < deadline, "no swap"
        header, pred = stage.process(xs[len(returned) % 64], frame(len(returned)))
        returned.append((header, pred.copy()))
        if len(returned) == 20:
            trainer.start()                         # another thread: training publishes v0002
        after_swap += stage.swaps > 0
        time.sleep(0.001)
    trainer.join()
    got = receive(sub, len(returned))
    stage.close()
    sub.close()

    assert [f.header.seq for f in got] == list(range(len(returned)))       # one forecast per frame
    versions = [f.header.engine_version for f in got]
    k = versions.index(f"{NAME}/v0002")
    assert k >= 20 and versions == [f"{NAME}/v0001"] * k + [f"{NAME}/v0002"] * (len(got) - k)
    assert [h.engine_version for h, _ in returned] == versions
    ref = {v: OnnxEngine(registry / NAME / v) for v in ("v0001", "v0002")}
    for i, (f, (_, pred)) in enumerate(zip(got, returned)):
        want = ref[f.header.engine_version.split("/")[1]].run(xs[i % 64])
        assert np.array_equal(f.data, pred) and np.array_equal(pred, want), i
    assert not np.allclose(ref["v0001"].run(xs[0]), ref["v0002"].run(xs[0]))   # A and B really differ
    m = stage.metrics
    assert stage.swaps == 1 and m.count(SWAPS) == 1 and not any(k.startswith(FAILURES) for k in m.counters())
    info = {"engine": f"{NAME}/v0002", "model": "nlinear"}
    assert m.registry.get_sample_value("loopcast_engine_info", info) == 1


def _no_onnx(d: Path) -> None:
    (d / "model.onnx").unlink()


def _corrupt_onnx(d: Path) -> None:
    (d / "model.onnx").write_bytes(b"\x08\x07 not a protobuf" * 10)


def _edit_manifest(**fields: Any) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        raw = json.loads((d / "manifest.json").read_text())
        raw.update(fields)
        (d / "manifest.json").write_text(json.dumps(raw))
    return edit


COV = {"name": "covariates", "shape": ["batch", C + H, 3], "dtype": "float32"}
BROKEN = {
    "empty dir": ("manifest", lambda d: [f.unlink() for f in d.iterdir()]),
    "no model.onnx": ("load", _no_onnx),
    "corrupt onnx": ("load", _corrupt_onnx),
    "bad manifest": ("manifest", lambda d: (d / "manifest.json").write_text("{half")),
    "other context": ("context", _edit_manifest(
        context=6, inputs=[{"name": "context", "shape": ["batch", 6, "neurons"], "dtype": "float32"}])),
    "other neurons": ("neurons", _edit_manifest(n_neurons=N + 1)),
    "covariates": ("covariates", _edit_manifest(inputs=[{"name": "context", "shape": ["batch", C, "neurons"],
                                                         "dtype": "float32"}, COV])),
    "spikes task": ("task", _edit_manifest(task="spikes", horizon=1, lead_times=[0],
                                           outputs=[{"name": "forecast", "shape": ["batch", 1, "neurons"],
                                                     "dtype": "float32"}])),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_version_is_refused_counted_not_retried_and_old_keeps_serving(
        kind: str, stage: ForecastStage, registry: Path, sources: list[Path]) -> None:
    reason, damage = BROKEN[kind]
    bad = registry / NAME / "v0002"                  # written in place, not staged: a half-written version
    shutil.copytree(sources[1], bad)
    damage(bad)
    x = windows(1)[0]
    for _ in range(3):                               # refused once, then remembered
        assert watcher_of(stage).poll() is None
    header, pred = stage.process(x, frame(0))
    assert stage.metrics.count(FAILURES, reason=reason) == 1 and stage.metrics.count(SWAPS) == 0
    assert header.engine_version == f"{NAME}/v0001"
    assert np.array_equal(pred, OnnxEngine(registry / NAME / "v0001").run(x))

    publish_copy(sources[1], registry)               # v0003, good: skips the broken one
    assert watcher_of(stage).poll() is not None
    header, pred = stage.process(x, frame(1))
    assert header.engine_version == f"{NAME}/v0003" and stage.swaps == 1
    assert np.array_equal(pred, OnnxEngine(sources[1]).run(x))


def test_half_written_version_is_retried_once_complete(stage: ForecastStage, registry: Path,
                                                        sources: list[Path]) -> None:
    v2 = registry / NAME / "v0002"
    v2.mkdir()                                       # a writer that does not stage: no model.onnx yet
    raw = json.loads((sources[1] / "manifest.json").read_text())
    (v2 / "manifest.json").write_text(json.dumps({**raw, "version": "v0002"}))
    assert watcher_of(stage).poll() is None and watcher_of(stage).poll() is None
    assert stage.metrics.count(FAILURES, reason="load") == 1
    assert stage.process(windows(1)[0], frame(0))[0].engine_version == f"{NAME}/v0001"
    shutil.copy(sources[1] / "model.onnx", v2)       # now complete: its contents changed, so it is retried
    assert watcher_of(stage).poll() is not None
    assert stage.process(windows(1)[0], frame(1))[0].engine_version == f"{NAME}/v0002"
    assert stage.metrics.count(FAILURES, reason="load") == 1


class NanEngine(OnnxEngine):
    """A real engine whose warm-up forecast is not finite."""

    def run(self, context: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        return np.full_like(super().run(context, covariates), np.nan)


def test_engine_with_non_finite_warm_up_is_refused(registry: Path, sources: list[Path]) -> None:
    metrics = Metrics("test", MetricsConfig(enabled=False))
    watcher = EngineWatcher(registry / NAME, NanEngine, metrics, interval_s=3600)
    watcher.start(OnnxEngine(registry / NAME), N)
    publish_copy(sources[1], registry)
    assert watcher.poll() is None and watcher.take() is None
    assert metrics.count(FAILURES, reason="warmup") == 1
    watcher.stop()


def test_stage_warm_up_runs_once_on_zeros_publishes_nothing_and_refuses_a_non_finite_engine(
        registry: Path) -> None:
    s, sub = make_stage(registry / NAME, watch=False)
    try:
        assert s.warm_up(N) > 0.0
        assert sub.recv_all(100) == [] and s.published == 0      # a warm-up is not a forecast
        s.engine = NanEngine(s.engine.manifest.engine_dir)
        with pytest.raises(EngineError, match="warm-up forecast on zeros is not a finite"):
            s.warm_up(N)
        with pytest.raises(EngineError, match="neurons"):
            s.warm_up(N + 1)
    finally:
        s.close()
        sub.close()


def test_staging_dirs_and_older_versions_are_ignored(stage: ForecastStage, registry: Path,
                                                     sources: list[Path]) -> None:
    shutil.copytree(sources[1], staging_dir(registry, NAME) / "x")   # a writer still staging
    shutil.copytree(sources[1], registry / NAME / "v0000")           # older than the one serving
    assert watcher_of(stage).poll() is None and stage.metrics.counters().get(SWAPS) == 0


def test_pinned_version_is_not_watched(registry: Path, sources: list[Path]) -> None:
    metrics, pinned = Metrics("test", MetricsConfig(enabled=False)), registry / NAME / "v0001"
    assert engine_watcher(pinned, ForecastConfig(), engine_loader(ForecastConfig()), metrics) is None
    off = ForecastConfig(watch=False)
    assert engine_watcher(registry / NAME, off, engine_loader(off), metrics) is None
    on = ForecastConfig()
    assert engine_watcher(registry / NAME, on, engine_loader(on), metrics) is not None
    stage, sub = make_stage(pinned, interval_s=0.01)
    publish_copy(sources[1], registry)
    for i in range(20):
        assert stage.process(windows(1)[0], frame(i))[0].engine_version == f"{NAME}/v0001"
        time.sleep(0.005)
    assert stage.swaps == 0 and stage.watcher is None
    stage.close()
    sub.close()


def test_pipeline_built_by_the_app_swaps_while_frames_flow(registry: Path, sources: list[Path]) -> None:
    frames = Publisher("tcp://127.0.0.1:*", sndhwm=1000)
    cfg = load_settings(overrides=[
        f'paths.engines="{registry}"', 'train.model="nlinear"', f"train.context={C}", f"train.horizon={H}",
        "rig.shape=[8, 8, 2]", f'endpoints.frames="{frames.endpoint}"',
        'endpoints.forecasts="tcp://127.0.0.1:*"',
        "pipeline.preprocess.dff.warmup=2", "pipeline.forecast.watch_interval_s=0.02"])
    seg = np.arange(1, 8 * 8 * 2 + 1, dtype=np.uint32).reshape(8, 8, 2) % N + 1     # N neurons
    pipe = app.build_pipeline(cfg, Metrics("run", MetricsConfig(enabled=False)), seg)
    out = Subscriber(pipe.forecast.publisher.endpoint, topics=(b"forecast/",), rcvhwm=1000)
    assert frames.wait_for_subscribers(1, 5) and pipe.forecast.publisher.wait_for_subscribers(1, 5)
    rng, seq, after_swap = np.random.default_rng(0), 0, 0
    while after_swap < 10:
        assert seq < 400, "no swap"
        volume = rng.integers(100, 200, size=(8, 8, 2), dtype=np.uint16)
        frames.send(encode_frame(FrameHeader(seq, time.time_ns(), (8, 8, 2), "uint16"), volume))
        assert any(pipe.step(timeout_ms=200) for _ in range(25)), f"frame {seq} lost"
        if pipe.report.forecasts == 5:
            publish_copy(sources[1], registry)
        after_swap += pipe.forecast.swaps > 0
        seq += 1
    got = receive(out, pipe.report.forecasts)
    pipe.close()
    out.close()
    frames.close()

    first = pipe.report.first_forecast_seq
    assert first is not None
    assert [f.header.seq for f in got] == list(range(first, seq))      # every frame after warm-up forecast
    versions = [f.header.engine_version.split("/")[1] for f in got]
    k = versions.index("v0002")
    assert k >= 5 and versions == ["v0001"] * k + ["v0002"] * (len(got) - k)
    assert pipe.metrics.count(SWAPS) == 1 and pipe.metrics.count("loopcast_frames_dropped_total",
                                                                  reason="forecast_skipped") == 0
