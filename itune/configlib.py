"""Helpers shared by the files in ``configs/``: argument parsing and the standard sections.

A config file defines ``get_config(arg=None)`` returning a locked `ml_collections.ConfigDict`;
``arg`` is a comma-separated list of switches and ``key=value`` pairs (``"runlocal,steps=10"``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing

import ml_collections

from itune.model import decoder
from itune.training import optimizer


def shared_dir() -> str:
    """The ``shared`` folder of real data and models: ``$ITUNE_SHARED``, else beside the
    repository."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("ITUNE_SHARED", os.path.join(repo, "..", "shared"))


def parse_arg(arg: str | None, **defaults):
    """``"runlocal,steps=10"`` -> ConfigDict(runlocal=True, steps=10), typed by ``defaults``."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not value:
            values[key] = True
        elif isinstance(default, bool):
            values[key] = value.lower() in ("1", "true", "yes")
        else:
            values[key] = type(default)(value)
    return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
    """Every section with its defaults; config files change what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Parameter initialisation and dropout; the data has its own seed.
    # A pretrained model to fine-tune: an itune model folder, a Hugging Face folder, a GGUF file
    # or a training workdir (`itune.training.pretrained`). Empty: train from scratch.
    c.init_from = ""

    c.data = ml_collections.ConfigDict()
    # Named file sources, each {path, format, field_map, role_map, weight} (itune.data.sources);
    # empty: the built-in task mixture of itune.data.synthetic_tasks.
    c.data.sources = ml_collections.ConfigDict()
    c.data.mixture = "weights"  # 'weights', 'examples' (capped) or 'temperature' (mixture.py).
    c.data.mixture_cap = 0  # Examples-proportional cap per source; 0: none.
    c.data.mixture_temperature = 1.0
    c.data.on_bad_example = "error"  # 'error' names file, line and field; 'skip' counts it.
    c.data.train_on = "all_assistant"  # Or 'last_assistant', or 'all' tokens.
    c.data.max_dropped_share = 0.01  # Warn when more examples than this share are dropped.
    c.data.eval_examples_per_source = 64  # Held out from each file source for the eval loss.
    c.data.seed = 0  # Picks the examples, and with them the tokenizer trained on them.
    # 'auto': the Jinja chat template of the model the run starts from (init_from), default
    # system turn and all, else chatml. Or a built-in format (chatml, llama3, gemma, mistral,
    # alpaca), a dict of one's own, a .jinja file, or a Jinja template's text.
    c.data.chat_format = "auto"
    # Variables a Jinja template reads besides the chat (enable_thinking, date_string...).
    c.data.chat_template_kwargs = ml_collections.ConfigDict()
    # Whether the reasoning text an assistant turn renders (reasoning_content, <think>...) is
    # trained; the tags around it and the answer are either way.
    c.data.train_on_reasoning = True
    c.data.seq_len = 256  # Tokens per packed row.
    c.data.global_batch_size = 32  # Rows per step, over all processes.
    c.data.pack_open_rows = 8  # Rows the first-fit packer keeps open at once.
    # An example longer than seq_len: 'truncate_response' (cut the end), 'truncate_prompt_left'
    # (cut the start) or 'drop'; each is counted.
    c.data.truncation = "truncate_response"
    c.data.prefetch = 4  # Batches prepared ahead of the train step.
    # Shards of the stream (0: one per process), each packed on its own from its own block of
    # every source's records; a fixed number makes the batches the same for any number of
    # processes that divides it.
    c.data.shards = 0
    c.data.builtin = ml_collections.ConfigDict()
    c.data.builtin.system_prompt_rate = 0.25  # Share of chats that open with a system turn.
    c.data.builtin.families = ()  # Task families to use; empty means all.
    c.data.tokenizer = ml_collections.ConfigDict()
    # A SentencePiece .model, a Hugging Face tokenizer directory (tokenizer.json, or vocab.json and
    # merges.txt) or a tokenizer.json; empty trains a SentencePiece vocabulary on the run's data.
    c.data.tokenizer.path = ""
    c.data.tokenizer.vocab_size = 1024  # Upper bound on a trained vocabulary's size.
    c.data.tokenizer.num_corpus_examples = 20_000  # Examples the vocabulary is trained on.

    c.model = model_section("tiny")

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # Pure data parallelism: replicas.
    c.mesh.fsdp = -1  # Data parallelism with sharded parameters; -1 takes all remaining devices.
    c.mesh.tensor = 1  # Tensor (model) parallelism inside each layer.
    # Context parallelism: each row's tokens split over this many devices (strategy 'cp').
    c.mesh.context = 1
    # 'dp', 'fsdp', 'tp', 'fsdp_tp', 'ep' or 'cp' (`itune.sharding.STRATEGIES`): how parameters,
    # the batch and the sequence map onto the mesh axes.
    c.mesh.strategy = "fsdp_tp"
    # Logical axis name -> mesh axes; when set, replaces the strategy's table.
    c.mesh.rules = ()

    c.optim = optimizer.config_section()  # Its fields: optimizer.OptimDefaults.

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.log_every = 10  # Steps between metric lines and TensorBoard points.
    # Gradient accumulation: the global batch in this many slices (must divide it); the update
    # equals the whole batch's.
    c.train.microbatches = 1
    # 'token': mean over the batch's trained tokens; 'sequence': mean over its sequences of each
    # one's mean token loss.
    c.train.loss_normalization = "token"
    # A step with a non-finite loss or gradient norm is skipped; this many in a row stop the run.
    c.train.max_nonfinite_steps = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0: only at the end of training.
    c.eval.num_loss_examples = 256  # Held-out examples for the eval loss.
    c.eval.prompts_per_family = 16  # Generation prompts per task family and template group.
    c.eval.prompts_per_source = 4  # File sources: held-out prompts answered at each evaluation.
    # Tokens an answer may have; 0: each task kind's default (`itune.evaluation.harness.KINDS`:
    # 24 for the built-in tasks and the file sources' transcripts, 256 for exact match and
    # ROUGE-L, 1,280 for IFEval as published).
    c.eval.max_new_tokens = 0
    c.eval.batch_size = 128  # Prompts decoded together.
    # Generative tasks scored at each evaluation (`itune.evaluation.tasks`): JSONL prompt sets,
    # and file sources whose held-out answers are scored by exact match of the final
    # '#### <number>' or by ROUGE-L; each cut to its first prompts_per_task prompts (0: all).
    c.eval.prompt_sets = ()
    c.eval.exact_match_sources = ()
    c.eval.rouge_sources = ()
    c.eval.prompts_per_task = 0
    # Score IFEval prompt sets by the official checker's rules where itune's deliberately differ
    # (`itune.evaluation.ifeval`); needs `pip install nltk && python -m nltk.downloader punkt_tab`.
    c.eval.ifeval_official = False
    c.eval.num_samples_to_print = 6

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200  # Also saved at the end; 0 saves only at the end.
    c.checkpoint.max_to_keep = 2  # The last N checkpoints are kept...
    c.checkpoint.keep_every_steps = 0  # ...and every K-th step's as well (0: none).

    # The hardware a config is made for, read by `itune-preflight` (itune.preflight).
    c.preflight = ml_collections.ConfigDict()
    # A Cloud TPU slice name (v5p-64, v5e-16, v4-8 ...) to compile for when --topology is not
    # given; empty: the command needs --topology.
    c.preflight.topology = ""
    c.preflight.num_slices = 1  # Slices of that topology joined over the data-center network.
    return c


def model_section(preset: str = "tiny", **values) -> ml_collections.ConfigDict:
    """``config.model``: a ``preset`` (`itune.model.presets`) and one field per `ModelConfig`
    field, None where the preset (or, failing that, ModelConfig's default) decides.

    Fields stay typed, so ``--config.model.num_layers=8`` overrides one on the command line.
    ``vocab_size`` 0 takes the tokenizer's size.
    """
    section = ml_collections.ConfigDict()
    section.preset = preset
    hints = typing.get_type_hints(decoder.ModelConfig)
    for field in dataclasses.fields(decoder.ModelConfig):
        section[field.name] = ml_collections.FieldReference(None, field_type=hints[field.name])
    for key, value in values.items():
        if key not in section:
            raise ValueError(f"model_section: unknown field {key!r}")
        section[key] = value
    return section


def sibling(config_file: str, name: str) -> types.ModuleType:
    """The config module ``name`` from the folder of ``config_file`` (pass ``__file__``), so that
    one config can build on another however it was loaded."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"itune_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
