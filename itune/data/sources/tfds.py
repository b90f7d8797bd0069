"""Prepared TFDS datasets as sources: any dataset TFDS can load from a ``data_dir``, converted
into the normal form like a file's records (``alpaca`` / ``messages`` / ``sharegpt`` /
``prompt_completion``, with a field map).

In ``config.data.sources`` such a source is an entry with a ``tfds`` key (see `TfdsSourceSpec`)::

    {"name": "mydata", "tfds": "itune_chat/mydata:1.0.0", "split": "train",
     "data_dir": "/data/tfds"}

Local files become such a dataset with `itune.data.sources.tfds_prepare`. An example's
``origin`` is ``tfds:<name>/<version>/<split>#<index>``, or for an ``itune_chat`` dataset the
``file:line`` it was prepared from. Nothing is downloaded unless ``try_gcs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from itune.data.sources.formats import DataError
from itune.data.sources.records import Raw, SourceStats, examples, start_reading
from itune.data.sources.spec import SourceSpec, spec_from_values
from itune.errors import ConfigError

BUILDER_NAME = "itune_chat"  # The builder of `itune.data.sources.tfds_prepare`.


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset that is not prepared in the data_dir it was looked for in."""


@contextlib.contextmanager
def tfds_temp_folders_removed() -> Iterator[None]:
    """Keeps the folders TFDS makes in the system temp dir inside one that is removed on exit.

    A builder of a dataset not yet prepared makes a ``tmp*tfds`` folder there for metadata from
    its GCS bucket (`tfds.core.DatasetInfo.initialize_from_bucket`) and leaves it behind.
    """
    with tempfile.TemporaryDirectory() as scratch:
        system_temp, tempfile.tempdir = tempfile.tempdir, scratch
        try:
            yield
        finally:
            tempfile.tempdir = system_temp


def read_tfds(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    field_map: Mapping[str, str] | None = None,
    format: str = "auto",
    try_gcs: bool = False,
    *,
    role_map: Mapping[str, str] | None = None,
    source: str | None = None,
    on_bad_example: str = "error",
    stats: SourceStats | None = None,
) -> Iterator[dict]:
    """The examples of a prepared TFDS dataset's ``split`` in normal form, in TFDS's read order.

    ``name`` is what `tfds.load` takes (``"itune_chat/mydata:1.0.0"``), ``split`` may slice
    (``"train[:10%]"``). Records are converted as `read_source` converts a file's, with the
    format read off the first record under ``auto``; ``origin`` is
    ``tfds:<name>/<version>/<split>#<index>``, and ``source`` defaults to ``name``. Examples of
    an ``itune_chat`` dataset keep the ``origin`` and ``source`` they were prepared with (pass
    ``source`` to rename them). Nothing is downloaded unless ``try_gcs``; a dataset that is not
    prepared under ``data_dir`` raises `DatasetNotPreparedError`.
    """
    maps = dict(field_map or {}), dict(role_map or {})
    spec = TfdsSourceSpec(source or name, name, split, data_dir, format, *maps, try_gcs=try_gcs)
    stats = start_reading(spec, on_bad_example, stats)
    raws = records(spec, 0, None, keep_name=source is None)
    return (example for _, example in examples(raws, spec, on_bad_example == "skip", stats))


def records(
    spec: TfdsSourceSpec, first: int, stop: int | None, keep_name: bool = False
) -> Iterator[Raw]:
    """A `Raw` record per record ``first <= index < stop`` of a TFDS source; only those are
    read from disk (the split is sliced). ``keep_name``: examples of an ``itune_chat`` dataset
    keep the source name they were prepared with."""
    builder = load_builder(spec.tfds, spec.data_dir, spec.try_gcs)  # Raises before reading.
    split = _record_range(builder, spec.split, first, stop)
    if split is None:
        return iter(())
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    return _raws(builder, dataset, spec, first, keep_name)


def _raws(builder, dataset, spec, first, keep_name) -> Iterator[Raw]:
    features = builder.info.features
    prefix = f"tfds:{builder.info.full_name}/{spec.split}"
    provenance = builder.name == BUILDER_NAME
    for index, raw in enumerate(tfds.as_numpy(dataset), start=first):
        origin = f"{prefix}#{index}"
        try:
            record = _decode(raw, features, origin)
        except DataError as e:
            yield Raw(index, origin, origin, e)
            continue
        if not provenance:
            # As `tfds.load` names it, for a caller that keeps names; else the spec's.
            yield Raw(index, origin, origin, record, spec.tfds if keep_name else None)
            continue
        origin = record["origin"]
        yield Raw(index, origin, origin, record, record["source"] if keep_name else None)


def count(spec: TfdsSourceSpec) -> int:
    """The number of records of a TFDS source's split (from the dataset's metadata)."""
    builder = load_builder(spec.tfds, spec.data_dir, spec.try_gcs)
    return sum(end - start for _, start, end in _absolute(builder, spec.split))


def _absolute(builder, split: str) -> list[tuple[str, int, int]]:
    """``(split name, start, end)`` of each part of a split string (TFDS leaves None for the
    ends of a split)."""
    splits = builder.info.splits
    return [
        (
            part.splitname,
            part.from_ or 0,
            splits[part.splitname].num_examples if part.to is None else part.to,
        )
        for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
    ]


def _record_range(builder, split: str, first: int, stop: int | None) -> str | None:
    """The split string of records ``[first, stop)`` of ``split`` (which may be sliced or a sum
    of splits); None for an empty range."""
    pieces, offset = [], 0
    for name, begin, end in _absolute(builder, split):
        start = max(begin, begin + first - offset)
        finish = end if stop is None else min(end, begin + stop - offset)
        if start < finish:
            pieces.append(f"{name}[{start}:{finish}]")
        offset += end - begin
    return "+".join(pieces) or None


def load_builder(name: str, data_dir: str | None = None, try_gcs: bool = False):
    """The builder of a prepared TFDS dataset; `DatasetNotPreparedError` if it is not there."""
    tfds.core.naming.parse_builder_name_kwargs(name)  # A malformed name raises as it is.
    kwargs = {} if data_dir is None else {"data_dir": str(data_dir)}
    try:
        with tfds_temp_folders_removed():
            builder = tfds.builder(name, try_gcs=try_gcs, **kwargs)
        if builder.is_prepared():
            return builder
    except (tfds.core.DatasetNotFoundError, ValueError):
        pass  # TFDS's message lists every dataset in its catalog; what data_dir holds helps more.
    root = str(data_dir or tfds.core.constants.DATA_DIR)
    held = prepared_datasets(root)
    held = f"it holds: {', '.join(held[:20])}" if held else "it holds no prepared dataset"
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} is not prepared in data_dir {root!r} ({held}); "
        "prepare it there (prepare_jsonl_dataset for local files, `tfds build` for catalog "
        "datasets) or pass the data_dir it was prepared in"
    )


def prepared_datasets(data_dir: str) -> list[str]:
    """The datasets prepared under ``data_dir``, as names for `tfds.load`: ``"name[/config]:v"``."""
    found = []
    for depth in ("*/*", "*/*/*"):
        for path in tf.io.gfile.glob(f"{data_dir}/{depth}/dataset_info.json"):
            *names, version = path[len(str(data_dir)) :].strip("/").split("/")[:-1]
            found.append(f"{'/'.join(names)}:{version}")
    return sorted(found)


def _decode(value: Any, feature: Any, origin: str) -> Any:
    """A record from `tfds.as_numpy` as JSON-like Python: str for bytes, lists for arrays.

    A sequence of dicts arrives as a dict of arrays and is turned back into a list of dicts.
    """
    if isinstance(feature, tfds.features.FeaturesDict):
        return {key: _decode(item, feature[key], origin) for key, item in value.items()}
    if isinstance(feature, tfds.features.Sequence):
        inner = feature.feature
        if isinstance(inner, tfds.features.FeaturesDict):
            size = len(next(iter(value.values()))) if value else 0
            rows = ({key: column[i] for key, column in value.items()} for i in range(size))
            return [_decode(row, inner, origin) for row in rows]
        return [_decode(item, inner, origin) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"invalid UTF-8 byte {value[e.start:e.start + 1]!r}"
            raise DataError(origin, problem, reason="invalid UTF-8") from None
    if isinstance(value, np.ndarray):
        return [_decode(item, None, origin) for item in value] if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _decode(item, None, origin) for key, item in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class TfdsSourceSpec:
    """An entry of ``config.data.sources`` that reads a prepared TFDS dataset.

    ``{"name": "mydata", "tfds": "itune_chat/mydata:1.0.0", "split": "train",
    "data_dir": "/data/tfds", "field_map": {...}}``: ``tfds`` is the name `tfds.load` takes,
    ``split`` a TFDS split (slices allowed), ``data_dir`` where it was prepared (None: TFDS's
    default); ``format``, ``field_map``, ``role_map`` and ``weight`` mean what they mean in
    `SourceSpec`; ``try_gcs`` lets TFDS read the public GCS bucket instead of data_dir.
    """

    name: str
    tfds: str
    split: str = "train"
    data_dir: str | None = None
    format: str = "auto"
    field_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    role_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    weight: float = 1.0
    try_gcs: bool = False

    def __post_init__(self):
        # The same checks, and messages, as for a file source.
        SourceSpec(self.name, self.tfds, self.format, self.field_map, self.role_map, self.weight)
        if not self.split:
            raise ConfigError(f"source {self.name!r}: split must be non-empty")

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> TfdsSourceSpec:
        """From an ``ml_collections.ConfigDict`` or a dict; ``name`` fills in a missing name."""
        return spec_from_values(cls, cfg, name)


def tfds_spec_from_config(cfg: Any, name: str | None = None) -> TfdsSourceSpec:
    """A ``config.data.sources`` entry with a ``tfds`` key as a `TfdsSourceSpec`."""
    return TfdsSourceSpec.from_config(cfg, name)
