"""Rows of Arrow tables as `Raw` records: what the Parquet and Arrow dataset readers share.

A source of this kind is a sequence of parts (a Parquet file, a data file of a saved dataset),
each an Arrow table whose rows are records, numbered on from the parts before it. Rows become
Python values a record batch at a time in order (`Rows.records`), or one row at a time by index
(`Rows.raw`), so the records themselves are never held as Python objects.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import pyarrow as pa

from itune.data.sources.records import Raw

BATCH_ROWS = 1024  # Rows turned into Python values at once when reading in order.


@dataclasses.dataclass(frozen=True)
class Part:
    """One table of a source: its rows are records ``first, first + 1, ...`` of the source."""

    name: str  # What origins name: the file, or the dataset's folder.
    first: int  # The source's index of the table's row 0.
    table: pa.Table
    row_base: int  # The row number origins give the table's row 0.


class Rows:
    """The records of consecutive `Part` tables, read in order or one at a time by index."""

    def __init__(self, parts: list[Part]):
        self.parts = [p for p in parts if p.table.num_rows]
        self._starts = np.array([p.first for p in self.parts], np.int64)

    def __len__(self) -> int:
        return sum(p.table.num_rows for p in self.parts)

    def records(self) -> Iterator[Raw]:
        """A `Raw` record per row, a record batch of `BATCH_ROWS` rows converted at a time."""
        for part in self.parts:
            index = part.first
            for batch in part.table.to_batches(max_chunksize=BATCH_ROWS):
                for row in batch.to_pylist():
                    yield row_raw(part.name, index, part.row_base + index - part.first, row)
                    index += 1

    def raw(self, index: int) -> Raw:
        """Record ``index`` of the source, which one of the parts must hold."""
        part = self.parts[int(np.searchsorted(self._starts, index, side="right")) - 1]
        row = part.table.slice(index - part.first, 1).to_pylist()[0]
        return row_raw(part.name, index, part.row_base + index - part.first, row)


def row_raw(name: str, index: int, row_number: int, row: dict) -> Raw:
    """Record ``index`` of a source, row ``row_number`` of ``name``, as a `Raw` record."""
    origin = f"{name}:row {row_number}"
    return Raw(index, origin, origin, row)
