"""Model registry: name -> (config dataclass, module class), and a strict builder.

MODELS holds the trace forecasters (what `[train] model` may name); SPIKE_MODELS the causal spike
inference networks (offline_training.spikes.train); VIDEO_MODELS the volumetric video forecasters.
`build_model` builds any of them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from loopcast.config import from_dict
from loopcast.models.baselines import LastValue, LastValueConfig, MeanBaseline, MeanBaselineConfig
from loopcast.models.linear import NLinear, NLinearConfig
from loopcast.models.spikenet import SpikeNet, SpikeNetConfig
from loopcast.models.tide import TiDE, TiDEConfig
from loopcast.models.tsmixer import TimeMix, TimeMixConfig, TSMixer, TSMixerConfig
from loopcast.models.video_unet import VideoUNet, VideoUNetConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "nlinear": (NLinearConfig, NLinear),
    "mean": (MeanBaselineConfig, MeanBaseline),
    "last": (LastValueConfig, LastValue),
    "tsmixer": (TSMixerConfig, TSMixer),
    "timemix": (TimeMixConfig, TimeMix),
    "tide": (TiDEConfig, TiDE),
}
SPIKE_MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "spikenet": (SpikeNetConfig, SpikeNet),
}
VIDEO_MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "video_unet": (VideoUNetConfig, VideoUNet),
}
_ALL = {**MODELS, **SPIKE_MODELS, **VIDEO_MODELS}


def config_fields(name: str) -> set[str]:
    """The field names of model `name`'s config dataclass."""
    if name not in _ALL:
        raise KeyError(f"unknown model {name!r}; known: {sorted(_ALL)}")
    return {f.name for f in dataclasses.fields(_ALL[name][0])}


def model_config(name: str, config: dict[str, Any]) -> Any:
    """Build the typed config of model `name` strictly (unknown keys and wrong types raise)."""
    if name not in _ALL:
        raise KeyError(f"unknown model {name!r}; known: {sorted(_ALL)}")
    return from_dict(_ALL[name][0], dict(config), where=f"model.{name}")


def check_model_options(name: str, options: dict[str, Any], derived: frozenset[str], set_by: str) -> None:
    """Raise ValueError if `options` (a training config's model_options) set a `derived` field (one the
    training config fills in: `set_by` says what does) or a field model `name` does not have."""
    fields = config_fields(name)
    clash = sorted(set(options) & derived)
    if clash:
        raise ValueError(f"model_options {clash} are set by {set_by}, not by model_options")
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"model_options {unknown} are not options of model {name!r}; "
                         f"its options: {sorted(fields - derived)}")


def build_model(name: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate model `name` from a plain mapping of its config fields."""
    cfg = model_config(name, config)
    return _ALL[name][1](cfg)
