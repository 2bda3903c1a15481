"""The one config loader: strict TOML -> dataclasses, dotted overrides, layering, saved configs."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loopcast.config import ConfigError, apply_overrides, dump_toml, from_dict, load_toml, parse_override
from loopcast.settings import (
    DEFAULT_CONFIG,
    TRAINING_SECTIONS,
    from_config,
    load_settings,
    resolve,
    training_sections,
    with_overrides,
)

BROKEN = Path(__file__).resolve().parent / "broken" / "configs"
CASES = sorted(BROKEN.glob("*.toml"))


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outer:
    n: int = 1
    inner: Inner = field(default_factory=Inner)
    label: str | None = None


def test_default_config_loads_and_injects_shared_values() -> None:
    cfg = load_settings()
    assert cfg.synth.fish.shape == cfg.rig.shape
    assert cfg.controller.mqtt.rig == cfg.rig.name
    assert cfg.controller.forecasts == cfg.endpoints.forecasts
    assert cfg.controller.mqtt.port == cfg.mqtt.port


def test_overrides_reach_nested_and_derived_values() -> None:
    cfg = load_settings(overrides=["rig.shape=[32, 24, 8]", "mqtt.port=2883", "sim.speed=0",
                                   'rig.name="rigB"'])
    assert cfg.synth.fish.shape == (32, 24, 8)
    assert cfg.controller.mqtt.port == 2883 and cfg.controller.mqtt.rig == "rigB"
    assert cfg.sim.speed == 0.0
    again = with_overrides(cfg, ["pipeline.preprocess.dff.window=50"])
    assert again.pipeline.preprocess.dff.window == 50 and again.synth.fish.shape == (32, 24, 8)


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_settings(overrides=["train.context=16", "controller.policy.level=0.3"])
    path = dump_toml(from_config(cfg), tmp_path / "config.toml")
    assert load_settings(path) == cfg


def test_a_saved_config_is_replaced_whole_never_rewritten_in_place(tmp_path: Path) -> None:
    """`make demo`'s three processes share a run directory and each saves the config it read: writing in place
    let one read a truncated file as the defaults (a CI run's sim published on the default endpoint). A reader
    holding the old file keeps reading the old text; an identical config leaves the file alone."""
    path = dump_toml(from_config(load_settings()), tmp_path / "config.toml")
    with open(path) as reader:
        first = path.stat().st_ino
        dump_toml(from_config(load_settings(overrides=["sim.speed=3.0"])), path)
        assert path.stat().st_ino != first, "rewritten in place"
        assert "speed = 3.0" not in reader.read()
    second = path.stat()
    dump_toml(from_config(load_settings(overrides=["sim.speed=3.0"])), path)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (second.st_ino, second.st_mtime_ns)
    assert load_settings(path).sim.speed == 3.0 and not list(tmp_path.glob(".*.tmp"))


def test_later_files_win(tmp_path: Path) -> None:
    top = tmp_path / "top.toml"
    top.write_text("[sim]\nspeed = 4.0\n")
    cfg = load_settings([DEFAULT_CONFIG, top])
    assert cfg.sim.speed == 4.0 and cfg.rig.name == load_settings().rig.name


def test_training_sections_load_as_tables_and_resolve_when_read(tmp_path: Path) -> None:
    """Loading never imports the training code: each training section is kept as its table (and saved
    so by the commands that do not train) until it is read."""
    from loopcast.config import load_toml
    from loopcast.settings import TrainingTable, new_run_dir, training_table
    cfg = load_settings(overrides=["train.context=16"])
    assert all(isinstance(cfg.__dict__[name], TrainingTable) for name in TRAINING_SECTIONS)
    saved = load_toml(new_run_dir(cfg, "run", str(tmp_path / "run")) / "config.toml")
    assert saved["train"] == training_table(cfg, "train") == {**load_toml(DEFAULT_CONFIG)["train"], "context": 16}
    assert "dff" not in saved["train_spikes"] and "frame_period_s" not in saved["train_spikes"]["fish"]  # derived
    assert cfg.train.context == 16 and type(cfg.train).__name__ == "TrainConfig"
    assert training_table(cfg, "train")["max_context"] == cfg.train.max_context   # every key once resolved
    assert cfg.train_spikes.fish.frame_period_s == cfg.rig.frame_period_s         # derived keys still injected
    assert cfg.train_spikes.dff == cfg.pipeline.preprocess.dff
    assert load_settings(new_run_dir(cfg, "train", str(tmp_path / "train")) / "config.toml") == cfg
    with pytest.raises(ConfigError, match="train_sbm: expected a table, got int"):
        load_settings(overrides=["train_sbm=3"])
    with pytest.raises(ValueError, match="not training sections"):
        training_sections(cfg, "pipeline")


def test_strict_types_and_unknown_keys() -> None:
    assert from_dict(Outer, {"n": 2, "inner": {"rate": 3, "names": ["a"]}}) == Outer(2, Inner(3.0, ("a",)))
    with pytest.raises(ConfigError, match=r"unknown key 'inner.rat' \(did you mean 'rate'\?\)"):
        from_dict(Outer, {"inner": {"rat": 1.0}})
    with pytest.raises(ConfigError, match="n: expected an integer"):
        from_dict(Outer, {"n": 1.5})
    with pytest.raises(ConfigError, match=r"inner.names\[0\]: expected a string"):
        from_dict(Outer, {"inner": {"names": [1]}})


def test_override_parsing() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=hello") == (["a"], "hello")   # not TOML: kept as a string
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="is a value, not a table"):
        apply_overrides({"a": 1}, ["a.b=2"])


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_broken_config_gives_its_error(path: Path) -> None:
    """Loading reports it, unless it is in a training section: those load as tables and are reported
    when resolved, as every command that trains does before it starts (loopcast.cli.TRAINING_READ)."""
    header = re.match(r"# expect: (.*)", path.read_text().splitlines()[0])
    assert header is not None, f"{path.name} lacks its '# expect:' line"
    expected = header.group(1)
    with pytest.raises(ConfigError) as err:
        base = load_toml(DEFAULT_CONFIG)
        from loopcast.config import merge_dicts
        cfg = resolve(merge_dicts(base, load_toml(path)))
        sections = [k for k in load_toml(path) if k in TRAINING_SECTIONS]
        assert sections, f"{path.name} loaded without an error, yet it breaks no training section"
        training_sections(cfg, *sections)
    assert expected in str(err.value), str(err.value)
