"""Local instruction files prepared once as a TFDS dataset, ``itune_chat/<name>``.

Preparing turns a user's files (any that `itune.data.sources` reads, in any record format, with
its field map) into a TFDS dataset under ``data_dir``, one config per user data set. Its records
are the normal form: ``messages`` (role, content), ``source``, ``tools`` (``""`` for none) and
``origin`` (the ``file:line`` each came from). Examples keep file order. Preparing never touches
the network: nothing is downloaded, nor looked for in TFDS's GCS bucket::

    from itune.data.sources import tfds_prepare

    files = {"train": ["train.jsonl"], "validation": ["dev.json"]}
    tfds_prepare.prepare_jsonl_dataset("mydata", files, "/data/tfds", format="alpaca")

or from a shell (`itune.cli.prepare`)::

    python -m itune.cli.prepare mydata /data/tfds --split=train=train.jsonl \\
        --split=validation=dev.json --format=alpaca

Later, with or without itune, it loads like any prepared TFDS dataset::

    ds = tfds.load("itune_chat/mydata:1.0.0", split="train", data_dir="/data/tfds",
                   download=False, try_gcs=False)
    ds = tfds.builder_from_directory("/data/tfds/itune_chat/mydata/1.0.0").as_dataset("train")

and as an itune source, an entry with a ``tfds`` key (`itune.data.sources.tfds`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from typing import Any, Mapping, Sequence

import tensorflow_datasets as tfds

from itune.data import chat
from itune.data.sources.readers import read_source
from itune.data.sources.spec import SourceSpec
from itune.data.sources.tfds import BUILDER_NAME, tfds_temp_folders_removed

# What TFDS accepts as a config name and a split name (tensorflow_datasets.core.naming).
_CONFIG_NAME = re.compile(r"[\w+.-]+")
_SPLIT_NAME = re.compile(r"[\w-]+")
_METADATA_FILE = "metadata.json"  # Where TFDS keeps `DatasetInfo.metadata`.


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
                # The stored messages are role and content: a turn's tool calls as JSON text in
                # its content (`chat.calls_as_text`), the tool results' ids dropped.
                messages = [
                    {"role": m["role"], "content": chat.calls_as_text(m)["content"]}
                    for m in example["messages"]
                ]
                yield example["origin"], {
                    **example,
                    "messages": messages,
                    "tools": example["tools"] or "",
                }


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
    with tfds_temp_folders_removed():
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
