"""A run's workdir, read and checked before the run writes anything in it.

A workdir holds one run: ``config.json``, ``checkpoints/``, ``tokenizer/``, ``metrics.jsonl``...
Starting again with the same workdir resumes that run, so `check_resume` refuses a config that
would not fit its checkpoint (other parameter shapes, another optimizer) or would train on other
tokens (another tokenizer or sequence length), before anything in the workdir changes; and
`write_config` replaces ``config.json`` atomically, so the file is always the old run's or the
new one's, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from itune import atomic
from itune.errors import ConfigError, UserError
from itune.model.decoder import ModelConfig
from itune.training import checkpoint

CONFIG_JSON = "config.json"

_MODEL_SHAPE = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("shape"))
# What picks a vocabulary trained in the workdir (no data.tokenizer.path, no init_from): the
# same settings find the same vocabulary again, others train another one.
_TRAINED_VOCABULARY = (
    "data.tokenizer.vocab_size",
    "data.tokenizer.num_corpus_examples",
    "data.seed",
    "data.chat_format",
    "data.sources",
)


def read_config(workdir: str) -> dict | None:
    """The config of the run in ``workdir`` as saved (``config.json``), or None if there is
    none; a `UserError` naming the file when it cannot be read."""
    path = os.path.join(workdir, CONFIG_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{path}: cannot read the run's config ({e}); restore the file, or move it away to "
            "check against the config saved with the run's last checkpoint"
        ) from e
    if not isinstance(values, dict):
        raise UserError(f"{path}: not a run's config (a JSON object); restore the file")
    return values


def _get(values: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(values, dict):
            return None
        values = values.get(key)
    return values


def resume_fields(run: dict) -> dict[str, Any]:
    """The settings a resumed run must keep, by dotted name, from a run's config as JSON: the
    model's shape fields, the optimizer, the sequence length, and what picks the tokenizer.

    >>> fields = resume_fields({"model": {"d_model": 64}, "data": {"seq_len": 128}})
    >>> fields["model.d_model"], fields["data.seq_len"], fields["init_from"]
    (64, 128, None)
    """
    names = [
        "init_from",
        "model.preset",
        *(f"model.{name}" for name in _MODEL_SHAPE),
        "optim.name",
        "data.seq_len",
        "data.tokenizer.path",
    ]
    if not _get(run, "data.tokenizer.path") and not _get(run, "init_from"):
        names += _TRAINED_VOCABULARY
    return {name: _get(run, name) for name in names}


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(config: dict, workdir: str) -> None:
    """Raises a one-line `ConfigError` when ``config`` (as JSON) cannot resume the run in
    ``workdir``: it names each setting that differs, with both values. Reads, never writes; a
    workdir without a checkpoint has nothing to resume and takes any config."""
    steps = checkpoint.saved_steps(workdir)
    if not steps:
        return
    run = read_config(workdir)
    if run is None:  # config.json is gone: the checkpoint keeps the config it was saved with.
        run = checkpoint.saved_meta(workdir, steps[-1]).get("config")
        if not isinstance(run, dict):
            return
    before, now = resume_fields(run), resume_fields(config)
    differences = [
        f"{name}={_show(before.get(name))} (this config: {_show(now.get(name))})"
        for name in sorted(before.keys() & now.keys())
        if before.get(name) != now.get(name)
    ]
    if differences:
        raise ConfigError(
            f"{workdir} holds a run (checkpoint at step {steps[-1]}) trained with "
            f"{', '.join(differences)}; a resume cannot change "
            f"{'this' if len(differences) == 1 else 'these'}: set "
            f"{'it' if len(differences) == 1 else 'them'} back, or pass a new --workdir"
        )


def remove_if_empty(workdir: str) -> None:
    """Removes ``workdir`` if nothing was written in it: a run that stops on a mistake before it
    starts leaves no empty folder behind."""
    try:
        os.rmdir(workdir)
    except OSError:  # Not empty, or already gone: what is there stays.
        pass


def write_config(workdir: str, config_json: str) -> None:
    """Replaces ``<workdir>/config.json`` with ``config_json``, atomically."""
    atomic.write_text(os.path.join(workdir, CONFIG_JSON), config_json)
