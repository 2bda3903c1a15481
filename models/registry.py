"""Model registry: name -> (config dataclass, module class), and a strict builder."""
from __future__ import annotations

from typing import Any

from torch import nn

from loopcast.config import from_dict
from models.baselines import LastValue, LastValueConfig, MeanBaseline, MeanBaselineConfig
from models.linear import NLinear, NLinearConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "nlinear": (NLinearConfig, NLinear),
    "mean": (MeanBaselineConfig, MeanBaseline),
    "last": (LastValueConfig, LastValue),
}


def model_config(name: str, config: dict[str, Any]) -> Any:
    """Build the typed config of model `name` strictly (unknown keys and wrong types raise)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return from_dict(MODELS[name][0], dict(config), where=f"model.{name}")


def build_model(name: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate model `name` from a plain mapping of its config fields."""
    cfg = model_config(name, config)
    return MODELS[name][1](cfg)
