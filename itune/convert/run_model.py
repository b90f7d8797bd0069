"""Which model a run config trains, and with which tokenizer: the one answer that training,
``itune-inspect``, ``itune-plan``, ``itune-preflight`` and a training workdir read back as a
model (`itune.convert.model_dir`) all take from `resolve`.

With ``config.init_from`` (anything `model_dir.describe` reads, another run's workdir included)
the run takes that model's architecture, with the fields of ``config.model`` that keep the
pretrained weights' shapes (``dtype``, ``remat``, ``attention``, LoRA...), and its tokenizer
unless ``data.tokenizer.path`` names one. Without it the architecture is ``config.model`` (its
preset, then its fields), and a ``vocab_size`` of 0 takes the tokenizer's: that of
``data.tokenizer.path``, or of a SentencePiece vocabulary trained on the run's data and kept in
``<workdir>/tokenizer``, whose size ``data.tokenizer.vocab_size`` only bounds (a corpus gets
the pieces it supports: a few hundred for the built-in tasks, under the default 1024).

Without a workdir (planning a run before it starts) nothing is written anywhere: a vocabulary
to be trained on the built-in tasks is trained in a temporary folder, as the run will train it
(about a second); one to be trained on data files counts at its upper bound, since the files
need not be on this host; an ``init_from`` that is not on this host leaves ``config.model`` as
the architecture. `RunModel` says which (``architecture``, ``vocabulary``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any

from itune.convert import gguf_tokenizer  # noqa: F401  (a GGUF file as data.tokenizer.path)
from itune.errors import ConfigError
from itune.model import presets
from itune.model.decoder import ModelConfig


@dataclasses.dataclass(frozen=True)
class RunModel:
    """The model a run trains, its tokenizer, and where each came from."""

    config: ModelConfig
    # The run's tokenizer; None only without a workdir, where the model's size needs none.
    tokenizer: Any
    # ``init_from``'s own chat template (or format), which ``data.chat_format='auto'`` uses.
    chat_format: Any
    architecture: str  # Where the shapes come from: "init_from=<path>", "config.model"...
    vocabulary: str  # Where ``config.vocab_size`` comes from, and whether it is exact.


def resolve(config: Any, workdir: str | None = None) -> RunModel:
    """The model ``config`` trains in ``workdir`` (where a trained vocabulary is kept), or, with
    no workdir, the model it would train, found without writing anything (module docstring)."""
    init_from = config.get("init_from")
    if init_from and (workdir is not None or os.path.exists(init_from)):
        return _pretrained(config, workdir)
    section = config.model
    preset = section.get("preset")
    architecture = f"config.model (preset {preset})" if preset else "config.model"
    if init_from:
        architecture += f" (init_from={init_from} is not on this host)"
    fixed = _fixed_vocabulary(section)
    if workdir is not None:
        tokenizer = _vocabulary().load_tokenizer(config.data, workdir)
        vocabulary = fixed or _tokenizer_vocabulary(config.data, exact=True)
    elif fixed:
        tokenizer, vocabulary = None, fixed
    else:
        tokenizer, vocabulary = _planned_tokenizer(config.data)
    size = tokenizer.vocab_size if tokenizer else config.data.tokenizer.vocab_size
    template = _tokenizer_template(config.data, tokenizer)
    return RunModel(
        ModelConfig.from_config(section, size), tokenizer, template, architecture, vocabulary
    )


def with_run_fields(model_section: Any, base: ModelConfig, init_from: str) -> ModelConfig:
    """``base`` (a pretrained model) with the fields ``config.model`` sets; one that would change
    the pretrained weights' shapes is a `ConfigError`. LoRA's fields may change: the adapters
    start fresh.

    >>> base = ModelConfig(vocab_size=8, d_model=4, num_layers=1, num_heads=2, num_kv_heads=1,
    ...                    head_dim=2, mlp_dim=8)
    >>> with_run_fields({"preset": "tiny", "dtype": "bfloat16", "d_model": None}, base, "m").dtype
    'bfloat16'
    >>> with_run_fields({"d_model": 16}, base, "m")
    Traceback (most recent call last):
    ...
    itune.errors.ConfigError: init_from=m: model.d_model=16 (the model has 4); unset these to \
fine-tune the model as it is
    """
    fixed = [name for name in base.shape_fields() if not name.startswith("lora_")]
    values = {k: v for k, v in dict(model_section).items() if k != "preset" and v is not None}
    clashes = [
        f"model.{k}={values[k]!r} (the model has {getattr(base, k)!r})"
        for k in fixed
        # A vocab_size of 0 means "the tokenizer's", here the pretrained model's.
        if k in values and values[k] != getattr(base, k) and (values[k] or k != "vocab_size")
    ]
    if clashes:
        raise ConfigError(
            f"init_from={init_from}: {', '.join(clashes)}; unset these to fine-tune the model as "
            "it is"
        )
    return dataclasses.replace(base, **{k: v for k, v in values.items() if k not in fixed})


def _pretrained(config: Any, workdir: str | None) -> RunModel:
    from itune.convert import model_dir  # noqa: PLC0415  (a workdir's model resolves here)

    init_from = config.init_from
    base, tokenizer, chat_format = model_dir.describe(init_from)
    if config.data.tokenizer.path:
        tokenizer = _vocabulary().load_tokenizer(config.data, workdir)
        chat_format = chat_format or _tokenizer_template(config.data, tokenizer)
    configured = config.data.get("chat_format", "auto")
    if chat_format and configured not in ("auto", None, "") and chat_format != configured:
        logging.warning(
            "%s comes with its own chat %s; this run uses data.chat_format=%r instead.",
            init_from,
            f"format {chat_format!r}" if isinstance(chat_format, str) else "template",
            configured,
        )
    return RunModel(
        with_run_fields(config.model, base, init_from),
        tokenizer,
        chat_format,
        f"init_from={init_from}",
        "the pretrained model's",
    )


def _fixed_vocabulary(section: Any) -> str:
    """Where a vocabulary size that does not come from the tokenizer comes from, or ''."""
    if section.get("vocab_size"):
        return "model.vocab_size"
    if section.get("preset") and presets.preset(section.preset).get("vocab_size"):
        return f"preset {section.preset}"
    return ""


def _tokenizer_vocabulary(data_config: Any, exact: bool) -> str:
    path = data_config.tokenizer.path
    if path:
        return f"the tokenizer {path}"
    bound = f"data.tokenizer.vocab_size={data_config.tokenizer.vocab_size}"
    if exact:
        return f"trained on the run's data (at most {bound})"
    return f"{bound}, an upper bound (the run trains its vocabulary on the data files)"


def _planned_tokenizer(data_config: Any) -> tuple[Any, str]:
    """(the tokenizer, or None for the upper bound; where its size comes from), writing
    nothing."""
    path = data_config.tokenizer.path
    if path:
        from itune.data.hf_tokenizer import load_tokenizer_path  # noqa: PLC0415
        from itune.data.tokenizer import gfile  # noqa: PLC0415

        if not gfile().exists(path):
            raise ConfigError(
                f"data.tokenizer.path={path}: not on this host, and the model takes its "
                "vocabulary size from it; give the size with --config.model.vocab_size=N"
            )
        return load_tokenizer_path(path), _tokenizer_vocabulary(data_config, exact=True)
    if data_config.sources:
        return None, _tokenizer_vocabulary(data_config, exact=False)
    with tempfile.TemporaryDirectory(prefix="itune-vocabulary-") as folder:
        tokenizer = _vocabulary().load_tokenizer(data_config, folder)
    return tokenizer, (
        "trained on the built-in tasks here, as the run trains it (at most "
        f"data.tokenizer.vocab_size={data_config.tokenizer.vocab_size})"
    )


def _tokenizer_template(data_config: Any, tokenizer: Any) -> Any:
    """The template ``data.tokenizer.path`` ships (used when ``init_from`` brings none), or None
    where the tokenizer is not loaded or not on this host."""
    if tokenizer is None or not os.path.exists(data_config.tokenizer.path or ""):
        return None
    from itune.convert.tokenizer_files import tokenizer_template  # noqa: PLC0415

    return tokenizer_template(data_config, tokenizer)


def _vocabulary():
    """`itune.data.vocabulary`, imported on first use: it reads the data sources through
    TensorFlow, which decoding a model never needs."""
    from itune.data import vocabulary  # noqa: PLC0415

    return vocabulary
