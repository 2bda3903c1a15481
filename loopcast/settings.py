"""The top-level config: every stage's config dataclass, composed, loaded from configs/loopcast.toml.

Values shared by several stages are written once — the rig ([rig]), the ZeroMQ endpoints ([endpoints])
and the MQTT broker ([mqtt]) — and injected into the stage configs that need them, so that e.g. the
controller and the simulated fish can never disagree on the rig name or the broker address.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from loopcast.config import (ConfigError, apply_overrides, dump_toml, from_dict, load_toml, merge_dicts,
                             to_dict)
from offline_training.quantformer_train import QuantFormerTrainConfig
from offline_training.sbm_train import SBMTrainConfig
from offline_training.spike_train import SpikeTrainConfig
from offline_training.train import TrainConfig
from offline_training.train_video import VideoTrainConfig
from offline_training.video_data import VideoPrepConfig
from realtime.controller import ControllerConfig
from realtime.ingest import RigConfig
from realtime.pipeline import PipelineConfig
from realtime.transport import TransportConfig
from replay.player import ReplayConfig
from replay.sim import SimConfig
from replay.synth import SynthConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "loopcast.toml"


@dataclass(frozen=True)
class PathsConfig:
    """Where recordings, engines and run directories live (relative to the working directory)."""

    recording: str = "data/synth"
    engines: str = "engines"
    runs: str = "runs"


@dataclass(frozen=True)
class EndpointsConfig:
    """ZeroMQ endpoints: the source binds `frames`, the pipeline binds `forecasts`."""

    frames: str = "tcp://127.0.0.1:5555"
    forecasts: str = "tcp://127.0.0.1:5556"


@dataclass(frozen=True)
class MqttSettings:
    """The broker everyone talks to; `broker` says whether `loopcast demo` starts one itself."""

    host: str = "127.0.0.1"
    port: int = 1883
    broker: Literal["embedded", "mosquitto", "external"] = "embedded"


@dataclass(frozen=True)
class MetricsPorts:
    """One /metrics endpoint per process (0 = any free port)."""

    host: str = "127.0.0.1"
    sim: int = 9101
    run: int = 9102
    controller: int = 9103
    replay: int = 9104


@dataclass(frozen=True)
class DemoConfig:
    """`loopcast demo`: how long the closed loop runs and how fast the simulated rig goes."""

    frames: int = 300
    speed: float = 10.0
    fault_every: int = 60
    startup_timeout_s: float = 90.0


@dataclass(frozen=True)
class LoopcastConfig:
    """Everything, resolved. Saved as config.toml in every run directory and every engine."""

    rig: RigConfig = field(default_factory=RigConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    metrics: MetricsPorts = field(default_factory=MetricsPorts)
    synth: SynthConfig = field(default_factory=SynthConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_spikes: SpikeTrainConfig = field(default_factory=SpikeTrainConfig)
    prepare_video: VideoPrepConfig = field(default_factory=VideoPrepConfig)
    train_video: VideoTrainConfig = field(default_factory=VideoTrainConfig)
    train_sbm: SBMTrainConfig = field(default_factory=SBMTrainConfig)
    train_quantformer: QuantFormerTrainConfig = field(default_factory=QuantFormerTrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        fish = self.synth.fish
        if tuple(fish.shape) != tuple(self.rig.shape):
            raise ValueError(f"synth.fish.shape {list(fish.shape)} != rig.shape {list(self.rig.shape)}")
        if fish.frame_period_s != self.rig.frame_period_s:
            raise ValueError("synth.fish.frame_period_s must equal rig.frame_period_s")
        if self.controller.mqtt.rig != self.rig.name:
            raise ValueError("controller.mqtt.rig must equal rig.name (set [rig] name only)")


# Keys derived from the shared tables; setting them by hand is an error (they would be overwritten).
_DERIVED = {("synth", "fish", "shape"), ("synth", "fish", "frame_period_s"), ("controller", "forecasts"),
            ("controller", "mqtt", "host"), ("controller", "mqtt", "port"), ("controller", "mqtt", "rig"),
            ("train_spikes", "fish", "frame_period_s"), ("train_spikes", "dff")}


def load_settings(paths: str | Path | Sequence[str | Path] | None = None,
                  overrides: Sequence[str] = ()) -> LoopcastConfig:
    """Load configs/loopcast.toml (or the given files, later ones winning), apply dotted overrides,
    inject the shared values, validate."""
    if paths is None:
        paths = [DEFAULT_CONFIG]
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict[str, Any] = {}
    for p in paths:
        data = merge_dicts(data, load_toml(p))
    return resolve(apply_overrides(data, overrides))


def with_overrides(cfg: LoopcastConfig, overrides: Sequence[str]) -> LoopcastConfig:
    """Re-resolve a loaded config with more overrides (derived keys are recomputed)."""
    return resolve(apply_overrides(from_config(cfg), overrides))


def resolve(data: dict[str, Any]) -> LoopcastConfig:
    """User-settable values -> the validated config with the shared values injected."""
    data = apply_overrides(data, ())  # private copy
    for keys in _DERIVED:
        if _has(data, keys):
            raise ConfigError(f"'{'.'.join(keys)}' is derived; set it through [rig], [endpoints], [mqtt] "
                              f"or [pipeline.preprocess.dff]")
    rig = from_dict(RigConfig, data.get("rig", {}), "rig")
    endpoints = from_dict(EndpointsConfig, data.get("endpoints", {}), "endpoints")
    mqtt = from_dict(MqttSettings, data.get("mqtt", {}), "mqtt")
    _put(data, ("synth", "fish", "shape"), list(rig.shape))
    _put(data, ("synth", "fish", "frame_period_s"), rig.frame_period_s)
    _put(data, ("controller", "forecasts"), endpoints.forecasts)
    _put(data, ("controller", "mqtt", "host"), mqtt.host)
    _put(data, ("controller", "mqtt", "port"), mqtt.port)
    _put(data, ("controller", "mqtt", "rig"), rig.name)
    # the spike net learns the pipeline's own dF/F at the rig's frame rate
    _put(data, ("train_spikes", "fish", "frame_period_s"), rig.frame_period_s)
    _put(data, ("train_spikes", "dff"), _table(data, ("pipeline", "preprocess", "dff")))
    return from_dict(LoopcastConfig, data)


def from_config(cfg: LoopcastConfig) -> dict[str, Any]:
    """The user-settable part of a resolved config (derived keys removed), as plain values."""
    data = to_dict(cfg)
    for keys in _DERIVED:
        node = data
        for k in keys[:-1]:
            node = node[k]
        node.pop(keys[-1], None)
    return data


def new_run_dir(cfg: LoopcastConfig, kind: str, run_dir: str | None = None) -> Path:
    """runs/<kind>-<timestamp>/ with the resolved config saved as config.toml."""
    path = Path(run_dir) if run_dir else Path(cfg.paths.runs) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    dump_toml(from_config(cfg), path / "config.toml")
    return path


def _has(data: dict[str, Any], keys: tuple[str, ...]) -> bool:
    node: Any = data
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def _table(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """A copy of the table at `keys` ({} if absent; a non-table is returned as is for from_dict to reject)."""
    node: Any = data
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return {}
        node = node[k]
    return dict(node) if isinstance(node, dict) else node


def _put(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
