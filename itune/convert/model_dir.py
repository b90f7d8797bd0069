"""itune's own model folder, and loading a model from whatever a user points at.

An itune model folder::

    model.json      {"format": "itune-model", "model": ModelConfig fields, "chat_format": ...}
    params/         an orbax checkpoint of the parameters
    tokenizer/      the tokenizer, in Hugging Face layout (or a SentencePiece tokenizer.model),
                    with the chat template

``chat_format`` names a built-in format (or holds one's config); it is null for a model that
keeps its own Jinja template, which ``tokenizer/`` holds and loading returns as a
`itune.data.jinja_template.ChatTemplate`.

`load_model` also reads a Hugging Face folder (``config.json`` + safetensors), a GGUF file, and a
training workdir (its ``config.json``, ``tokenizer/`` and newest checkpoint); parameters are
placed straight into their shards on the given mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from itune import atomic, sharding
from itune.convert import tokenizer_files, weights
from itune.errors import UserError
from itune.model.decoder import ModelConfig

MODEL_JSON = "model.json"
KINDS = ("itune", "hf", "gguf", "workdir")


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any
    chat_format: Any  # A built-in format's name or config, a ChatTemplate, or None.

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


def kind_of(path: str) -> str:
    """What ``path`` holds: one of `KINDS`; a clear error when it is none of them."""
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise ValueError(f"{path}: a file, but not a .gguf; expected a GGUF file or a folder")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.exists(os.path.join(path, MODEL_JSON)):
        return "itune"
    config = os.path.join(path, "config.json")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(
                    f"{config}: not valid JSON ({e}); restore the file, or point at another "
                    "model"
                ) from e
        if "model_type" in values or "architectures" in values:
            return "hf"
        if "model" in values and os.path.isdir(os.path.join(path, "checkpoints")):
            return "workdir"
    raise ValueError(
        f"{path}: not a model: expected model.json (itune), config.json with safetensors "
        "(Hugging Face), a training workdir (config.json and checkpoints/) or a .gguf file"
    )


def save_model(
    path: str, config: ModelConfig, params: nnx.State, tokenizer: Any, chat_format: Any = None
) -> None:
    """Writes an itune model folder (see the module docstring); ``path`` must not exist yet.

    Files are written to a temporary folder beside ``path`` and renamed at the end
    (`itune.atomic.folder`), so a failure (a full disk, Ctrl-C) leaves nothing behind.
    """
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new folder")
    with atomic.folder(path) as partial:
        os.makedirs(os.path.join(partial, "tokenizer"))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.abspath(os.path.join(partial, "params")), params)
            checkpointer.wait_until_finished()
        tokenizer_files.save_tokenizer(os.path.join(partial, "tokenizer"), tokenizer, chat_format)
        meta = {
            "format": "itune-model",
            "model": dataclasses.asdict(config),
            "chat_format": _format_json(chat_format),
        }
        with open(os.path.join(partial, MODEL_JSON), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def _format_json(chat_format: Any) -> str | dict | None:
    """``model.json``'s ``chat_format``: a built-in format's name or config, or None for a Jinja
    template (kept in ``tokenizer/``)."""
    from itune.data import chat  # noqa: PLC0415

    if isinstance(chat_format, chat.ChatFormat):
        built_in = chat.FORMATS.get(chat_format.name) == chat_format
        return chat_format.name if built_in else dataclasses.asdict(chat_format)
    if isinstance(chat_format, (str, dict)) or chat_format is None:
        return chat_format
    if hasattr(chat_format, "to_dict"):  # A ConfigDict from a run's config.
        return chat_format.to_dict()
    return None


def load_model(
    path: str,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    kind: str | None = None,
    **overrides: Any,
) -> LoadedModel:
    """The model at ``path`` (an itune folder, Hugging Face folder, GGUF file or training
    workdir; ``kind`` names it when the path does not tell), on ``mesh`` (the first device
    without one). ``overrides`` set `ModelConfig` fields that do not change the parameters'
    shapes (``dtype``, ``attention``, ``remat``...)."""
    kind = kind or kind_of(path)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    if kind == "gguf":
        from itune.convert import gguf  # noqa: PLC0415

        config, graphdef, params = gguf.load_gguf(path, mesh, rules, **overrides)
        tokenizer, chat_format = gguf.load_gguf_tokenizer(path)
        return LoadedModel(config, graphdef, params, tokenizer, chat_format)
    if kind == "hf":
        from itune.convert import hf  # noqa: PLC0415

        config, graphdef, params = hf.load_hf(path, mesh, rules, **overrides)
        tokenizer, chat_format = tokenizer_files.load_hf_tokenizer(path)
        return LoadedModel(config, graphdef, params, tokenizer, chat_format)
    if kind == "workdir":
        return _load_workdir(path, mesh, rules, **overrides)
    return _load_itune(path, mesh, rules, **overrides)


def _default_mesh(mesh: Mesh | None) -> Mesh:
    if mesh is not None:
        return mesh
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _params_target(config: ModelConfig, mesh: Mesh, rules) -> tuple:
    """The model's graph, and its parameters as restore targets in their shards on ``mesh``."""
    graphdef, abstract = weights.abstract_params(config, rules)
    shardings = sharding.state_shardings(abstract, mesh, rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return graphdef, target


def _restore_params(directory: str, config: ModelConfig, mesh: Mesh, rules) -> tuple:
    graphdef, target = _params_target(config, mesh, rules)
    params = ocp.StandardCheckpointer().restore(os.path.abspath(directory), target)
    return graphdef, params


def _load_itune(path: str, mesh, rules, **overrides) -> LoadedModel:
    with open(os.path.join(path, MODEL_JSON), encoding="utf-8") as f:
        meta = json.load(f)
    config = dataclasses.replace(ModelConfig(**meta["model"]), **overrides)
    graphdef, params = _restore_params(
        os.path.join(path, "params"), config, _default_mesh(mesh), rules
    )
    tokenizer, guessed = tokenizer_files.load_hf_tokenizer(os.path.join(path, "tokenizer"))
    return LoadedModel(config, graphdef, params, tokenizer, meta.get("chat_format") or guessed)


def describe(path: str, kind: str | None = None) -> tuple[ModelConfig, Any, Any]:
    """``(config, tokenizer, chat format)`` of the model at ``path``, without its parameters."""
    kind = kind or kind_of(path)
    if kind == "gguf":
        from itune.convert import gguf  # noqa: PLC0415

        return (gguf.gguf_config(path), *gguf.load_gguf_tokenizer(path))
    if kind == "hf":
        from itune.convert import hf  # noqa: PLC0415

        return (hf.load_hf_config(path), *tokenizer_files.load_hf_tokenizer(path))
    if kind == "workdir":
        _, config, tokenizer, chat_format = _workdir_run(path)
        return config, tokenizer, chat_format
    with open(os.path.join(path, MODEL_JSON), encoding="utf-8") as f:
        meta = json.load(f)
    tokenizer, guessed = tokenizer_files.load_hf_tokenizer(os.path.join(path, "tokenizer"))
    return ModelConfig(**meta["model"]), tokenizer, meta.get("chat_format") or guessed


def _workdir_run(path: str):
    """``(run config, model config, tokenizer, chat format)`` of a training workdir."""
    import ml_collections  # noqa: PLC0415

    from itune.convert import run_model  # noqa: PLC0415  (resolves init_from through here)

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        run_config = ml_collections.ConfigDict(json.load(f))
    from itune.data import chat  # noqa: PLC0415

    run = run_model.resolve(run_config, path)
    chat_format = chat.format_choice(run_config.data, run.chat_format)
    return run_config, run.config, run.tokenizer, chat_format


def _load_workdir(path: str, mesh, rules, **overrides) -> LoadedModel:
    """The newest checkpoint of a training run, with the run's tokenizer and chat format.

    Only the parameters are read: the checkpoint's train state is restored partially, so
    neither the optimizer nor its state is ever built."""
    _, config, tokenizer, chat_format = _workdir_run(path)
    config = dataclasses.replace(config, **overrides)
    graphdef, target = _params_target(config, _default_mesh(mesh), rules)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(path, "checkpoints")), item_names=("state", "meta")
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{path}: the run has no checkpoint yet")
        # The train state was saved as {"step", "params", "opt_state"}; only "params" is read.
        item = {"params": target}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True,
                )
            ),
        )
    finally:
        manager.close()
    return LoadedModel(config, graphdef, restored.state["params"], tokenizer, chat_format)
