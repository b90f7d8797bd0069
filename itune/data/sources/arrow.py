"""Arrow datasets as ``datasets.Dataset.save_to_disk`` writes them, read with pyarrow alone.

A source's ``path`` is the folder (``state.json`` names its data files, Arrow IPC streams, in
order). Local files are memory-mapped, so a range of records costs no memory beyond the pages
read; a record's index is its row in the dataset (``dataset[i]``), and its ``origin`` is
``folder:row i``. A folder of a ``DatasetDict`` (``dataset_dict.json``) is refused with the
split folders to name instead.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import pyarrow as pa
import tensorflow as tf

from itune.data.sources.arrow_rows import Part, Rows
from itune.data.sources.formats import DataError
from itune.data.sources.records import Raw

_STATE = "state.json"
_DATASET_DICT = "dataset_dict.json"


def holds_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a dataset or a dataset dict)."""
    return tf.io.gfile.isdir(path) and any(
        tf.io.gfile.exists(os.path.join(path, name)) for name in (_STATE, _DATASET_DICT)
    )


def data_files(path: str) -> list[str]:
    """The dataset's Arrow files, in order, from its ``state.json``."""
    state_file = os.path.join(path, _STATE)
    if not tf.io.gfile.exists(state_file):
        with tf.io.gfile.GFile(os.path.join(path, _DATASET_DICT)) as f:
            splits = json.load(f).get("splits", [])
        folders = ", ".join(os.path.join(path, s) for s in splits)
        problem = f"is a DatasetDict of splits {splits}; name one split's folder: {folders}"
        raise DataError(path, problem, reason="dataset dict")
    with tf.io.gfile.GFile(state_file) as f:
        state = json.load(f)
    return [os.path.join(path, entry["filename"]) for entry in state["_data_files"]]


def _open(name: str) -> pa.Table:
    """An Arrow stream file as a table; memory-mapped (no copy) when local."""
    if "://" in name:
        with tf.io.gfile.GFile(name, "rb") as f:
            source = pa.py_buffer(f.read())
    else:
        source = pa.memory_map(name)
    return pa.ipc.open_stream(source).read_all()


def _rows(path: str, first: int = 0, stop: int | None = None) -> Rows:
    parts, start = [], 0
    for name in data_files(path):
        table = _open(name)
        end = start + table.num_rows
        lo, hi = max(first, start), end if stop is None else min(stop, end)
        if lo < hi:
            parts.append(Part(path, lo, table.slice(lo - start, hi - lo), lo))
        start = end
    return Rows(parts)


def count(spec: Any) -> int:
    """The number of rows of the dataset."""
    return len(_rows(spec.path))


def records(spec: Any, first: int, stop: int | None) -> Iterator[Raw]:
    """A `Raw` record per row ``first <= index < stop``, a record batch at a time."""
    return _rows(spec.path, first, stop).records()


def table(spec: Any, first: int, stop: int | None) -> Rows:
    """Rows ``first .. stop - 1``, memory-mapped, to be read again one at a time."""
    return _rows(spec.path, first, stop)
