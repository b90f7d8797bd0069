"""Instruction data from JSON, JSONL and Parquet files, Arrow datasets saved by ``datasets`` and
prepared TFDS datasets, read into one normal form.

One example in normal form::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
     "source": str, "tools": str | None, "origin": "path:line"}

A source is an entry of ``config.data.sources`` (`spec_from_config`): ``{"path": ...}`` for a
file, a glob or folder of Parquet shards or a saved Arrow dataset's folder, ``{"tfds": ...}`` for a
TFDS dataset (``origin`` is then ``file:row N`` or the TFDS split and index). The modules, one concern each:

- `readers`: `READERS`, the one table from a source to the reader of its storage, and
  `read_records` / `read_source` / `count_records`, which go through it;
- one reader per kind of storage: `jsonl` (one record per line, indexed by line offset),
  `json_array` (a JSON list, loaded whole; which of the two a file is comes from its first byte,
  not its name), `parquet` (one or many Parquet shards) and `arrow` (a ``save_to_disk`` folder),
  both through `arrow_rows`, and `tfds` (any prepared TFDS dataset);
- `formats`: the record formats (``alpaca``, ``messages``, ``sharegpt``, ``prompt_completion``,
  ``auto``) into the normal form, with field and role maps;
- `records`: a reader's raw records converted, counted, and, with ``on_bad_example="skip"``,
  bad ones skipped and counted in `SourceStats.skipped` by reason; `RecordPool`, examples read
  again on demand from a reader's table instead of held;
- `spec`: `SourceSpec`, a file entry; `tfds_prepare`: local files prepared as a TFDS dataset.

A bad record raises `DataError` (``file:line: field 'output': expected a string, got int``).
"""

from itune.data.sources.formats import (
    DEFAULT_ROLES,
    FIELDS,
    FORMATS,
    ROLES,
    DataError,
    convert_record,
    detect_format,
)
from itune.data.sources.readers import (
    READERS,
    Reader,
    count_records,
    read_records,
    read_source,
    reader_for,
    record_table,
    spec_from_config,
    specs_from_config,
)
from itune.data.sources.records import ON_BAD_EXAMPLE, Raw, RecordPool, SourceStats
from itune.data.sources.spec import SourceSpec, spec_from_values
from itune.data.sources.tfds import (
    DatasetNotPreparedError,
    TfdsSourceSpec,
    load_builder,
    prepared_datasets,
    read_tfds,
    tfds_spec_from_config,
)
from itune.data.sources.tfds_prepare import prepare_jsonl_dataset

__all__ = [
    "DEFAULT_ROLES",
    "FIELDS",
    "FORMATS",
    "ON_BAD_EXAMPLE",
    "READERS",
    "ROLES",
    "DataError",
    "DatasetNotPreparedError",
    "Raw",
    "Reader",
    "RecordPool",
    "SourceSpec",
    "SourceStats",
    "TfdsSourceSpec",
    "convert_record",
    "count_records",
    "detect_format",
    "load_builder",
    "prepare_jsonl_dataset",
    "prepared_datasets",
    "read_records",
    "read_source",
    "read_tfds",
    "reader_for",
    "record_table",
    "spec_from_config",
    "spec_from_values",
    "specs_from_config",
    "tfds_spec_from_config",
]
