"""Tables that grow along their first axis in a zarr v3 group, for a record that must survive a crash.

A `GrowingTable` is a zarr group of arrays (its columns) that share their first axis (rows). Rows are
buffered in memory, one chunk at a time; `flush` writes the rows buffered since the last flush into the
current chunk of every column and only then commits the new row count in the group's attribute `rows`.
zarr's local store writes every file through a temporary file and a rename, so after a `kill -9` each
chunk and the attribute hold either their old or their new content: a reader that reads `rows` rows gets
exactly what was flushed before the kill (`read_table`). The arrays' shape is a capacity that grows by
doubling (a grow touches only the metadata); `close` shrinks them to `rows` and marks the table complete.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

CHUNK_BYTES = 1 << 20   # default target chunk size: few files, yet cheap to rewrite at every flush
MAX_CHUNK_ROWS = 1024   # a flush rewrites the chunk it is filling: keep it small for tables of small rows


@dataclass(frozen=True)
class Column:
    """One column: dtype and the shape of one row (() for a scalar per row)."""

    dtype: str
    tail: tuple[int, ...] = ()

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.tail, dtype=np.int64)))


class GrowingTable:
    """Columns sharing a first axis, appended row by row, flushed in chunks (see the module docstring)."""

    def __init__(self, parent: zarr.Group, name: str, columns: dict[str, Column],
                 attrs: dict[str, Any] | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        row_bytes = sum(c.row_bytes for c in columns.values())
        biggest = max(c.row_bytes for c in columns.values())
        self.chunk_rows = int(max(1, min(MAX_CHUNK_ROWS, chunk_bytes // max(1, biggest))))
        self.row_bytes = row_bytes
        self.group = parent.create_group(name, attributes={**(attrs or {}), "rows": 0})
        self.columns = columns
        self.capacity = 4 * self.chunk_rows
        self.arrays = {k: self.group.create_array(k, shape=(self.capacity, *c.tail), dtype=c.dtype,
                                                  chunks=(self.chunk_rows, *c.tail), fill_value=0)
                       for k, c in columns.items()}
        self._buf = {k: np.zeros((self.chunk_rows, *c.tail), c.dtype) for k, c in columns.items()}
        self.rows = 0          # committed (flushed) rows
        self._start = 0        # first row of the chunk being filled
        self._n = 0            # rows of that chunk in the buffer
        self._dirty = False

    def append(self, **values: Any) -> None:
        """One row: a value (or a row array of the column's tail shape) per column."""
        for k, buf in self._buf.items():
            buf[self._n] = values[k]
        self._n += 1
        self._dirty = True
        if self._n == self.chunk_rows:
            self.flush()
            self._start += self.chunk_rows
            self._n = 0

    def flush(self) -> None:
        """Write the buffered rows of the current chunk, then commit the row count."""
        if not self._dirty:
            return
        end = self._start + self._n
        if end > self.capacity:
            self.capacity = max(2 * self.capacity, end)
            for k, arr in self.arrays.items():
                arr.resize((self.capacity, *self.columns[k].tail))
        for k, arr in self.arrays.items():
            arr[self._start:end] = self._buf[k][:self._n]
        self.rows = end
        self.group.attrs["rows"] = end
        self._dirty = False

    def set_attrs(self, **attrs: Any) -> None:
        self.group.attrs.update(attrs)

    def close(self) -> None:
        """Flush, shrink every column to the rows written, and mark the table complete."""
        self.flush()
        for k, arr in self.arrays.items():
            arr.resize((self.rows, *self.columns[k].tail))
        self.group.attrs.update({"rows": self.rows, "complete": True})


def read_table(group: zarr.Group) -> dict[str, np.ndarray]:
    """Every column of a table group, `rows` rows each (the committed count: a killed writer's last flush)."""
    rows = int(group.attrs.get("rows", 0))   # type: ignore[arg-type]
    out: dict[str, np.ndarray] = {}
    for name, arr in group.arrays():
        out[name] = np.asarray(arr[:rows])
    return out
