"""Parquet files: one or many shards, as dataset hubs publish them, read with pyarrow.

A source's ``path`` is a Parquet file, a glob (``data/train-*.parquet``) or a folder of
``.parquet`` files; shards are read in the order of their sorted names, and a record's index
numbers it across them. Its ``origin`` is ``file:row N``, N its 0-based row in that file. Files
are told from others by their first bytes (``PAR1``), not their names; row counts come from the
files' footers, and a range of records reads only the row groups that hold it, a record batch at a
time.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from itune.data.sources.arrow_rows import BATCH_ROWS, Part, Rows, row_raw
from itune.data.sources.records import Raw

_MAGIC = b"PAR1"
_GLOB = frozenset("*?[")


def files(path: str) -> list[str]:
    """The Parquet files a source's ``path`` names, in order: the file, a glob's matches, or the
    ``.parquet`` files of a folder."""
    if _GLOB & set(path):
        return sorted(tf.io.gfile.glob(path))
    if tf.io.gfile.isdir(path):
        names = sorted(n for n in tf.io.gfile.listdir(path) if n.endswith(".parquet"))
        return [os.path.join(path, n) for n in names]
    return [path] if tf.io.gfile.exists(path) else []


def holds_parquet(path: str) -> bool:
    """Whether ``path`` names Parquet files: its first file opens with Parquet's magic bytes."""
    found = files(path)
    if not found or tf.io.gfile.isdir(found[0]):
        return False
    with tf.io.gfile.GFile(found[0], "rb") as f:
        return f.read(len(_MAGIC)) == _MAGIC


def count(spec: Any) -> int:
    """The number of rows of all the shards, from their footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files(spec.path))


def records(spec: Any, first: int, stop: int | None) -> Iterator[Raw]:
    """A `Raw` record per row ``first <= index < stop``, a record batch at a time."""
    for name, index, row_number, batches in _ranges(spec.path, first, stop):
        for batch in batches:
            for row in batch.to_pylist():
                yield row_raw(name, index, row_number, row)
                index, row_number = index + 1, row_number + 1


def table(spec: Any, first: int, stop: int | None) -> Rows:
    """Rows ``first .. stop - 1`` held as Arrow tables (about their uncompressed size), to be
    read again one at a time."""
    parts = []
    for name, index, row_number, batches in _ranges(spec.path, first, stop):
        schema = pq.ParquetFile(name).schema_arrow
        parts.append(Part(name, index, pa.Table.from_batches(list(batches), schema), row_number))
    return Rows(parts)


def _ranges(path: str, first: int, stop: int | None):
    """For each file holding records of the range: its name, the index and the row number in the
    file of its first record in the range, and the record batches of the range's rows there."""
    start = 0
    for name in files(path):
        meta = pq.ParquetFile(name).metadata
        end = start + meta.num_rows
        lo, hi = max(first, start), end if stop is None else min(stop, end)
        if lo < hi:
            yield name, lo, lo - start, _batches(name, meta, lo - start, hi - start)
        start = end


def _batches(name: str, meta: Any, lo: int, hi: int) -> Iterator[pa.RecordBatch]:
    """Rows ``lo .. hi - 1`` of a file, reading only the row groups that hold them."""
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    ends = np.cumsum(sizes)
    groups = [g for g in range(len(sizes)) if ends[g] > lo and ends[g] - sizes[g] < hi]
    row = int(ends[groups[0]] - sizes[groups[0]])
    parquet_file = pq.ParquetFile(name)
    for batch in parquet_file.iter_batches(batch_size=BATCH_ROWS, row_groups=groups):
        a, b = max(lo - row, 0), min(hi - row, batch.num_rows)
        if a < b:
            yield batch.slice(a, b - a)
        row += batch.num_rows
