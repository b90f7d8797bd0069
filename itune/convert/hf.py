"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Gemma in safetensors.

`config_from_hf` reads a ``config.json`` into a `ModelConfig` (anything itune's decoder cannot
compute exactly is a ValueError naming the field). `load_hf` places a checkpoint's weights shard
by shard through `itune.convert.weights.place_params`: each device's part of each parameter is
sliced straight out of the memory-mapped safetensors files (layer by layer for the stacked
blocks), so no host holds a whole checkpoint. `save_hf` writes the reverse: ``config.json``,
``model.safetensors`` (or shards and their index), streamed one tensor at a time, and optionally
the tokenizer with a chat template for one of itune's chat formats
(`itune.convert.tokenizer_files`). LoRA adapters alone: `itune.convert.peft`.

Hugging Face linear weights are ``(out, in)``; itune's are ``(in, out)`` with heads split out
(``l`` a layer, ``H`` heads, ``K`` head_dim)::

    model.layers.l.self_attn.q_proj.weight  (H * K, d)    blocks/attn/q[l]    (d, H, K)
    model.layers.l.self_attn.o_proj.weight  (d, H * K)    blocks/attn/o[l]    (H, K, d)
    model.layers.l.mlp.gate_proj.weight     (mlp, d)      blocks/mlp/gate[l]  (d, mlp)
    lm_head.weight                          (vocab, d)    lm_head             (d, vocab)

Both sides use rotate-half RoPE, so q and k rows need no permutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for safetensors' numpy reader)
import numpy as np
from flax import nnx
from safetensors import safe_open

from itune import sharding
from itune.convert import weights
from itune.convert.tokenizer_files import read_json as _read_json, save_tokenizer
from itune.convert.tokenizer_files import write_json as _write_json
from itune.model import lora
from itune.model.decoder import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
}
# What transformers assumes for a field that config.json leaves out, where it matters.
_DEFAULTS = {
    "llama": dict(tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-6),
    "mistral": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        num_key_value_heads=8,
        sliding_window=4096,
    ),
    "qwen2": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        num_key_value_heads=32,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "gemma": dict(
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        num_key_value_heads=16,
        head_dim=256,
    ),
}
# transformers' ACT2FN names -> itune's MLP activations.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
_EXPORT_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# Non-persistent buffers that old checkpoints saved; they hold nothing the config does not.
_IGNORED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
_READ_DTYPES = ("F32", "F16", "BF16", "F64")  # Cast to model.param_dtype when placed.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------
# config.json


def _unsupported(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json: {field}={value!r} is not supported: {why}")


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face ``config.json`` dict of a Llama, Mistral, Qwen2 or
    Gemma (v1) causal LM. ``overrides`` replace fields afterwards (``param_dtype``,
    ``attention``...). Rope parameters may be in transformers 5's ``rope_parameters`` or in the
    older ``rope_theta`` and ``rope_scaling``.

    >>> cfg = config_from_hf(dict(model_type="llama", vocab_size=100, hidden_size=64,
    ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...     num_key_value_heads=2, rope_theta=500000.0))
    >>> cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_embeddings
    (16, 2, 500000.0, False)
    """
    hf = dict(hf_config)
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise _unsupported("model_type", family, f"expected one of {sorted(ARCHITECTURES)}")
    for architecture in hf.get("architectures") or []:
        if architecture != ARCHITECTURES[family]:
            raise _unsupported(
                "architectures", hf["architectures"], f"expected [{ARCHITECTURES[family]!r}]"
            )
    # Defaults only for absent fields: an explicit null means something (Mistral's
    # "sliding_window": null is no window).
    hf = {**_DEFAULTS[family], **hf}

    def need(field: str) -> Any:
        if hf.get(field) is None:
            raise ValueError(f"config.json: {field} is missing")
        return hf[field]

    if hf.get("quantization_config"):
        raise _unsupported("quantization_config", hf["quantization_config"], "quantized weights")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field) and family != "qwen2":
            raise _unsupported(field, hf[field], "itune has bias only on q, k and v (Qwen2)")
    if hf.get("use_bidirectional_attention"):
        raise _unsupported(
            "use_bidirectional_attention", True, "itune's decoder attends causally only"
        )
    heads = int(need("num_attention_heads"))
    d_model = int(need("hidden_size"))
    head_dim = int(hf.get("head_dim") or d_model // heads)
    act_name = hf.get("hidden_act")
    if family == "gemma":
        # Gemma's "gelu" means the tanh approximation (as transformers reads it); an older
        # hidden_activation field, when given, wins over hidden_act.
        act_name = hf.get("hidden_activation") or act_name
        act_name = "gelu_pytorch_tanh" if act_name == "gelu" else act_name
    if act_name is None:
        need("hidden_act")
    if act_name not in _ACTIVATIONS:
        field = "hidden_activation" if hf.get("hidden_activation") == act_name else "hidden_act"
        raise _unsupported(field, act_name, f"expected one of {sorted(_ACTIVATIONS)}")
    return dataclasses.replace(
        ModelConfig(
            vocab_size=int(need("vocab_size")),
            d_model=d_model,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            mlp_dim=int(need("intermediate_size")),
            max_seq_len=int(hf.get("max_position_embeddings") or 8192),
            norm_eps=float(need("rms_norm_eps")),
            norm_plus_one=family == "gemma",
            embed_scale=family == "gemma",
            mlp_activation=_ACTIVATIONS[act_name],
            qkv_bias=family == "qwen2",
            tie_embeddings=bool(hf["tie_word_embeddings"]),
            sliding_window=_sliding_window(family, hf),
            **_rope(hf),
        ),
        **overrides,
    )


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig's rope fields from ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(field) or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        # Per layer type (transformers 5): fine as long as every layer type has the same rope.
        kinds = list(params.values())
        if any(dict(k) != dict(kinds[0]) for k in kinds):
            raise _unsupported(field, hf[field], "rope parameters differ between layer types")
        params = dict(kinds[0])
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _unsupported("partial_rotary_factor", partial, "RoPE must cover the whole head")
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling="none")
    if kind != "llama3":
        raise _unsupported(f"{field}.rope_type", kind, "expected 'default' or 'llama3'")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ValueError(f"config.json: {field}.{key} is missing (rope_type 'llama3')")
    return dict(
        rope_theta=theta,
        rope_scaling="llama3",
        rope_scaling_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_len=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        ),
    )


def _sliding_window(family: str, hf: Mapping[str, Any]) -> int:
    """Mistral's window applies to every layer; Qwen2's only with ``use_sliding_window``, and
    then to the layers that ``layer_types`` (or ``max_window_layers``) mark as sliding."""
    if family == "mistral":
        return int(hf.get("sliding_window") or 0)
    if family != "qwen2" or not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return 0
    layers = int(hf["num_hidden_layers"])
    kinds = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf["max_window_layers"]) else "full_attention"
        for i in range(layers)
    ]
    if set(kinds) == {"full_attention"}:
        return 0
    if set(kinds) == {"sliding_attention"}:
        return int(hf["sliding_window"])
    field = "layer_types" if hf.get("layer_types") else "max_window_layers"
    raise _unsupported(
        field, hf.get(field), "itune applies one sliding window to every layer or to none"
    )


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face model type that computes what ``cfg`` does: Gemma for its norm and
    embedding scale, Qwen2 for q/k/v bias, Mistral for a sliding window, else Llama."""
    if cfg.norm_plus_one or cfg.embed_scale:
        if not (cfg.norm_plus_one and cfg.embed_scale):
            raise ValueError(
                "model.norm_plus_one and model.embed_scale exist in Hugging Face only together "
                f"(Gemma); got norm_plus_one={cfg.norm_plus_one}, embed_scale={cfg.embed_scale}"
            )
        for field, value in (("qkv_bias", cfg.qkv_bias), ("sliding_window", cfg.sliding_window)):
            if value:
                raise ValueError(f"model.{field}={value!r} has no Gemma equivalent")
        if cfg.mlp_activation == "gelu":
            raise ValueError("model.mlp_activation='gelu': Gemma reads 'gelu' as tanh GELU")
        return "gemma"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` (see `family_of`), readable by transformers 4 and 5."""
    family = family_of(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=float(cfg.rope_scaling_factor),
            low_freq_factor=float(cfg.rope_low_freq_factor),
            high_freq_factor=float(cfg.rope_high_freq_factor),
            original_max_position_embeddings=int(cfg.rope_original_max_len),
        )
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": _EXPORT_ACTIVATIONS[cfg.mlp_activation],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        # transformers 4 reads these two instead.
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": rope if cfg.rope_scaling == "llama3" else None,
        "attention_dropout": 0.0,
        "dtype": dtype or cfg.param_dtype,
        "torch_dtype": dtype or cfg.param_dtype,  # transformers 4's name.
    }
    if family in ("llama", "gemma"):
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family == "gemma":
        hf["hidden_activation"] = hf["hidden_act"]  # transformers 4 reads this one.
    if family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if family == "qwen2":
        sliding = bool(cfg.sliding_window)
        hf.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window or None,
            max_window_layers=0 if sliding else cfg.num_layers,
            layer_types=[("sliding" if sliding else "full") + "_attention"] * cfg.num_layers,
        )
    return hf


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one itune parameter is stored in Hugging Face tensors.

    ``kind``: ``copy`` (same layout), ``transpose`` (2-D, swapped), ``heads_in`` (HF
    ``(heads * head_dim, d)``, itune ``(d, heads, head_dim)``), ``heads_out`` (HF
    ``(d, heads * head_dim)``, itune ``(heads, head_dim, d)``), ``heads_bias`` (HF
    ``(heads * head_dim,)``, itune ``(heads, head_dim)``). ``name`` has ``{}`` for the layer
    of a stacked parameter.
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


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{Hugging Face tensor name: shape}`` of every tensor a checkpoint of ``cfg`` holds."""
    out = {}
    for path, shape in weights.param_shapes(cfg).items():
        layout = LAYOUTS[path]
        if layout.stacked:
            for layer in range(shape[0]):
                out[layout.name.format(layer)] = _hf_shape(layout.kind, shape[1:])
        else:
            out[layout.name] = _hf_shape(layout.kind, shape)
    return out


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

        def read(path: str, index: tuple[slice, ...]) -> np.ndarray:
            layout = LAYOUTS[path]
            if not layout.stacked:
                return _read_part(self.slice(layout.name), layout.kind, index, cfg.head_dim)
            layers = range(*index[0].indices(cfg.num_layers))
            return np.stack(
                [
                    _read_part(
                        self.slice(layout.name.format(layer)), layout.kind, index[1:], cfg.head_dim
                    )
                    for layer in layers
                ]
            )

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


def _hf_tensors(params: nnx.State, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` per Hugging Face tensor, gathering one itune parameter at a time."""
    for path, value in weights.host_params(params):
        layout = LAYOUTS[path]
        if layout.stacked:
            for layer in range(value.shape[0]):
                yield layout.name.format(layer), _to_hf(layout.kind, value[layer]).astype(dtype)
        else:
            yield layout.name, _to_hf(layout.kind, value).astype(dtype)
        del value


def _plan(params: nnx.State, itemsize: int, max_shard_bytes: int):
    """The tensors ``[(name, shape)]`` of each shard, in the order `_hf_tensors` makes them."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for path, variable in nnx.to_flat_state(params):
        path = "/".join(map(str, path))
        if path not in LAYOUTS:
            raise ValueError(f"parameter {path} has no Hugging Face tensor")
        layout, shape = LAYOUTS[path], tuple(variable.shape)
        names = (
            [(layout.name.format(i), shape[1:]) for i in range(shape[0])]
            if layout.stacked
            else [(layout.name, shape)]
        )
        for name, one in names:
            hf_shape = _hf_shape(layout.kind, one)
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
    if writes:
        os.makedirs(path, exist_ok=True)
        for old in os.listdir(path):  # Weights of an earlier export would mix with these.
            if old in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(
                r"model-\d+-of-\d+\.safetensors", old
            ):
                os.remove(os.path.join(path, old))

    shards = _plan(params, np_dtype.itemsize, max_shard_bytes)
    tensors = _hf_tensors(params, np_dtype)
    code = _SAFETENSORS_DTYPES[dtype]
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        file = (
            SINGLE_FILE
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        _write_safetensors(
            os.path.join(path, file) if writes else None, entries, code, np_dtype.itemsize, tensors
        )
        for name, shape in entries:
            weight_map[name] = file
            total += math.prod(shape) * np_dtype.itemsize
    if next(tensors, None) is not None:
        raise AssertionError("parameters left over after the planned tensors")
    if not writes:
        return
    if len(shards) > 1:
        _write_json(
            os.path.join(path, INDEX_FILE),
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )
    if tokenizer is not None:
        hf_config.update(save_tokenizer(path, tokenizer, chat_format))
    _write_json(os.path.join(path, "config.json"), hf_config)
