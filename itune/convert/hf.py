"""Hugging Face checkpoints in and out, in safetensors: Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3
(text), Mixtral and Qwen3-MoE.

`itune.convert.hf_config` maps ``config.json`` to a `ModelConfig` and back. `load_hf` places
a checkpoint's weights shard by shard through `itune.convert.weights.place_params`: each
device's part of each parameter is sliced straight out of the memory-mapped safetensors files
(layer by layer for the stacked blocks), so no host holds a whole checkpoint. `save_hf` writes
the reverse: ``config.json``, ``model.safetensors`` (or shards and their index), streamed one
tensor at a time, and optionally
the tokenizer with a chat template for one of itune's chat formats
(`itune.convert.tokenizer_files`). LoRA adapters alone: `itune.convert.peft`.

Hugging Face linear weights are ``(out, in)``; itune's are ``(in, out)`` with heads split out
(``l`` a layer, ``H`` heads, ``K`` head_dim)::

    model.layers.l.self_attn.q_proj.weight  (H * K, d)    blocks/attn/q[l]    (d, H, K)
    model.layers.l.self_attn.o_proj.weight  (d, H * K)    blocks/attn/o[l]    (H, K, d)
    model.layers.l.mlp.gate_proj.weight     (mlp, d)      blocks/mlp/gate[l]  (d, mlp)
    lm_head.weight                          (vocab, d)    lm_head             (d, vocab)

Gemma 2 and 3 name their four norms of a block differently (`layouts`); the experts of a
mixture-of-experts layer are one tensor per expert in the original checkpoints (transformers 5
fuses them when it loads), stacked over experts in itune (``E`` experts)::

    model.layers.l.block_sparse_moe.gate.weight            (E, d)    blocks/moe/router[l]  (d, E)
    model.layers.l.block_sparse_moe.experts.e.w1.weight    (mlp, d)  blocks/moe/gate[l, e] (d, mlp)
    model.layers.l.mlp.experts.e.down_proj.weight          (d, mlp)  blocks/moe/down[l, e] (mlp, d)

(Mixtral's ``w1``, ``w3``, ``w2``; Qwen3-MoE's ``mlp.gate`` and ``gate_proj``, ``up_proj``,
``down_proj``.) Both sides use rotate-half RoPE, so q and k rows need no permutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for safetensors' numpy reader)
import numpy as np
from flax import nnx
from safetensors import safe_open

from itune import atomic, sharding
from itune.convert import weights
from itune.convert.hf_config import config_from_hf, config_to_hf
from itune.convert.tokenizer_files import read_json as _read_json, save_tokenizer
from itune.convert.tokenizer_files import write_json as _write_json
from itune.model import lora
from itune.model.decoder import ModelConfig

# Non-persistent buffers that old checkpoints saved; they hold nothing the config does not.
_IGNORED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
_READ_DTYPES = ("F32", "F16", "BF16", "F64")  # Cast to model.param_dtype when placed.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one itune parameter is stored in Hugging Face tensors.

    ``kind``: ``copy`` (same layout), ``transpose`` (2-D, swapped), ``heads_in`` (HF
    ``(heads * head_dim, d)``, itune ``(d, heads, head_dim)``), ``heads_out`` (HF
    ``(d, heads * head_dim)``, itune ``(heads, head_dim, d)``), ``heads_bias`` (HF
    ``(heads * head_dim,)``, itune ``(heads, head_dim)``), ``experts`` (one HF tensor
    ``(out, in)`` per expert, itune ``(experts, in, out)``). ``name`` has ``{}`` for the layer
    of a stacked parameter, and a second ``{}`` for the expert.
    """

    name: str
    kind: str

    @property
    def stacked(self) -> bool:
        return "{}" in self.name


_LAYER = "model.layers.{}."
LAYOUTS = {
    "embed": _Layout("model.embed_tokens.weight", "copy"),
    "lm_head": _Layout("lm_head.weight", "transpose"),
    "final_norm/scale": _Layout("model.norm.weight", "copy"),
    "blocks/attn_norm/scale": _Layout(_LAYER + "input_layernorm.weight", "copy"),
    "blocks/mlp_norm/scale": _Layout(_LAYER + "post_attention_layernorm.weight", "copy"),
    "blocks/mlp/gate": _Layout(_LAYER + "mlp.gate_proj.weight", "transpose"),
    "blocks/mlp/up": _Layout(_LAYER + "mlp.up_proj.weight", "transpose"),
    "blocks/mlp/down": _Layout(_LAYER + "mlp.down_proj.weight", "transpose"),
    "blocks/attn/o": _Layout(_LAYER + "self_attn.o_proj.weight", "heads_out"),
    **{
        f"blocks/attn/{x}": _Layout(_LAYER + f"self_attn.{x}_proj.weight", "heads_in")
        for x in "qkv"
    },
    **{
        f"blocks/attn/{x}_bias": _Layout(_LAYER + f"self_attn.{x}_proj.bias", "heads_bias")
        for x in "qkv"
    },
}
# Gemma 2 and 3: a norm before and after attention and before and after the MLP.
_SANDWICH_NORMS = {
    "blocks/attn_post_norm/scale": _Layout(_LAYER + "post_attention_layernorm.weight", "copy"),
    "blocks/mlp_norm/scale": _Layout(_LAYER + "pre_feedforward_layernorm.weight", "copy"),
    "blocks/mlp_post_norm/scale": _Layout(_LAYER + "post_feedforward_layernorm.weight", "copy"),
}
_QK_NORMS = {
    f"blocks/attn/{x}_norm/scale": _Layout(_LAYER + f"self_attn.{x}_norm.weight", "copy")
    for x in "qk"
}


def _experts(module: str, router: str, gate: str, up: str, down: str) -> dict[str, _Layout]:
    prefix = _LAYER + module + "."
    return {
        "blocks/moe/router": _Layout(prefix + router + ".weight", "transpose"),
        **{
            f"blocks/moe/{path}": _Layout(prefix + "experts.{}." + name + ".weight", "experts")
            for path, name in (("gate", gate), ("up", up), ("down", down))
        },
    }


_MIXTRAL_EXPERTS = _experts("block_sparse_moe", "gate", "w1", "w3", "w2")
_QWEN3_MOE_EXPERTS = _experts("mlp", "gate", "gate_proj", "up_proj", "down_proj")


def layouts(cfg: ModelConfig) -> dict[str, _Layout]:
    """``{itune parameter path: _Layout}`` of ``cfg``'s family (`LAYOUTS` is Llama's)."""
    out = dict(LAYOUTS)
    if cfg.post_norms:
        out.update(_SANDWICH_NORMS)
    if cfg.qk_norm:
        out.update(_QK_NORMS)
    if cfg.num_experts:
        out.update(_QWEN3_MOE_EXPERTS if cfg.qk_norm else _MIXTRAL_EXPERTS)
    return out


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of an itune (per-layer) shape."""
    if kind == "copy":
        return shape
    if kind == "transpose":
        return shape[::-1]
    if kind == "heads_in":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":
        return (shape[2], shape[0] * shape[1])
    if kind == "heads_bias":
        return (shape[0] * shape[1],)
    raise AssertionError(kind)


def _entries(layout: _Layout, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """``[(Hugging Face name, shape)]`` of the tensors that hold an itune parameter of
    ``shape``, in the order `_values` gives them."""
    if not layout.stacked:
        return [(layout.name, _hf_shape(layout.kind, shape))]
    if layout.kind == "experts":
        one = _hf_shape("transpose", shape[2:])
        layers, experts = range(shape[0]), range(shape[1])
        return [(layout.name.format(layer, e), one) for layer in layers for e in experts]
    one = _hf_shape(layout.kind, shape[1:])
    return [(layout.name.format(layer), one) for layer in range(shape[0])]


def _values(layout: _Layout, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """``(Hugging Face name, array)`` of each tensor of the itune parameter ``value``."""
    if not layout.stacked:
        yield layout.name, _to_hf(layout.kind, value)
    elif layout.kind == "experts":
        for layer in range(value.shape[0]):
            for e in range(value.shape[1]):
                yield layout.name.format(layer, e), value[layer, e].T
    else:
        for layer in range(value.shape[0]):
            yield layout.name.format(layer), _to_hf(layout.kind, value[layer])


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{Hugging Face tensor name: shape}`` of every tensor a checkpoint of ``cfg`` holds."""
    table = layouts(cfg)
    return {
        name: shape
        for path, param_shape in weights.param_shapes(cfg).items()
        for name, shape in _entries(table[path], param_shape)
    }


def _read_part(tensor, kind: str, index: tuple[slice, ...], head_dim: int) -> np.ndarray:
    """Part ``index`` (of the itune layout) of a lazily sliced Hugging Face tensor."""
    if kind == "copy":
        return tensor[index]
    if kind == "transpose":
        return tensor[index[1], index[0]].T
    if kind == "heads_in":
        d, h, k = index
        rows = tensor[h.start * head_dim : h.stop * head_dim, d]
        return rows.reshape(h.stop - h.start, head_dim, d.stop - d.start)[:, k].transpose(2, 0, 1)
    if kind == "heads_out":
        h, k, d = index
        cols = tensor[d, h.start * head_dim : h.stop * head_dim]
        return cols.reshape(d.stop - d.start, h.stop - h.start, head_dim)[:, :, k].transpose(
            1, 2, 0
        )
    if kind == "heads_bias":
        h, k = index
        return tensor[h.start * head_dim : h.stop * head_dim].reshape(-1, head_dim)[:, k]
    raise AssertionError(kind)


def _to_hf(kind: str, value: np.ndarray) -> np.ndarray:
    """One (per-layer) itune value in its Hugging Face layout."""
    if kind == "copy":
        return value
    if kind == "transpose":
        return value.T
    if kind == "heads_in":
        return value.reshape(value.shape[0], -1).T
    if kind == "heads_out":
        return value.reshape(-1, value.shape[-1]).T
    if kind == "heads_bias":
        return value.reshape(-1)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------
# Import


class Checkpoint:
    """The tensors of a safetensors checkpoint folder (``model.safetensors``, or shards listed
    in ``model.safetensors.index.json``), memory-mapped; nothing is read until sliced."""

    def __init__(self, path: str):
        self.path = path
        single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
        if os.path.exists(single):
            files, weight_map = [SINGLE_FILE], None
        elif os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            found = sorted(os.listdir(path)) if os.path.isdir(path) else []
            raise FileNotFoundError(
                f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints "
                f"are read; the folder holds {found})"
            )
        self._files: dict[str, Any] = {}
        self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}  # name: file, shape, dtype
        for file in files:
            full = os.path.join(path, file)
            if not os.path.exists(full):
                raise ValueError(f"{index}: lists {file}, which is missing")
            handle = safe_open(full, framework="numpy")
            self._files[file] = handle
            for name in handle.keys():
                part = handle.get_slice(name)
                self.tensors[name] = (file, tuple(part.get_shape()), part.get_dtype())
        for name, file in (weight_map or {}).items():
            if name not in self.tensors or self.tensors[name][0] != file:
                raise ValueError(f"{index}: tensor {name} is listed in {file} but is not there")

    def where(self, name: str) -> str:
        return os.path.join(self.path, self.tensors[name][0])

    def slice(self, name: str):
        """The lazily sliceable tensor ``name`` (numpy slices, bfloat16 through ml_dtypes)."""
        return self._files[self.tensors[name][0]].get_slice(name)

    def check(self, cfg: ModelConfig) -> None:
        """ValueError naming the tensor and file where the checkpoint and ``cfg`` disagree."""
        expected = hf_tensor_shapes(cfg)
        for name, shape in expected.items():
            if name not in self.tensors:
                raise ValueError(
                    f"{self.path}: tensor {name} {shape} is missing (files: "
                    f"{sorted(self._files)})"
                )
            file, actual, dtype = self.tensors[name]
            if actual != shape:
                raise ValueError(
                    f"{os.path.join(self.path, file)}: tensor {name} has shape {actual}, but "
                    f"config.json makes it {shape}"
                )
            if dtype not in _READ_DTYPES:
                raise ValueError(
                    f"{os.path.join(self.path, file)}: tensor {name} has dtype {dtype}; "
                    f"expected one of {list(_READ_DTYPES)}"
                )
        unexpected = [
            name
            for name in self.tensors
            if name not in expected and not _IGNORED.fullmatch(name)
            # A tied checkpoint may also carry the (same) output embedding.
            and not (name == "lm_head.weight" and cfg.tie_embeddings)
        ]
        if unexpected:
            files = sorted({self.tensors[n][0] for n in unexpected})
            raise ValueError(
                f"{self.path}: unexpected tensors {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''} in {files}; config.json does not "
                "account for them"
            )

    def reader(self, cfg: ModelConfig) -> weights.Reader:
        """A `weights.Reader` that slices each part of each itune parameter out of the files."""

        table = layouts(cfg)

        def read_layer(layout: _Layout, layer: int, index: tuple[slice, ...]) -> np.ndarray:
            if layout.kind != "experts":
                tensor = self.slice(layout.name.format(layer))
                return _read_part(tensor, layout.kind, index, cfg.head_dim)
            experts = range(*index[0].indices(cfg.num_experts))
            return np.stack(
                [
                    _read_part(
                        self.slice(layout.name.format(layer, e)), "transpose", index[1:], 0
                    )
                    for e in experts
                ]
            )

        def read(path: str, index: tuple[slice, ...]) -> np.ndarray:
            layout = table[path]
            if not layout.stacked:
                return _read_part(self.slice(layout.name), layout.kind, index, cfg.head_dim)
            layers = range(*index[0].indices(cfg.num_layers))
            return np.stack([read_layer(layout, layer, index[1:]) for layer in layers])

        return read

    def close(self) -> None:
        self._files.clear()


def load_hf_config(path: str, **overrides: Any) -> ModelConfig:
    """`config_from_hf` of ``path/config.json``."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json")
    return config_from_hf(_read_json(file), **overrides)


def load_hf(
    path: str,
    mesh=None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    param_dtype: str = "float32",
    dtype: str = "float32",
    **overrides: Any,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """``(config, graphdef, params)`` of a Hugging Face checkpoint folder; ``nnx.merge(graphdef,
    params)`` is the model. Each parameter is built shard by shard on ``mesh`` (one device
    without) and cast to ``param_dtype``; ``overrides`` set other `ModelConfig` fields
    (``attention``, ``remat``...). A missing, misshapen or unexpected tensor is a ValueError
    naming it and its file."""
    cfg = load_hf_config(path, param_dtype=param_dtype, dtype=dtype, **overrides)
    checkpoint = Checkpoint(path)
    try:
        checkpoint.check(cfg)
        graphdef, params = weights.place_params(cfg, checkpoint.reader(cfg), mesh, rules)
    finally:
        checkpoint.close()
    return cfg, graphdef, params


# ----------------------------------------------------------------------------------------------
# Export


def _hf_tensors(cfg: ModelConfig, params: nnx.State, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` per Hugging Face tensor, gathering one itune parameter at a time."""
    table = layouts(cfg)
    for path, value in weights.host_params(params):
        for name, array in _values(table[path], value):
            yield name, array.astype(dtype)
        del value


def _plan(cfg: ModelConfig, params: nnx.State, itemsize: int, max_shard_bytes: int):
    """The tensors ``[(name, shape)]`` of each shard, in the order `_hf_tensors` makes them."""
    table = layouts(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for path, variable in nnx.to_flat_state(params):
        path = "/".join(map(str, path))
        if path not in table:
            raise ValueError(f"parameter {path} has no Hugging Face tensor")
        for name, hf_shape in _entries(table[path], tuple(variable.shape)):
            nbytes = math.prod(hf_shape) * itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, hf_shape))
            size += nbytes
    return shards


def _write_safetensors(
    file: str | None,
    entries: Sequence[tuple[str, tuple[int, ...]]],
    code: str,
    itemsize: int,
    tensors: Iterator[tuple[str, np.ndarray]],
) -> None:
    """A safetensors file of ``entries`` whose data come from the iterator ``tensors``, written
    as they come: the header is known from the shapes, so one tensor is in memory at a time.
    With ``file`` None the tensors are only drawn (a process that gathers but does not write)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # The data start 8-byte aligned, as safetensors writes them.
    with open(file, "wb") if file else contextlib.nullcontext() as f:
        if f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
        for name, shape in entries:
            got, value = next(tensors)
            if got != name or tuple(value.shape) != tuple(shape):
                raise AssertionError(f"writing {name} {shape}, got {got} {value.shape}")
            if f:
                f.write(np.ascontiguousarray(value).tobytes())


def save_hf(
    path: str,
    cfg: ModelConfig,
    params: nnx.State,
    tokenizer: Any = None,
    chat_format: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
) -> None:
    """Writes a Hugging Face model folder that transformers loads as `family_of(cfg)`.

    ``config.json``; ``model.safetensors``, or above ``max_shard_bytes`` the shards
    ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``, in ``dtype``
    (default: ``cfg.param_dtype``), streamed one tensor at a time. ``tokenizer``: a folder (its
    Hugging Face tokenizer files are copied; an itune folder of vocab.json + merges.txt is
    converted, keeping the chat template of its ``tokenizer_meta.json``), an `HFTokenizer` or a
    `SentencePieceTokenizer` (written as ``tokenizer.model``);
    ``chat_format`` (a name or `ChatFormat`) puts its Jinja chat template (`chat_template`) in
    ``tokenizer_config.json``.

    A LoRA model (``cfg.lora_rank > 0``) is exported merged (`lora.merge`): a plain model with
    the adapters folded into its weights. `save_adapters` writes the adapters alone.

    Every process must call it (parameters are gathered across processes); process 0 writes.
    """
    if cfg.lora_rank:
        cfg, params = lora.merge(cfg, params)
    dtype = dtype or cfg.param_dtype
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_SAFETENSORS_DTYPES)}")
    np_dtype = np.dtype(dtype)  # bfloat16 through ml_dtypes.
    hf_config = config_to_hf(cfg, dtype)
    if tokenizer is None and chat_format is not None:
        raise ValueError("save_hf: a chat_format needs a tokenizer to attach its template to")
    writes = jax.process_index() == 0
    # Process 0 writes into a temporary folder that becomes ``path`` once complete; a failure (a
    # full disk, Ctrl-C) leaves ``path`` as it was.
    with (atomic.folder(path, merge=True) if writes else contextlib.nullcontext()) as out:
        files = _save_hf_files(out, cfg, params, np_dtype, max_shard_bytes, dtype)
        if writes:
            if tokenizer is not None:
                hf_config.update(save_tokenizer(out, tokenizer, chat_format))
            _write_json(os.path.join(out, "config.json"), hf_config)
    if writes:
        for old in os.listdir(path):  # Weights of an earlier export would mix with these.
            if old not in files and _is_weights_file(old):
                os.remove(os.path.join(path, old))


def _is_weights_file(name: str) -> bool:
    return name in (SINGLE_FILE, INDEX_FILE) or bool(
        re.fullmatch(r"model-\d+-of-\d+\.safetensors", name)
    )


def _save_hf_files(
    out: str | None, cfg: ModelConfig, params: nnx.State, np_dtype, max_shard_bytes: int, dtype: str
) -> set[str]:
    """The weights as safetensors in the folder ``out`` (None: gathered, not written); returns
    the names of the files."""
    shards = _plan(cfg, params, np_dtype.itemsize, max_shard_bytes)
    tensors = _hf_tensors(cfg, params, np_dtype)
    code = _SAFETENSORS_DTYPES[dtype]
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        file = (
            SINGLE_FILE
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        _write_safetensors(
            os.path.join(out, file) if out else None, entries, code, np_dtype.itemsize, tensors
        )
        for name, shape in entries:
            weight_map[name] = file
            total += math.prod(shape) * np_dtype.itemsize
    if next(tensors, None) is not None:
        raise AssertionError("parameters left over after the planned tensors")
    files = set(weight_map.values())
    if out and len(shards) > 1:
        _write_json(
            os.path.join(out, INDEX_FILE),
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )
        files.add(INDEX_FILE)
    return files
