"""Where the code's config defaults and a config file disagree, key by key.

    python -m loopcast.defaults                      # code defaults vs configs/loopcast.toml
    python -m loopcast.defaults -c a.toml -c b.toml  # vs those files layered (as `loopcast -c ... -c ...`)

Both sides are resolved as a command resolves them (`loopcast.settings.resolve`: derived keys injected,
every training section imported and validated, so this imports torch): the code defaults are what a
command gets from an empty config file, the other side what it gets from the files. Each differing key
is printed as `key: <code> -> <files>`; the exit status is 1 if any differ. tests/test_defaults.py
keeps configs/loopcast.toml and the code's defaults equal with `drift()`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loopcast.config import to_dict

ABSENT = "<absent>"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> {"a.b.c": value}; an empty table stays one key (its value {})."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def resolved(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The fully resolved config (every training section too) of these files, flattened; no files: the
    code's defaults alone."""
    from loopcast.settings import load_settings, resolve, training_sections
    cfg = load_settings(list(paths), overrides) if paths else resolve({})
    training_sections(cfg)
    return flatten(to_dict(cfg))


def diff(code: dict[str, Any], files: dict[str, Any]) -> list[str]:
    """`key: <code> -> <files>` for every key whose values differ (ABSENT where one side lacks it)."""
    return [f"{k}: {code.get(k, ABSENT)!r} -> {files.get(k, ABSENT)!r}" for k in sorted(code.keys() | files.keys())
            if code.get(k, ABSENT) != files.get(k, ABSENT)]


def drift(paths: Sequence[str | Path] | None = None) -> list[str]:
    """Keys where the code's defaults and the files (default: configs/loopcast.toml) disagree."""
    from loopcast.settings import DEFAULT_CONFIG
    return diff(resolved(), resolved(paths or [DEFAULT_CONFIG]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loopcast.defaults", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", default=[],
                        help="TOML config (repeatable; default: configs/loopcast.toml)")
    args = parser.parse_args(argv)
    lines = drift(args.config or None)
    for line in lines:
        print(line)
    print(f"{len(lines)} key(s) differ between the code's defaults and "
          f"{' + '.join(args.config) or 'configs/loopcast.toml'}", file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
