"""The one config loader: TOML files -> frozen dataclasses, with dotted CLI overrides.

Every stage and model keeps a frozen config dataclass beside its code; this module turns a TOML
table into such a dataclass strictly (unknown keys and wrong types are errors that name the key),
applies `section.key=value` overrides, and writes the resolved config back to TOML so that every
run and every engine carries exactly what produced it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

import tomli_w

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for what records, manifests and NWB metadata hold beside plain JSON: numpy
    scalars and arrays (as numbers and lists), paths (as text), sets (sorted lists)."""
    import numpy as np
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning syntax errors into ConfigError with the path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as a TOML literal, else kept as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted override set (tables created as needed)."""
    out = _deepcopy_dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{k}' is a value, not a table")
            node = child
        node[keys[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, any other value in `top` replaces the one in `base`."""
    out = _deepcopy_dict(base)
    for k, v in top.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and wrong types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown key '{_join(where, k)}'{hint}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = (), section: str | None = None) -> T:
    """Load `cls` from a TOML file (optionally one table of it), then apply overrides."""
    data = load_toml(path) if path is not None else {}
    if section is not None:
        data = data.get(section, {})
    return from_dict(cls, apply_overrides(data, overrides), where=section or "")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain TOML-compatible values (tuples become lists, None is dropped)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_toml(obj: Any, path: str | Path) -> Path:
    """Write a dataclass (or mapping) as TOML; used to save resolved configs. The file is replaced whole
    (written beside it, then renamed), so a process reading it meanwhile sees the old or the new text, never
    a truncated one (`make demo`'s processes share one run directory's config.toml); an identical file is
    left as it is."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps(to_dict(obj))
    if p.is_file() and p.read_text() == text:
        return p
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: no type matches {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item = args[0]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        else:
            item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return _coerce_scalar(tp, value, where)


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _deepcopy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}
