"""The top-level config: every stage's config dataclass, composed, loaded from configs/loopcast.toml.

Values shared by several stages are written once — the rig ([rig]), the ZeroMQ endpoints ([endpoints])
and the MQTT broker ([mqtt]) — and injected into the stage configs that need them, so that e.g. the
controller and the simulated fish can never disagree on the rig name or the broker address.

The training sections ([train], [train_spikes], [prepare_video], [train_video], [train_sbm],
[train_quantformer]; TRAINING_SECTIONS) have their config classes in offline_training, which imports
torch. They are kept as raw tables when a config loads and are imported and validated only when read
(`cfg.train`, or `training_sections(cfg, ...)`, which the training commands call before they start), so
the real-time processes (`loopcast run`, `controller`, `sim`) never import offline_training, models or
torch (tests/test_light_imports.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from loopcast.config import ConfigError, apply_overrides, dump_toml, from_dict, load_toml, merge_dicts, to_dict
from loopcast.realtime.control.controller import ControllerConfig
from loopcast.realtime.ingest import RigConfig
from loopcast.realtime.pipeline import PipelineConfig
from loopcast.realtime.wire.mqtt_security import MqttSecurity
from loopcast.realtime.wire.transport import TransportConfig
from loopcast.replay.player import ReplayConfig
from loopcast.replay.sim import SimConfig
from loopcast.replay.synth import SynthConfig

DEFAULT_CONFIG = Path(str(resources.files("loopcast.configs") / "loopcast.toml"))  # shipped in the package

# Training section -> "module:ConfigClass", imported only when the section is read.
TRAINING_SECTIONS: dict[str, str] = {
    "train": "loopcast.offline_training.trace.train:TrainConfig",
    "train_spikes": "loopcast.offline_training.spikes.train:SpikeTrainConfig",
    "prepare_video": "loopcast.offline_training.video.data:VideoPrepConfig",
    "train_video": "loopcast.offline_training.video.train:VideoTrainConfig",
    "train_sbm": "loopcast.offline_training.sbm.config:SBMTrainConfig",
    "train_quantformer": "loopcast.offline_training.quantformer.train:QuantFormerTrainConfig",
}


@dataclass(frozen=True)
class TrainingTable:
    """A training section as loaded: its table, not yet imported or validated."""

    section: str
    table: dict[str, Any]

    def resolve(self) -> Any:
        """The section's config object; a ConfigError names the offending key (e.g. 'train: device ...').
        The table is layered onto the class's defaults, so that a table with a default, such as
        [train_sbm.model_options], keeps the default keys it does not set, as it does on configs/loopcast.toml."""
        module, _, name = TRAINING_SECTIONS[self.section].partition(":")
        cls = getattr(importlib.import_module(module), name)
        return from_dict(cls, merge_dicts(to_dict(cls()), self.table), self.section)


class _TrainingSection:
    """The LoopcastConfig attribute of a training section. It holds a TrainingTable (a dict given to
    the constructor becomes one) or a config object; reading it resolves a table once, in place."""

    def __init__(self, section: str) -> None:
        self.section = section

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.section]
        if isinstance(value, TrainingTable):
            value = obj.__dict__[self.section] = value.resolve()
        return value

    def __set__(self, obj: Any, value: Any) -> None:   # only the dataclass __init__ gets here (frozen)
        obj.__dict__[self.section] = TrainingTable(self.section, value) if isinstance(value, dict) else value


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
    # security of every MQTT client (MqttSecurity, docs/mqtt-security.md); secrets only in the files named
    username: str = ""          # "" = anonymous
    password_file: str = ""     # the password, read at each connect (never stored in a config)
    tls: bool = False           # TLS against the system's CAs; ca_file implies TLS
    ca_file: str = ""
    cert_file: str = ""         # client certificate (optional), with key_file
    key_file: str = ""

    def __post_init__(self) -> None:
        _ = self.security   # validates the combination

    @property
    def security(self) -> MqttSecurity:
        """The security keys, as every MQTT client takes them."""
        return MqttSecurity(self.username, self.password_file, self.tls, self.ca_file, self.cert_file,
                            self.key_file)


@dataclass(frozen=True)
class MetricsPorts:
    """One /metrics endpoint per process (0 = any free port)."""

    host: str = "127.0.0.1"
    sim: int = 9101
    run: int = 9102
    controller: int = 9103
    replay: int = 9104
    samples: bool = False   # also write every latency sample to <run dir>/<process>.latency.json at exit


@dataclass(frozen=True)
class AffinityConfig:
    """[runtime.affinity]: the CPUs each real-time process may run on ([] = every CPU; os.sched_setaffinity)."""

    run: tuple[int, ...] = ()
    controller: tuple[int, ...] = ()
    sim: tuple[int, ...] = ()
    replay: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            cpus = getattr(self, f.name)
            if any(c < 0 for c in cpus) or len(set(cpus)) != len(cpus):
                raise ValueError(f"{f.name}: CPUs must be distinct numbers >= 0, got {list(cpus)}")


@dataclass(frozen=True)
class PriorityConfig:
    """[runtime.priority]: each real-time process's scheduling: 0 = the OS default (SCHED_OTHER); 1-99 =
    SCHED_FIFO at that priority, every thread (needs root, CAP_SYS_NICE or an rtprio limit). Meant for
    the controller, which is light and stimulates: a busy FIFO process starves everything below it."""

    run: int = 0
    controller: int = 0
    sim: int = 0
    replay: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not 0 <= getattr(self, f.name) <= 99:
                raise ValueError(f"{f.name}: priority must be 0 (the OS default) or 1-99 (SCHED_FIFO), "
                                 f"got {getattr(self, f.name)}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Process-level settings of every command, applied once at its start (`loopcast.app.configure_process`):
    the numba kernel cache, and the CPU use of the process (loopcast/cpu.py, docs/cpu.md): the threads
    of each library, per process, and the CPUs of each real-time process. 0 threads = one per CPU the
    process may run on. The engines' threads reach them as pipeline.forecast.threads and
    pipeline.preprocess.spikes.engine_threads, derived from here."""

    kernel_cache: str = ""   # numba kernel cache directory; "" = $XDG_CACHE_HOME/loopcast/numba or ~/.cache/...
    numba_threads: int = 0          # the preprocessing kernels (traces, dF/F, OASIS); 0 = one per CPU
    onnxruntime_threads: int = 1    # intra-op threads of each ONNX Runtime session (every engine)
    torch_threads: int = 1          # torch's intra-op threads: runtime "torch" engines, torch preprocessing
    tensorstore_threads: int = 0    # TensorStore's data-copy threads (decoding, encoding); 0 = one per CPU
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    priority: PriorityConfig = field(default_factory=PriorityConfig)

    def __post_init__(self) -> None:
        for name, least in (("numba_threads", 0), ("tensorstore_threads", 0), ("onnxruntime_threads", 1),
                            ("torch_threads", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")


@dataclass(frozen=True)
class DemoConfig:
    """`loopcast demo`: how long the closed loop runs and how fast the simulated rig goes."""

    frames: int = 300
    speed: float = 10.0
    fault_every: int = 60
    startup_timeout_s: float = 90.0


@dataclass(frozen=True)
class SubjectConfig:
    """The animal, for the session's NWB file (`loopcast session export-nwb`; NWB's Subject fields)."""

    subject_id: str = "unknown"
    species: str = "Danio rerio"
    sex: str = "U"                 # a larva: undetermined
    age: str = "P0D/"              # ISO 8601 duration (e.g. "P6D" for 6 dpf); "P0D/" = unknown
    genotype: str = ""
    strain: str = ""
    description: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    """Who ran the session and where, for the session's NWB file."""

    experimenter: tuple[str, ...] = ()   # "Last, First"
    institution: str = ""
    lab: str = ""
    description: str = ""               # what this session is for (the NWB file's experiment_description)


@dataclass(frozen=True)
class LoopcastConfig:
    """Everything, resolved. Saved as config.toml in every run directory and every engine.

    The training sections are typed Any here: each holds its table until read, then its config class
    (TRAINING_SECTIONS); dataclasses.replace, ==, to_dict read them all (and so import torch)."""

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
    train: Any = field(default_factory=dict, repr=False)              # TrainConfig
    train_spikes: Any = field(default_factory=dict, repr=False)       # SpikeTrainConfig
    prepare_video: Any = field(default_factory=dict, repr=False)      # VideoPrepConfig
    train_video: Any = field(default_factory=dict, repr=False)        # VideoTrainConfig
    train_sbm: Any = field(default_factory=dict, repr=False)          # SBMTrainConfig
    train_quantformer: Any = field(default_factory=dict, repr=False)  # QuantFormerTrainConfig
    demo: DemoConfig = field(default_factory=DemoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    subject: SubjectConfig = field(default_factory=SubjectConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    def __post_init__(self) -> None:
        fish = self.synth.fish
        if tuple(fish.shape) != tuple(self.rig.shape):
            raise ValueError(f"synth.fish.shape {list(fish.shape)} != rig.shape {list(self.rig.shape)}")
        if fish.frame_period_s != self.rig.frame_period_s:
            raise ValueError("synth.fish.frame_period_s must equal rig.frame_period_s")
        if self.controller.mqtt.rig != self.rig.name:
            raise ValueError("controller.mqtt.rig must equal rig.name (set [rig] name only)")


for _section in TRAINING_SECTIONS:   # after @dataclass, which removes the class attributes of its fields
    setattr(LoopcastConfig, _section, _TrainingSection(_section))


# Keys derived from the shared tables; setting them by hand is an error (they would be overwritten).
_DERIVED = {("synth", "fish", "shape"), ("synth", "fish", "frame_period_s"), ("controller", "forecasts"),
            ("controller", "mqtt", "host"), ("controller", "mqtt", "port"), ("controller", "mqtt", "rig"),
            ("controller", "mqtt", "security"),
            ("train_spikes", "fish", "frame_period_s"), ("train_spikes", "dff")}
# Thread counts that moved to [runtime]: derived from it, like the keys above.
_FROM_RUNTIME = {("pipeline", "forecast", "threads"): "runtime.onnxruntime_threads (runtime.torch_threads for "
                 "pipeline.forecast.runtime = \"torch\")",
                 ("pipeline", "preprocess", "spikes", "engine_threads"): "runtime.onnxruntime_threads"}


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
    """User-settable values -> the validated config with the shared values injected. The training
    sections are only checked to be tables here: see TRAINING_SECTIONS and `training_sections`."""
    data = apply_overrides(data, ())  # private copy
    for name in TRAINING_SECTIONS:
        if not isinstance(data.get(name, {}), dict):
            raise ConfigError(f"{name}: expected a table, got {type(data[name]).__name__}")
    for keys in _DERIVED:
        if _has(data, keys):
            raise ConfigError(f"'{'.'.join(keys)}' is derived; set it through [rig], [endpoints], [mqtt] "
                              f"or [pipeline.preprocess.dff]")
    for keys, where in _FROM_RUNTIME.items():
        if _has(data, keys):
            raise ConfigError(f"'{'.'.join(keys)}' moved to [runtime]: set {where}")
    rig = from_dict(RigConfig, data.get("rig", {}), "rig")
    endpoints = from_dict(EndpointsConfig, data.get("endpoints", {}), "endpoints")
    mqtt = from_dict(MqttSettings, data.get("mqtt", {}), "mqtt")
    runtime = from_dict(RuntimeConfig, data.get("runtime", {}), "runtime")
    engines_on = _table(data, ("pipeline", "forecast")).get("runtime", PipelineConfig().forecast.runtime)
    _put(data, ("pipeline", "forecast", "threads"),
         runtime.torch_threads if engines_on == "torch" else runtime.onnxruntime_threads)
    _put(data, ("pipeline", "preprocess", "spikes", "engine_threads"), runtime.onnxruntime_threads)
    _put(data, ("synth", "fish", "shape"), list(rig.shape))
    _put(data, ("synth", "fish", "frame_period_s"), rig.frame_period_s)
    _put(data, ("controller", "forecasts"), endpoints.forecasts)
    _put(data, ("controller", "mqtt", "host"), mqtt.host)
    _put(data, ("controller", "mqtt", "port"), mqtt.port)
    _put(data, ("controller", "mqtt", "rig"), rig.name)
    _put(data, ("controller", "mqtt", "security"), to_dict(mqtt.security))
    # the spike net learns the pipeline's own dF/F at the rig's frame rate
    _put(data, ("train_spikes", "fish", "frame_period_s"), rig.frame_period_s)
    _put(data, ("train_spikes", "dff"), _table(data, ("pipeline", "preprocess", "dff")))
    return from_dict(LoopcastConfig, data)


def training_sections(cfg: LoopcastConfig, *names: str) -> list[Any]:
    """Resolve the named training sections (all of them if none are named): import their config
    classes and validate them, raising ConfigError with the key named. The commands that train call it
    before they start (loopcast.cli.TRAINING_READ); the real-time commands never do."""
    unknown = [n for n in names if n not in TRAINING_SECTIONS]
    if unknown:
        raise ValueError(f"not training sections: {unknown} (those are {list(TRAINING_SECTIONS)})")
    return [getattr(cfg, n) for n in names or TRAINING_SECTIONS]


def training_table(cfg: LoopcastConfig, name: str) -> dict[str, Any]:
    """A training section as plain values without importing it: the table as loaded while it is
    unresolved (only the keys the config files and overrides set), every key once it is resolved."""
    value = cfg.__dict__[name]
    return to_dict(value.table) if isinstance(value, TrainingTable) else to_dict(value)


@dataclass(frozen=True)
class TrainEngineRef:
    """The [train] keys the real-time side reads, with TrainConfig's defaults (tests/test_defaults.py
    checks they agree): the registry entry `loopcast train` writes, `<model>-c<context>-h<horizon>`,
    which `loopcast run` serves when pipeline.forecast.engine is "". Read from the table, no import."""

    model: str = "nlinear"
    context: int = 4
    horizon: int = 8

    @classmethod
    def of(cls, cfg: LoopcastConfig) -> TrainEngineRef:
        table = training_table(cfg, "train")
        return from_dict(cls, {f.name: table[f.name] for f in dataclasses.fields(cls) if f.name in table}, "train")

    @property
    def name(self) -> str:
        return f"{self.model}-c{self.context}-h{self.horizon}"


def from_config(cfg: LoopcastConfig) -> dict[str, Any]:
    """The user-settable part of a resolved config (derived keys removed), as plain values. A training
    section that was not read is written as its table (`training_table`), without importing it."""
    data = {f.name: training_table(cfg, f.name) if f.name in TRAINING_SECTIONS else to_dict(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)}
    for keys in (*_DERIVED, *_FROM_RUNTIME):
        node = data
        for k in keys[:-1]:
            node = node.get(k, {})
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
