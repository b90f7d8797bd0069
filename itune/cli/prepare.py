"""``python -m itune.cli.prepare NAME DATA_DIR --split=SPLIT=FILE[,FILE...]``: local instruction
files prepared once as a TFDS dataset, ``itune_chat/NAME``, under DATA_DIR.

  python -m itune.cli.prepare mydata /data/tfds --split=train=train.jsonl \\
      --split=validation=dev.json,more.jsonl --format=alpaca

The files are read as a data source's are (JSONL or a JSON list, in any record format, with
``--field_map`` and ``--role_map`` as JSON objects); a bad record stops it, naming its file and
line, and leaves no dataset behind. Nothing is downloaded. A run then trains on it with the
``config.data.sources`` entry ``{"tfds": "itune_chat/mydata:1.0.0", "data_dir": "/data/tfds"}``
(see `itune.data.sources.tfds_prepare`).
"""

from __future__ import annotations

import json

from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags  # noqa: E402

_FLAGS: dict = {}


def files_by_split(values: list[str]) -> dict[str, list[str]]:
    """``--split`` values as the files of each split, in order.

    >>> files_by_split(["train=a.jsonl,b.json", "validation=c.json", "train=d.jsonl"])
    {'train': ['a.jsonl', 'b.json', 'd.jsonl'], 'validation': ['c.json']}
    """
    files: dict[str, list[str]] = {}
    for value in values:
        split, equals, paths = value.partition("=")
        if not (split and equals and paths.strip(",")):
            raise UserError(f"--split={value}: expected SPLIT=FILE[,FILE...]; see --help")
        files.setdefault(split, []).extend(p for p in paths.split(",") if p)
    return files


def _json_object(flag: str) -> dict | None:
    text = _FLAGS[flag].value
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--{flag}={text}: not JSON ({e.msg}); give a JSON object") from None
    if not isinstance(value, dict):
        raise UserError(f"--{flag}={text}: expected a JSON object such as '{{\"a\": \"b\"}}'")
    return value


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("expected two arguments, NAME and DATA_DIR")
    name, data_dir = argv[1:]
    files, field_map = files_by_split(_FLAGS["split"].value), _json_object("field_map")
    role_map = _json_object("role_map")
    from itune.data.sources import tfds_prepare  # noqa: PLC0415  (imports TensorFlow)

    try:
        builder = tfds_prepare.prepare_jsonl_dataset(
            name,
            files,
            data_dir,
            _FLAGS["format"].value,
            field_map,
            _FLAGS["version"].value,
            role_map=role_map,
            overwrite=_FLAGS["overwrite"].value,
        )
    except ValueError as e:  # A name, version, map or prepared recipe that will not do.
        raise UserError(str(e)) from e
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"{builder.info.full_name} in {data_dir}: {counts}")


def run():
    """Console entry point (``python -m itune.cli.prepare``)."""
    from itune.data.sources.formats import FORMATS  # noqa: PLC0415

    _FLAGS["split"] = flags.DEFINE_multi_string(
        "split",
        None,
        "SPLIT=FILE[,FILE...]: a split and its files, read in order",
    )
    _FLAGS["format"] = flags.DEFINE_enum(
        "format", "auto", list(FORMATS), "The files' record format; auto reads it off a record."
    )
    _FLAGS["field_map"] = flags.DEFINE_string(
        "field_map", None, 'JSON object, a field of the format -> the record\'s: {"output": "a"}.'
    )
    _FLAGS["role_map"] = flags.DEFINE_string(
        "role_map", None, 'JSON object, a role name in the data -> a role: {"bot": "assistant"}.'
    )
    _FLAGS["version"] = flags.DEFINE_string("version", "1.0.0", "The dataset's version, x.y.z.")
    _FLAGS["overwrite"] = flags.DEFINE_bool(
        "overwrite", False, "Prepare again over a dataset prepared from other files or settings."
    )
    cli.run(main, required=["split"], args="NAME DATA_DIR")


if __name__ == "__main__":
    run()
