"""From a reader's raw records to examples in normal form: converted, counted, bad ones skipped.

Every reader yields `Raw` records, whatever its storage; `examples` converts them with the
source's format and maps (`itune.data.sources.formats`), so that a bad record is reported and
skipped alike for every kind of source. A `RecordPool` converts them again on demand, for sources
whose records are not held.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from itune.data.sources.formats import DataError, convert, detect_format
from itune.errors import ConfigError

ON_BAD_EXAMPLE = ("error", "skip")
_LOGGED_SKIPS = 5  # Skipped examples logged per source; the rest are only counted.


class Raw(NamedTuple):
    """One record as a reader found it, before conversion.

    ``index`` numbers it in its source (see `itune.data.sources.read_records`); ``origin`` is
    where it came from (``file:line``), ``location`` what an error about it names (a JSON list
    adds the record number); ``record`` is the decoded record, or the `DataError` that kept it
    from being decoded; ``source`` overrides the spec's name as the example's source.
    """

    index: int
    origin: str
    location: str
    record: Any
    source: str | None = None


@dataclasses.dataclass
class SourceStats:
    """What reading one source did: records read, skipped (by reason) and yielded."""

    name: str = ""
    read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    yielded: int = 0
    format: str = ""  # The format records were converted with (``auto``: the one detected).

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return f"{self.name}: {self.read} read, {self.yielded} yielded, skipped: {skipped}"


def start_reading(spec: Any, on_bad_example: str, stats: SourceStats | None) -> SourceStats:
    """Checks ``on_bad_example``; the stats to count reading ``spec`` in, named after it."""
    if on_bad_example not in ON_BAD_EXAMPLE:
        raise ConfigError(f"on_bad_example={on_bad_example!r}; expected one of {ON_BAD_EXAMPLE}")
    stats = stats if stats is not None else SourceStats()
    stats.name = stats.name or spec.name
    return stats


def examples(
    raws: Iterable[Raw], spec: Any, skip: bool, stats: SourceStats, log_skips: bool = True
) -> Iterator[tuple[int, dict]]:
    """``(index, example)`` for each raw record, converted as ``spec`` (its ``name``,
    ``format``, ``field_map`` and ``role_map``) says; under ``auto`` the format is read off the
    first record.

    With ``skip``, a bad record is counted in ``stats.skipped`` (the first few logged, unless
    not ``log_skips``) and skipped; a source whose format cannot be told raises in either mode.
    """
    fmt = None if spec.format == "auto" else spec.format
    for raw in raws:
        stats.read += 1
        try:
            if isinstance(raw.record, DataError):
                raise raw.record
            if fmt is None and isinstance(raw.record, dict):
                fmt = detect_format(raw.record, spec.field_map, raw.location)
            stats.format = fmt or spec.format
            example = convert(
                raw.record,
                fmt or spec.format,
                spec.field_map,
                spec.role_map,
                raw.source or spec.name,
                raw.origin,
                raw.location,
            )
        except DataError as e:
            if not skip or e.reason == "unknown format":
                raise
            stats.skipped[e.reason] += 1
            if log_skips and sum(stats.skipped.values()) <= _LOGGED_SKIPS:
                logging.warning("source %s: skipped %s", stats.name or spec.name, e)
            continue
        stats.yielded += 1
        yield raw.index, example


class RecordPool(Sequence):
    """Examples of a source read on demand: ``pool[i]`` reads record ``indices[i]`` from a
    reader's ``table`` (see `itune.data.sources.record_table`) and converts it, so that the
    examples are not held, only their indices (8 bytes each).

    The records must have been read and checked once (`examples`), converted then with ``fmt``;
    each is read, parsed and converted again each time it is looked up.
    """

    def __init__(self, table: Any, indices: Sequence[int], spec: Any, fmt: str):
        self.table, self.spec, self.fmt = table, spec, fmt
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record pool index {i} out of range (size {len(self)})")
        raw = self.table.raw(int(self.indices[i]))
        spec = self.spec
        return convert(
            raw.record,
            self.fmt,
            spec.field_map,
            spec.role_map,
            raw.source or spec.name,
            raw.origin,
            raw.location,
        )

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))
