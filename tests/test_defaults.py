"""One source of defaults: the code's config defaults equal configs/loopcast.toml, key by key, so
`-c my-layer.toml` runs what `-c configs/loopcast.toml -c my-layer.toml` runs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loopcast.config import dump_toml, load_config
from loopcast.defaults import diff, drift, resolved
from loopcast.settings import DEFAULT_CONFIG, TrainEngineRef, resolve

CONFIGS = DEFAULT_CONFIG.parent
LAYERS = sorted(p for p in CONFIGS.glob("*.toml") if p != DEFAULT_CONFIG)


def test_code_defaults_equal_configs_loopcast_toml() -> None:
    lines = drift()
    assert not lines, ("the code's defaults (left) and configs/loopcast.toml (right) disagree; change the "
                       "dataclass default or the file (python -m loopcast.defaults):\n  " + "\n  ".join(lines))


def test_the_drift_check_sees_a_changed_and_an_added_key(tmp_path: Path) -> None:
    changed = tmp_path / "changed.toml"
    changed.write_text(DEFAULT_CONFIG.read_text().replace("max_per_minute = 20", "max_per_minute = 21"))
    assert drift([changed]) == ["controller.interlocks.max_per_minute: 20 -> 21"]
    added = tmp_path / "added.toml"
    added.write_text("[train_sbm.model_options]\nffn_mult = 2\n")
    assert drift([DEFAULT_CONFIG, added]) == ["train_sbm.model_options.ffn_mult: '<absent>' -> 2"]


@pytest.mark.parametrize("layer", [*LAYERS, "user"], ids=[*(p.stem for p in LAYERS), "user"])
def test_a_layer_alone_runs_what_it_runs_on_the_default_file(layer: Path | str, tmp_path: Path) -> None:
    """Every shipped layer, and a user's layer that sets one key of a table with a default (the SBM's
    model_options: it merges onto the default table, as it merges onto the file's)."""
    if layer == "user":
        layer = tmp_path / "user.toml"
        layer.write_text("[train_sbm.model_options]\nd_model = 64\n[controller.policy]\nlevel = 0.1\n")
    alone, on_defaults = resolved([layer]), resolved([DEFAULT_CONFIG, layer])
    assert diff(alone, on_defaults) == []


def test_the_train_keys_run_reads_have_train_config_defaults() -> None:
    """TrainEngineRef names `loopcast run`'s default engine without importing TrainConfig."""
    from loopcast.offline_training.trace.train import TrainConfig
    ref, train = TrainEngineRef(), TrainConfig()
    assert {f.name: getattr(train, f.name) for f in dataclasses.fields(ref)} == dataclasses.asdict(ref)


def test_a_training_table_layers_onto_its_class_defaults(tmp_path: Path) -> None:
    """In a config, one key of [train_sbm.model_options] keeps the default's other keys (as on
    configs/loopcast.toml); a config class saved on its own (an engine's config.toml) loads back exactly."""
    from loopcast.offline_training.sbm.config import SBMTrainConfig
    cfg = resolve({"train_sbm": {"model_options": {"d_model": 64}}})
    assert cfg.train_sbm.model_options == {**SBMTrainConfig().model_options, "d_model": 64}
    own = SBMTrainConfig(model_options={"d_model": 16, "n_heads": 2})
    assert load_config(SBMTrainConfig, dump_toml(own, tmp_path / "config.toml")) == own
