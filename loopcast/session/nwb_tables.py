"""Helpers of the NWB export (`nwb`): table columns from arrays, and JSON trees (the config, the engine manifests,
the audit log's start record) as key/value rows that nwbinspector accepts and `read_metadata` turns back into the
trees.

Why rows and not one JSON string: nwbinspector reports a table cell holding a JSON object as a
BEST_PRACTICE_VIOLATION ("unpack dictionaries as additional rows or columns"). So each leaf of a tree is one row
of the `metadata` table: `source` (which tree), `path` (a JSON array of the keys and list indices from the root,
e.g. `["inputs", 0, "shape"]`: strings are dict keys, integers list indices, so nothing needs escaping and a dict
is never mistaken for a list) and `value` (the leaf as JSON text: a scalar, null, a list of scalars, `[]` or
`{}`). `unflatten(flatten(tree)) == tree` for every JSON tree.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from hdmf.common import (  # type: ignore[import-untyped]
    DynamicTable,
    VectorData,
    VectorIndex,
)

from loopcast.config import json_default

TIME_RESOLUTION_S = 1e-9   # every time is a time.time_ns() integer, counted from the session start


@dataclass(frozen=True)
class Col:
    """One table column: a 1-D array (or a list of str), or, with `ragged`, a list of 1-D sequences."""

    name: str
    description: str
    data: Any
    ragged: bool = False


def vector_columns(cols: Sequence[Col]) -> list[VectorData]:
    """hdmf columns (VectorData, plus a VectorIndex after each ragged one) for a DynamicTable's `columns`."""
    out: list[VectorData] = []
    for c in cols:
        if not c.ragged:
            out.append(VectorData(name=c.name, description=c.description, data=c.data))
            continue
        parts = [np.asarray(x, dtype=np.int64).ravel() for x in c.data]
        values = VectorData(name=c.name, description=c.description,
                            data=np.concatenate(parts) if parts else np.zeros(0, np.int64))
        ends = np.cumsum([p.size for p in parts]).astype(np.int64)
        out += [values, VectorIndex(name=f"{c.name}_index", data=ends, target=values)]
    return out


def text(values: Sequence[Any]) -> list[str]:
    """A text column: None -> ''."""
    return ["" if v is None else str(v) for v in values]


def floats(values: Sequence[Any]) -> np.ndarray:
    """A float64 column: None -> NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def ints(values: Sequence[Any], missing: int = -1) -> np.ndarray:
    """An int64 column: None -> `missing`."""
    return np.array([missing if v is None else int(v) for v in values], dtype=np.int64)


def bools(values: Sequence[Any]) -> np.ndarray:
    """A bool column: None -> False."""
    return np.array([bool(v) for v in values], dtype=bool)


def to_json(value: Any) -> str:
    """Compact JSON text of a leaf (numpy scalars and arrays, paths as their plain values)."""
    return json.dumps(value, separators=(",", ":"), default=json_default)


def flatten(tree: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[list[str | int], Any]]:
    """(path, leaf) of every leaf of a JSON tree: non-empty dicts and lists holding containers are descended."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from flatten(value, (*prefix, str(key)))
    elif isinstance(tree, list | tuple) and any(isinstance(x, dict | list | tuple) for x in tree):
        for i, value in enumerate(tree):
            yield from flatten(value, (*prefix, i))
    else:
        yield list(prefix), tree


def _put(node: Any, path: Sequence[str | int], value: Any) -> Any:
    key, rest = path[0], path[1:]
    if node is None:
        node = [] if isinstance(key, int) else {}
    if isinstance(key, int):
        node.extend([None] * (key + 1 - len(node)))
        child = node[key]
    else:
        child = node.get(key)
    node[key] = _put(child, rest, value) if rest else value
    return node


def unflatten(rows: Sequence[tuple[Sequence[str | int], Any]]) -> Any:
    """The tree `flatten` came from."""
    root: Any = None
    for path, value in rows:
        if not path:
            return value
        root = _put(root, path, value)
    return root


def metadata_table(trees: dict[str, Any]) -> DynamicTable:
    """The `metadata` table: one row per leaf of each named tree (see the module docstring)."""
    source: list[str] = []
    paths: list[str] = []
    values: list[str] = []
    for name, tree in trees.items():
        for path, leaf in flatten(tree):
            source.append(name)
            paths.append(to_json(path))
            values.append(to_json(leaf))
    cols = [Col("source", "which record the row belongs to (e.g. config, engine/<version>, audit_start)", source),
            Col("path", "JSON array of the dict keys (strings) and list indices (integers) from the root", paths),
            Col("value", "the leaf as JSON text", values)]
    return DynamicTable(name="metadata", description="The session's configuration and provenance as key/value rows "
                        "(read back with loopcast.session.nwb_tables.read_metadata).", columns=vector_columns(cols))


def read_metadata(table: DynamicTable) -> dict[str, Any]:
    """{source: tree} of a `metadata` table read back from a file."""
    rows: dict[str, list[tuple[list[str | int], Any]]] = {}
    for source, path, value in zip(table["source"].data[:], table["path"].data[:], table["value"].data[:]):
        name = source.decode() if isinstance(source, bytes) else str(source)
        rows.setdefault(name, []).append((json.loads(path), json.loads(value)))
    return {name: unflatten(r) for name, r in rows.items()}
