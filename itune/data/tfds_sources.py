"""Instruction data as TFDS datasets: prepare local files once, read any TFDS dataset as a source.

Preparing turns a user's JSON / JSONL files (any format `itune.data.sources` reads, with its field
map) into a TFDS dataset ``itune_chat/<name>`` under ``data_dir``, one config per user data set.
Its records are the normal form: ``messages`` (role, content), ``source``, ``tools`` (``""`` for
none) and ``origin`` (the ``file:line`` each came from). Examples keep file order. Preparing
never touches the network: nothing is downloaded, nor looked for in TFDS's GCS bucket::

    from itune.data import tfds_sources

    files = {"train": ["train.jsonl"], "validation": ["dev.json"]}
    tfds_sources.prepare_jsonl_dataset("mydata", files, "/data/tfds", format="alpaca")

or from a shell::

    python -m itune.data.tfds_sources mydata /data/tfds --split train=train.jsonl \\
        --split validation=dev.json --format alpaca

Later, with or without itune, it loads like any prepared TFDS dataset::

    ds = tfds.load("itune_chat/mydata:1.0.0", split="train", data_dir="/data/tfds",
                   download=False, try_gcs=False)
    ds = tfds.builder_from_directory("/data/tfds/itune_chat/mydata/1.0.0").as_dataset("train")

`read_tfds` reads any prepared TFDS dataset as an itune source in normal form, converting each
record with `itune.data.sources.convert_record` (so alpaca / messages / sharegpt /
prompt_completion records work, with a field map). In ``config.data.sources`` such a source is an
entry with a ``tfds`` key (see `TfdsSourceSpec`)::

    {"name": "mydata", "tfds": "itune_chat/mydata:1.0.0", "split": "train",
     "data_dir": "/data/tfds"}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from itune.data.sources import (
    ON_BAD_EXAMPLE,
    DataError,
    SourceSpec,
    SourceStats,
    convert_record,
    count_records,
    detect_format,
    read_records,
    read_source,
    spec_from_values,
)

BUILDER_NAME = "itune_chat"
# What TFDS accepts as a config name and a split name (tensorflow_datasets.core.naming).
_CONFIG_NAME = re.compile(r"[\w+.-]+")
_SPLIT_NAME = re.compile(r"[\w-]+")
_METADATA_FILE = "metadata.json"  # Where TFDS keeps `DatasetInfo.metadata`.
_LOGGED_SKIPS = 5  # Skipped examples logged per source; the rest are only counted.


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset that is not prepared in the data_dir it was looked for in."""


@dataclasses.dataclass(eq=False)
class ChatJsonlConfig(tfds.core.BuilderConfig):
    """One user data set: its files by split and how `read_source` reads them."""

    files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    format: str = "auto"
    field_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    role_map: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def recipe(self) -> dict:
        """What the data was made from; stored with it, so a changed recipe is not reused."""
        files = {split: list(paths) for split, paths in self.files.items()}
        maps = {"field_map": dict(self.field_map), "role_map": dict(self.role_map)}
        return {"files": files, "format": self.format, **maps}

    def specs(self, split: str) -> list[SourceSpec]:
        return [
            SourceSpec(self.name, path, self.format, dict(self.field_map), dict(self.role_map))
            for path in self.files[split]
        ]


class ChatJsonl(tfds.core.GeneratorBasedBuilder):
    """``itune_chat``: a user's instruction files in normal form; configs are made at run time."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: list = []  # One per user data set, from `prepare_jsonl_dataset`.

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config is None:
            raise ValueError(f"{BUILDER_NAME} has a config per data set: load {BUILDER_NAME}/NAME")
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict(
            {
                "messages": tfds.features.Sequence({"role": text, "content": text}),
                "source": text,
                "tools": text,
                "origin": text,
            }
        )
        # Not dataset_info_from_configs: that reads package files meant for catalog datasets.
        return tfds.core.DatasetInfo(
            builder=self,
            features=features,
            # Shuffling on write would lose the order of the user's files.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self.builder_config.recipe()),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The files are local; nothing is downloaded.
        return {split: self._generate_examples(split) for split in self.builder_config.files}

    def _generate_examples(self, split: str):
        for spec in self.builder_config.specs(split):
            for example in read_source(spec):
                yield example["origin"], {**example, "tools": example["tools"] or ""}


def prepare_jsonl_dataset(
    name: str,
    files_by_split: Mapping[str, Sequence[str] | str],
    data_dir: str,
    format: str = "auto",
    field_map: Mapping[str, str] | None = None,
    version: str = "1.0.0",
    *,
    role_map: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> ChatJsonl:
    """Prepares ``itune_chat/<name>:<version>`` under ``data_dir`` from local files; its builder.

    ``files_by_split`` maps a split name to its files, read in order. A bad record raises the
    `DataError` of `read_source` (file and line) and leaves no dataset behind. A data set already
    prepared from the same files and settings is reused; one prepared from others raises, unless
    ``overwrite`` (also the way to pick up edits to the same files). Load it later with
    ``tfds.load(f"itune_chat/{name}:{version}", data_dir=data_dir)`` or `read_tfds`.
    """
    if not _CONFIG_NAME.fullmatch(name or ""):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '_', '-', '.' or '+'")
    tfds.core.Version(version)  # Raises on anything but "x.y.z".
    files = _files_by_split(name, files_by_split)
    field_map, role_map = dict(field_map or {}), dict(role_map or {})
    for split, paths in files.items():
        for path in paths:
            # Checks the format and maps, and that the file exists, before TFDS makes folders.
            read_source(SourceSpec(name, path, format, field_map, role_map))
    config = ChatJsonlConfig(
        name=name,
        version=version,
        description=f"itune instruction data {name!r} from {sum(map(len, files.values()))} files",
        files=files,
        format=format,
        field_map=field_map,
        role_map=role_map,
    )
    with _tfds_temp_folders_removed():
        builder = ChatJsonl(config=config, data_dir=data_dir)
    if builder.is_prepared() and not overwrite:
        stored = json.loads((builder.data_path / _METADATA_FILE).read_text())
        if stored != config.recipe():
            raise ValueError(
                f"{builder.data_path} was prepared from {stored}, not {config.recipe()}; "
                "pass overwrite=True or a new version"
            )
        logging.info("reusing %s", builder.data_path)
        return builder
    mode = tfds.download.GenerateMode
    download = tfds.download.DownloadConfig(
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
        try_download_gcs=False,  # Else TFDS looks for a prepared copy in its GCS bucket first.
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    # Nothing is downloaded; a scratch download_dir keeps TFDS's empty folders out of data_dir.
    with tempfile.TemporaryDirectory() as scratch:
        builder.download_and_prepare(download_dir=scratch, download_config=download)
    return builder


@contextlib.contextmanager
def _tfds_temp_folders_removed() -> Iterator[None]:
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


def _files_by_split(name: str, files_by_split: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{split: [path, ...]}`` with names TFDS accepts; a lone path stands for a list of one."""
    files = {}
    for split, paths in files_by_split.items():
        if isinstance(paths, str) or hasattr(paths, "__fspath__"):
            paths = [paths]
        files[split] = [str(path) for path in paths]
        if not _SPLIT_NAME.fullmatch(split) or not files[split]:
            problem = "needs a name of letters, digits, '_' or '-', and files"
            raise ValueError(f"dataset {name!r}: split {split!r} {problem}")
    if not files:
        raise ValueError(f"dataset {name!r}: files_by_split is empty")
    return files


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
    records = read_tfds_records(spec, on_bad_example, stats, keep_name=source is None)
    return (example for _, example in records)


def read_tfds_records(
    spec: TfdsSourceSpec,
    on_bad_example: str = "error",
    stats: SourceStats | None = None,
    first: int = 0,
    stop: int | None = None,
    keep_name: bool = False,
) -> Iterator[tuple[int, dict]]:
    """``(record index, example)`` for the records ``first <= index < stop`` of a TFDS source;
    only those are read from disk (the split is sliced). ``keep_name``: examples of an
    ``itune_chat`` dataset keep the source name they were prepared with."""
    if on_bad_example not in ON_BAD_EXAMPLE:
        raise ValueError(f"on_bad_example={on_bad_example!r}; expected one of {ON_BAD_EXAMPLE}")
    builder = load_builder(spec.tfds, spec.data_dir, spec.try_gcs)
    stats = stats if stats is not None else SourceStats()
    stats.name = stats.name or spec.name
    split = _record_range(builder, spec.split, first, stop)
    if split is None:
        return iter(())
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    source = None if keep_name else spec.name
    return _read(builder, dataset, spec, source, on_bad_example, stats, first)


def count_tfds_records(spec: TfdsSourceSpec) -> int:
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


def _read(builder, dataset, spec, source, on_bad_example, stats, first):
    features = builder.info.features
    prefix = f"tfds:{builder.info.full_name}/{spec.split}"
    provenance = builder.name == BUILDER_NAME
    convert = dict(field_map=spec.field_map, role_map=spec.role_map)
    fmt = None if spec.format == "auto" else spec.format
    for index, raw in enumerate(tfds.as_numpy(dataset), start=first):
        stats.read += 1
        origin = f"{prefix}#{index}"
        try:
            record = _decode(raw, features, origin)
            if provenance:
                origin = record["origin"]
            if fmt is None:
                fmt = detect_format(record, spec.field_map, origin)
            source_name = source or (record["source"] if provenance else spec.tfds)
            example = convert_record(record, fmt, origin=origin, source=source_name, **convert)
        except DataError as e:
            if on_bad_example == "error" or e.reason == "unknown format":
                raise
            stats.skipped[e.reason] += 1
            if sum(stats.skipped.values()) <= _LOGGED_SKIPS:
                logging.warning("source %s: skipped %s", stats.name, e)
            continue
        stats.yielded += 1
        yield index, example


def load_builder(name: str, data_dir: str | None = None, try_gcs: bool = False):
    """The builder of a prepared TFDS dataset; `DatasetNotPreparedError` if it is not there."""
    tfds.core.naming.parse_builder_name_kwargs(name)  # A malformed name raises as it is.
    kwargs = {} if data_dir is None else {"data_dir": str(data_dir)}
    try:
        with _tfds_temp_folders_removed():
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
            raise ValueError(f"source {self.name!r}: split must be non-empty")

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> TfdsSourceSpec:
        """From an ``ml_collections.ConfigDict`` or a dict; ``name`` fills in a missing name."""
        return spec_from_values(cls, cfg, name)


def tfds_spec_from_config(cfg: Any, name: str | None = None) -> TfdsSourceSpec:
    """A ``config.data.sources`` entry with a ``tfds`` key as a `TfdsSourceSpec`."""
    return TfdsSourceSpec.from_config(cfg, name)


def spec_from_config(cfg: Any, name: str | None = None) -> SourceSpec | TfdsSourceSpec:
    """Any ``config.data.sources`` entry: a TFDS source if it has a ``tfds`` key, else a file."""
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    kind = TfdsSourceSpec if "tfds" in values else SourceSpec
    return kind.from_config(values, name)


def specs_from_config(sources: Any) -> list[SourceSpec | TfdsSourceSpec]:
    """``config.data.sources`` (name -> entry, or a list), file and TFDS entries alike."""
    if hasattr(sources, "items"):
        return [spec_from_config(cfg, name=name) for name, cfg in sources.items()]
    return [spec_from_config(cfg) for cfg in sources]


def read_any_source(
    spec: SourceSpec | TfdsSourceSpec,
    on_bad_example: str = "error",
    stats: SourceStats | None = None,
) -> Iterator[dict]:
    """`read_source` for a file spec, `read_tfds` for a TFDS one."""
    return (example for _, example in read_any_records(spec, on_bad_example, stats))


def read_any_records(
    spec: SourceSpec | TfdsSourceSpec,
    on_bad_example: str = "error",
    stats: SourceStats | None = None,
    first: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, dict]]:
    """`read_records` for a file spec, `read_tfds_records` for a TFDS one."""
    if isinstance(spec, TfdsSourceSpec):
        return read_tfds_records(spec, on_bad_example, stats, first, stop)
    return read_records(spec, on_bad_example, stats, first, stop)


def count_any_records(spec: SourceSpec | TfdsSourceSpec) -> int:
    """`count_records` for a file spec, `count_tfds_records` for a TFDS one."""
    if isinstance(spec, TfdsSourceSpec):
        return count_tfds_records(spec)
    return count_records(spec)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m itune.data.tfds_sources NAME DATA_DIR --split train=a.jsonl,b.json ...``."""
    parser = argparse.ArgumentParser(description=prepare_jsonl_dataset.__doc__.splitlines()[0])
    parser.add_argument("name", help="the dataset's config name: itune_chat/NAME")
    parser.add_argument("data_dir")
    parser.add_argument("--split", action="append", required=True, metavar="SPLIT=FILE[,FILE...]")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--field_map", type=json.loads, default=None, help="JSON object")
    parser.add_argument("--role_map", type=json.loads, default=None, help="JSON object")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    files = {}
    for item in args.split:
        split, _, paths = item.partition("=")
        files[split] = [p for p in paths.split(",") if p]
    builder = prepare_jsonl_dataset(
        args.name,
        files,
        args.data_dir,
        args.format,
        args.field_map,
        args.version,
        role_map=args.role_map,
        overwrite=args.overwrite,
    )
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"{builder.info.full_name} in {args.data_dir}: {counts}")


if __name__ == "__main__":
    main()
