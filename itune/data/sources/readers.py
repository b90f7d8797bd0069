"""Which reader reads a source: `READERS`, one table from a source's spec to the module that
reads its kind of storage, and the reading functions that go through it.

A reader module has two functions: ``count(spec)``, the number of record indices of the source,
and ``records(spec, first, stop)``, a `Raw` record for each index ``first <= index < stop``
(``stop`` None: to the end), reading no more of the storage than it must. One that can read a
record again by its index also has ``table(spec, first, stop)``: an object with that range's
``records()`` and ``raw(index)`` (a `Raw` record, or None for an index that holds none), so that
the records need not be held once checked (`record_table`). A config entry is a spec of the first
row whose ``key`` it has; a spec is read by the first row of its class that ``reads`` it. Adding a
kind of storage is one reader module and one row here.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Iterator

import tensorflow as tf

from itune.data.sources import arrow, json_array, jsonl, parquet, tfds
from itune.data.sources.records import SourceStats, examples, start_reading
from itune.data.sources.spec import SourceSpec
from itune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Reader:
    """A kind of storage: the specs it reads and the module that reads them."""

    name: str
    key: str  # The key that makes a ``config.data.sources`` entry a spec of ``spec``.
    spec: type
    reads: Callable[[Any], bool]  # Whether it reads a spec of its class (its file, say).
    module: types.ModuleType  # count(spec), records(spec, first, stop) [, table(spec, ...)].


READERS = (
    Reader("tfds", "tfds", tfds.TfdsSourceSpec, lambda spec: True, tfds),
    Reader("arrow", "path", SourceSpec, lambda s: arrow.holds_dataset(s.path), arrow),
    # A file's kind is read off its content, not its name: Parquet opens with "PAR1", a JSON
    # list with "[".
    Reader("parquet", "path", SourceSpec, lambda s: parquet.holds_parquet(s.path), parquet),
    Reader("json_array", "path", SourceSpec, lambda s: json_array.holds_array(s.path), json_array),
    Reader("jsonl", "path", SourceSpec, lambda spec: True, jsonl),
)


def spec_from_config(cfg: Any, name: str | None = None) -> Any:
    """A ``config.data.sources`` entry as the spec of the first `READERS` row whose key it has.

    >>> spec_from_config({"path": "train.jsonl", "format": "alpaca"}, name="mine").path
    'train.jsonl'
    >>> type(spec_from_config({"tfds": "itune_chat/mine:1.0.0"}, name="mine")).__name__
    'TfdsSourceSpec'
    """
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for reader in READERS:
        if reader.key in values:
            return reader.spec.from_config(values, name)
    keys = sorted({reader.key for reader in READERS})
    raise ConfigError(f"source {values.get('name', name)!r}: needs one of the keys {keys}")


def specs_from_config(sources: Any) -> list[Any]:
    """``config.data.sources`` (name -> entry, or a list of entries) as specs."""
    if hasattr(sources, "items"):
        return [spec_from_config(cfg, name=name) for name, cfg in sources.items()]
    return [spec_from_config(cfg) for cfg in sources]


def reader_for(spec: Any) -> Reader:
    """The `READERS` row that reads ``spec``; a file that does not exist raises here."""
    # A path is a file, a folder, or a glob of Parquet shards.
    if isinstance(spec, SourceSpec) and not (
        tf.io.gfile.exists(spec.path) or parquet.files(spec.path)
    ):
        raise FileNotFoundError(
            f"source {spec.name!r}: no such file: {spec.path}; correct its path in data.sources"
        )
    if isinstance(spec, SourceSpec) and tf.io.gfile.isdir(spec.path):
        if not (arrow.holds_dataset(spec.path) or parquet.holds_parquet(spec.path)):
            raise ConfigError(
                f"source {spec.name!r}: the folder {spec.path} holds neither Parquet files nor a "
                "dataset saved by save_to_disk"
            )
    for reader in READERS:
        if isinstance(spec, reader.spec) and reader.reads(spec):
            return reader
    raise TypeError(f"no reader for {spec!r}")


def count_records(spec: Any) -> int:
    """The number of record indices of a source (see `read_records`): a JSONL file's lines, a
    JSON list's records, a TFDS split's examples, the rows of Parquet files or an Arrow dataset."""
    return reader_for(spec).module.count(spec)


def record_table(spec: Any, first: int = 0, stop: int | None = None) -> Any:
    """The records ``first <= index < stop`` of a source, to be read in order and again one at a
    time by index (see `READERS`); None for a kind of storage that cannot (a JSON list, TFDS)."""
    module = reader_for(spec).module
    return module.table(spec, first, stop) if hasattr(module, "table") else None


def read_records(
    spec: Any,
    on_bad_example: str = "error",
    stats: SourceStats | None = None,
    first: int = 0,
    stop: int | None = None,
    *,
    log_skips: bool = True,
    table: Any = None,
) -> Iterator[tuple[int, dict]]:
    """``(record index, example)`` for the records ``first <= index < stop`` of a source.

    A record's index is its 0-based line in a JSONL file (a blank line is a record that yields
    nothing), its 0-based position in a JSON list or a TFDS split, so `count_records` tells the
    range of indices without parsing a JSONL file. Records outside the range are not parsed (a
    JSON list is still decoded whole) and not counted in ``stats``. ``on_bad_example="skip"``
    skips bad records and counts them in ``stats.skipped`` (logging the first few, unless not
    ``log_skips``). Problems with a source as a whole raise in either mode: a JSON list that
    does not parse (there is no next record to go on from), or ``auto`` finding no known format
    in the first record. A ``table`` of the same range (`record_table`) is read instead of the
    storage.
    """
    stats = start_reading(spec, on_bad_example, stats)
    if table is not None:
        raws = table.records()
    else:
        raws = reader_for(spec).module.records(spec, first, stop)
    return examples(raws, spec, on_bad_example == "skip", stats, log_skips)


def read_source(
    spec: Any, on_bad_example: str = "error", stats: SourceStats | None = None
) -> Iterator[dict]:
    """The examples of one source in normal form, in its order (see `read_records`)."""
    return (example for _, example in read_records(spec, on_bad_example, stats))
