"""Importing a llama.cpp GGUF file: the model, its tokenizer and chat format.

Architectures (``general.architecture``): ``llama`` (LLaMA, Mistral, SmolLM2), ``qwen3``,
``qwen3moe`` (Qwen3-MoE), ``gemma2`` and ``gemma3`` (the text model), as transformers' GGUF loader
reads them; any other, or a feature of one that neither reads (a Mixtral-style ``llama`` file
with experts, shared experts, YaRN), is refused with a `GGUFError` naming it.

`load_gguf` reads the model's shape from the file's metadata and places its weights shard by
shard (`itune.convert.weights.place_params`), dequantizing only the rows of one GGUF tensor that a
shard needs at a time, never the whole model. Every type the ``gguf`` package dequantizes is
supported (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ types, ...).

Layout: a 2-D GGUF tensor, read as numpy, is the ``torch.nn.Linear`` weight ``(out, in)`` (ggml
lists its dimensions the other way round); experts are stacked, ``(experts, out, in)``. llama.cpp
stores the rows of the q and k projections of each head of a ``llama`` file permuted for
interleaved (GPT-J style) RoPE; itune's RoPE is rotate-half (as in Hugging Face LLaMA), so they
are un-permuted here as transformers' GGUF loader does (the other architectures use rotate-half
RoPE in llama.cpp too, and are stored as they are). Gemma's norms are stored as ``1 + w``.
Where llama.cpp fixes a value rather than storing it, the importer fixes the same one: Gemma 3's
local RoPE base 10000 and 5 local : 1 global layers, Gemma 2/3's query scaling by the head
dimension (by ``d_model / heads`` for the 27B models), Gemma 2's soft-caps 50 and 30 when absent,
Qwen3-MoE's renormalised top-k weights. Where transformers' loader ignores a key that llama.cpp
reads (a qwen3 file's head dimension, the experts' width, Gemma 3's RoPE scaling), itune reads it.

`load_gguf_tokenizer` builds an `HFTokenizer` from the tokenizer in the metadata (byte-level BPE,
``tokenizer.ggml.model == 'gpt2'``, or Gemma's SentencePiece vocabulary, ``'llama'``) and reads
the file's own chat template (``tokenizer.chat_template``) as a
`itune.data.jinja_template.ChatTemplate`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import gguf
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from itune import sharding
from itune.convert.weights import place_params
from itune.errors import UserError
from itune.model import attention
from itune.model.decoder import ModelConfig


class GGUFError(UserError, ValueError):
    """A GGUF file itune cannot read, in one line naming the key or tensor at fault."""


@dataclasses.dataclass(frozen=True)
class _Family:
    """How llama.cpp writes one architecture, and the `ModelConfig` fields it fixes."""

    fields: dict[str, Any]
    permuted_qk: bool = False  # q/k rows permuted for interleaved RoPE (convert_hf_to_gguf.py).
    # llama.cpp's number of layers of its 27B model, whose queries are scaled by
    # (d_model / heads) ** -0.5 rather than head_dim ** -0.5 (llama-model.cpp).
    layers_of_27b: int = 0


_GEMMA = dict(norm_plus_one=True, embed_scale=True, post_norms=True, mlp_activation="gelu_tanh")
FAMILIES = {
    "llama": _Family({}, permuted_qk=True),
    "qwen3": _Family(dict(qk_norm=True)),
    # llama.cpp always renormalises Qwen3-MoE's top-k weights (norm_topk_prob).
    "qwen3moe": _Family(dict(qk_norm=True, router_renormalize=True)),
    "gemma2": _Family(dict(_GEMMA, global_layer_every=2), layers_of_27b=46),
    # llama.cpp fixes Gemma 3's pattern (5 local : 1 global) and its local RoPE base.
    "gemma3": _Family(
        dict(_GEMMA, qk_norm=True, global_layer_every=6, rope_local_theta=10_000.0),
        layers_of_27b=62,
    ),
}
# Values llama.cpp assumes when a file leaves the key out (llama-model.cpp).
_DEFAULTS = {
    "gemma2": {
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "attention.sliding_window": 4096,
    },
}

# Types that are plain numbers in the file (the rest go through gguf.quants.dequantize).
_PLAIN_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.F64,
    gguf.GGMLQuantizationType.I8,
    gguf.GGMLQuantizationType.I16,
    gguf.GGMLQuantizationType.I32,
    gguf.GGMLQuantizationType.I64,
}


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader` over a plain array view of its memory map. Parsing a vocabulary slices
    the map a quarter of a million times, and numpy's memmap subclass adds Python work to each
    slice: the plain view parses SmolLM2's metadata in less than half the time."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._data = mapped.view(np.ndarray)  # Still backed by the map.


class _File:
    """A GGUF file's metadata and tensors (memory-mapped: nothing is read until asked for)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.reader = _Reader(self.path)
        except (ValueError, OSError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # The shortest decimal of the float32 (1e-06, not 9.99999997e-07): the value written.
            return float(str(np.float32(field.contents())))
        return field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: the GGUF metadata has no {key!r}")
        return value

    def key(self, name: str) -> str:
        """The architecture's own key ``name`` (``'qwen3.block_count'``)."""
        return f"{self.arch}.{name}"

    def arch_get(self, name: str, default: Any = None) -> Any:
        """The architecture's key ``name``, else llama.cpp's default for it, else ``default``."""
        value = self.get(self.key(name))
        if value is None:
            value = _DEFAULTS.get(self.arch, {}).get(name, default)
        return value

    def arch_require(self, name: str) -> Any:
        return self.require(self.key(name))

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's numpy shape (ggml lists the dimensions in reverse)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def rows(self, name: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Rows of a tensor (its first numpy dimension) dequantized to float32.

        Quantization blocks run along a row, so only the rows asked for are dequantized.
        """
        tensor = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        data = tensor.data[rows]
        if qtype in _PLAIN_TYPES:
            out = np.asarray(data, np.float32)
        else:
            try:
                out = gguf.quants.dequantize(data, qtype)
            except NotImplementedError as e:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} is of type {qtype.name}, which the gguf "
                    f"package cannot dequantize ({e})"
                ) from e
        shape = self.shape(name)
        return np.asarray(out, np.float32).reshape((-1,) + shape[1:] if len(shape) > 1 else -1)


def _open(path: str | os.PathLike) -> _File:
    """The parsed file, read once per process while it is unchanged: parsing the metadata of a
    tokenizer's vocabulary and merges takes seconds, and loading a model asks for it several
    times (its config, its weights, its tokenizer)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    stat = os.stat(path)
    return _parsed(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int) -> _File:
    del mtime_ns, size  # Only keys: a rewritten file is parsed again.
    return _File(path)


def _family(file: _File) -> _Family:
    arch = file.require("general.architecture")
    if arch not in FAMILIES:
        raise GGUFError(
            f"{file.path}: general.architecture is {arch!r}; load_gguf reads "
            f"{', '.join(map(repr, FAMILIES))} files"
        )
    return FAMILIES[arch]


def _rope_scaling(file: _File, base: ModelConfig) -> dict[str, Any]:
    """ModelConfig fields for the RoPE scaling the file describes ({} for none)."""
    kind = file.arch_get("rope.scaling.type")
    factor = file.arch_get("rope.scaling.factor")
    if kind == "linear" and factor and float(factor) > 0:
        fields = {"rope_scaling": "linear", "rope_scaling_factor": float(factor)}
        if factor == 1:
            fields = {}
    elif kind not in (None, "none") or (kind is None and factor not in (None, 1.0)):
        raise GGUFError(
            f"{file.path}: {file.key('rope.scaling.type')}={kind!r} "
            f"({file.key('rope.scaling.factor')}={factor!r}) is not supported; itune's RoPE "
            "knows linear scaling and Llama 3's"
        )
    else:
        fields = {}
    if "rope_freqs.weight" not in file.tensors:
        return fields
    # llama.cpp writes Llama 3 scaling as per-frequency divisors (convert_hf_to_gguf.py).
    factors = file.rows("rope_freqs.weight").astype(np.float64)
    if factors.shape != (base.head_dim // 2,):
        raise GGUFError(
            f"{file.path}: tensor 'rope_freqs.weight' has shape {factors.shape}; expected "
            f"({base.head_dim // 2},)"
        )
    if np.allclose(factors, 1.0):
        return fields
    if fields:
        raise GGUFError(
            f"{file.path}: tensor 'rope_freqs.weight' and {file.key('rope.scaling.type')}="
            f"{kind!r} both scale RoPE; itune applies one scaling only"
        )
    return _fit_llama3(file, base, factors)


def _fit_llama3(file: _File, base: ModelConfig, factors: np.ndarray) -> dict[str, Any]:
    """Llama 3 scaling parameters that give ``factors``, or a GGUFError if none do."""
    original = int(file.arch_get("rope.scaling.original_context_length") or 8192)
    factor = float(factors.max())
    exponents = np.arange(0, base.head_dim, 2, dtype=np.float64) / base.head_dim
    wavelen = 2 * np.pi * float(base.rope_theta) ** exponents
    # Between the bands, 1 / f = (1 - s) / factor + s with s = (original / wavelen - low) /
    # (high - low): a straight line in 1 / wavelen.
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    low, high = 1.0, 4.0
    if medium.sum() >= 2:
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
        if slope > 0:
            low = -intercept * original / slope
            high = low + original / slope
    fields = dict(
        rope_scaling="llama3",
        rope_scaling_factor=factor,
        rope_low_freq_factor=float(low),
        rope_high_freq_factor=float(high),
        rope_original_max_len=original,
    )
    expected = attention.rope_frequencies(dataclasses.replace(base, **fields))
    plain = attention.rope_frequencies(base) / factors
    if not np.allclose(expected, plain, rtol=1e-4, atol=0):
        raise GGUFError(
            f"{file.path}: tensor 'rope_freqs.weight' holds RoPE frequency factors that are not "
            "Llama 3 scaling, the only kind itune supports"
        )
    return fields


def _experts(file: _File) -> dict[str, Any]:
    """The mixture-of-experts fields (``{}`` for a dense file); a GGUFError for experts that
    neither itune nor transformers' GGUF loader reads."""
    count = int(file.arch_get("expert_count") or 0)
    if file.arch != "qwen3moe":
        if count:
            raise GGUFError(
                f"{file.path}: {file.key('expert_count')}={count}: transformers' GGUF loader "
                f"reads no experts in a {file.arch!r} file (Mixtral's layout), nor does itune; "
                "convert the Hugging Face checkpoint instead"
            )
        return {}
    unsupported = {
        "expert_shared_count": "shared experts",
        "leading_dense_block_count": "dense layers before the expert layers",
    }
    for name, what in unsupported.items():
        if file.arch_get(name):
            raise GGUFError(
                f"{file.path}: {file.key(name)}={file.arch_get(name)}: {what} are not supported"
            )
    gating = file.arch_get("expert_gating_func")
    if gating not in (None, gguf.ExpertGatingFuncType.SOFTMAX):
        raise GGUFError(
            f"{file.path}: {file.key('expert_gating_func')}={gating}: only a softmax router "
            "is supported"
        )
    return dict(
        num_experts=int(file.arch_require("expert_count")),
        experts_per_token=int(file.arch_require("expert_used_count")),
        mlp_dim=int(file.arch_require("expert_feed_forward_length")),
    )


def _config(file: _File, param_dtype: str, dtype: str, overrides: dict[str, Any]) -> ModelConfig:
    family = _family(file)
    d_model = int(file.arch_require("embedding_length"))
    num_layers = int(file.arch_require("block_count"))
    num_heads = int(file.arch_require("attention.head_count"))
    num_kv_heads = int(file.arch_get("attention.head_count_kv") or num_heads)
    head_dim = int(file.arch_get("attention.key_length") or d_model // num_heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        value = file.arch_get(key)
        if value is not None and int(value) != head_dim:
            raise GGUFError(
                f"{file.path}: {file.key(key)}={value} differs from the head dimension "
                f"{head_dim}; not supported"
            )
    tokens = file.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens else file.arch_get("vocab_size")
    if not vocab_size:
        vocab_size = (
            file.shape("token_embd.weight")[0] if "token_embd.weight" in file.tensors else 0
        )
    if not vocab_size:
        raise GGUFError(f"{file.path}: the GGUF metadata has no 'tokenizer.ggml.tokens'")
    fields = dict(family.fields)
    fields.update(_experts(file))
    if "mlp_dim" not in fields:
        fields["mlp_dim"] = int(file.arch_require("feed_forward_length"))
    if family.layers_of_27b:  # Gemma: llama.cpp scales queries by this, whatever the file says.
        scalar = d_model / num_heads if num_layers == family.layers_of_27b else head_dim
        fields["query_pre_attn_scalar"] = float(scalar)
    if "rope_local_theta" in fields:
        fields["rope_local_theta"] = float(
            file.arch_get("rope.freq_base_swa") or fields["rope_local_theta"]
        )
    window = int(file.arch_get("attention.sliding_window") or 0)
    if fields.get("global_layer_every") and not window:
        raise GGUFError(
            f"{file.path}: the GGUF metadata has no {file.key('attention.sliding_window')!r}"
        )
    base = ModelConfig(
        vocab_size=int(vocab_size),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=float(file.arch_get("rope.freq_base") or 10_000.0),
        max_seq_len=int(file.arch_get("context_length") or 8192),
        norm_eps=float(file.arch_get("attention.layer_norm_rms_epsilon") or 1e-5),
        sliding_window=window,
        attn_logit_softcap=float(file.arch_get("attn_logit_softcapping") or 0.0),
        final_logit_softcap=float(file.arch_get("final_logit_softcapping") or 0.0),
        tie_embeddings="output.weight" not in file.tensors,
        param_dtype=param_dtype,
        dtype=dtype,
        **fields,
    )
    cfg = dataclasses.replace(base, **_rope_scaling(file, base))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}")
    return dataclasses.replace(cfg, **overrides)


def gguf_config(
    path: str | os.PathLike, param_dtype: str = "float32", dtype: str = "float32", **overrides: Any
) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata; ``overrides`` set other fields
    (``attention``, ``remat``...)."""
    return _config(_open(path), param_dtype, dtype, overrides)


def _expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (the torch Linear ``(out, in)`` layout)."""
    d, v, m, e = cfg.d_model, cfg.vocab_size, cfg.mlp_dim, cfg.num_experts
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (v, d)
    for i in range(cfg.num_layers):
        layer = {
            "attn_norm": (d,),
            "attn_q": (q, d),
            "attn_k": (kv, d),
            "attn_v": (kv, d),
            "attn_output": (d, q),
            "ffn_norm": (d,),
        }
        if cfg.qk_norm:
            layer |= {"attn_q_norm": (cfg.head_dim,), "attn_k_norm": (cfg.head_dim,)}
        if cfg.post_norms:
            layer |= {"post_attention_norm": (d,), "post_ffw_norm": (d,)}
        if e:
            layer |= {
                "ffn_gate_inp": (e, d),
                "ffn_gate_exps": (e, m, d),
                "ffn_up_exps": (e, m, d),
                "ffn_down_exps": (e, d, m),
            }
        else:
            layer |= {"ffn_gate": (m, d), "ffn_up": (m, d), "ffn_down": (d, m)}
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in layer.items()})
    return shapes


def _check_tensors(file: _File, cfg: ModelConfig) -> None:
    expected = _expected_tensors(cfg)
    for name, shape in expected.items():
        if name not in file.tensors:
            raise GGUFError(f"{file.path}: the GGUF file has no tensor {name!r}")
        if file.shape(name) != shape:
            raise GGUFError(
                f"{file.path}: tensor {name!r} has shape {file.shape(name)}; the metadata "
                f"implies {shape}"
            )
    unexpected = sorted(set(file.tensors) - set(expected) - {"rope_freqs.weight"})
    if unexpected:
        raise GGUFError(
            f"{file.path}: tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} have "
            f"no place in itune's model of a {file.arch!r} file (biases? shared experts?)"
        )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q/k (interleaved -> rotate-half RoPE).

    llama.cpp writes ``w.reshape(heads, 2, head_dim // 2, ...).swapaxes(1, 2)``.
    """
    rest = w.shape[1:]
    return w.reshape(heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _head_rows(heads: slice, num_heads: int, head_dim: int) -> tuple[np.ndarray, int]:
    """The weight rows of the heads ``heads`` selects, and how many heads that is."""
    chosen = np.arange(num_heads)[heads]
    return (chosen[:, None] * head_dim + np.arange(head_dim)).reshape(-1), len(chosen)


def _layer_readers(
    file: _File, cfg: ModelConfig
) -> dict[str, Callable[[int, tuple[slice, ...]], np.ndarray]]:
    """itune path -> ``f(layer, index)``: one layer's part of a stacked parameter."""
    hd = cfg.head_dim
    permuted = FAMILIES[file.arch].permuted_qk
    # Gemma's norms are stored as 1 + w, itune's (like transformers') as w.
    offset = 1.0 if cfg.norm_plus_one else 0.0

    def projection(tensor: str, num_heads: int, permuted: bool):
        def read(layer, index):  # (d, heads, head_dim)
            d, heads, k = index
            rows, n = _head_rows(heads, num_heads, hd)
            w = file.rows(f"blk.{layer}.{tensor}.weight", rows)  # (n * hd, d_model)
            if permuted:
                w = _unpermute(w, n)
            return w.reshape(n, hd, -1).transpose(2, 0, 1)[d, :, k]

        return read

    def output(layer, index):  # (heads, head_dim, d)
        heads, k, d = index
        w = file.rows(f"blk.{layer}.attn_output.weight", d)  # (d, heads * hd)
        return w.T.reshape(cfg.num_heads, hd, -1)[heads, k]

    def transposed(tensor: str):
        def read(layer, index):  # (in, out) from the (out, in) weight
            w = file.rows(f"blk.{layer}.{tensor}.weight", index[1])
            return w.T[index[0]]

        return read

    def experts(tensor: str):
        def read(layer, index):  # (experts, in, out) from the (experts, out, in) weight
            w = file.rows(f"blk.{layer}.{tensor}.weight", index[0])
            return w.transpose(0, 2, 1)[:, index[1], index[2]]

        return read

    def norm(tensor: str):
        return lambda layer, index: file.rows(f"blk.{layer}.{tensor}.weight")[index] - offset

    readers = {
        "blocks/attn/q": projection("attn_q", cfg.num_heads, permuted),
        "blocks/attn/k": projection("attn_k", cfg.num_kv_heads, permuted),
        "blocks/attn/v": projection("attn_v", cfg.num_kv_heads, False),
        "blocks/attn/o": output,
        "blocks/attn_norm/scale": norm("attn_norm"),
        "blocks/mlp_norm/scale": norm("ffn_norm"),
        "blocks/attn/q_norm/scale": norm("attn_q_norm"),
        "blocks/attn/k_norm/scale": norm("attn_k_norm"),
        "blocks/attn_post_norm/scale": norm("post_attention_norm"),
        "blocks/mlp_post_norm/scale": norm("post_ffw_norm"),
        "blocks/mlp/gate": transposed("ffn_gate"),
        "blocks/mlp/up": transposed("ffn_up"),
        "blocks/mlp/down": transposed("ffn_down"),
        "blocks/moe/router": transposed("ffn_gate_inp"),
        "blocks/moe/gate": experts("ffn_gate_exps"),
        "blocks/moe/up": experts("ffn_up_exps"),
        "blocks/moe/down": experts("ffn_down_exps"),
    }
    return readers


def _reader(file: _File, cfg: ModelConfig) -> Callable[[str, tuple[slice, ...]], np.ndarray]:
    layers = _layer_readers(file, cfg)
    offset = 1.0 if cfg.norm_plus_one else 0.0

    def read(path: str, index: tuple[slice, ...]) -> np.ndarray:
        if path == "embed":  # (vocab, d)
            return file.rows("token_embd.weight", index[0])[:, index[1]]
        if path == "lm_head":  # (d, vocab)
            return file.rows("output.weight", index[1]).T[index[0]]
        if path == "final_norm/scale":
            return file.rows("output_norm.weight")[index] - offset
        if path not in layers:
            raise GGUFError(f"{file.path}: the GGUF importer has no source for {path!r}")
        parts = [layers[path](i, index[1:]) for i in range(cfg.num_layers)[index[0]]]
        return np.stack(parts) if parts else np.zeros((0,), np.float32)

    return read


def load_gguf(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    param_dtype: str = "float32",
    dtype: str = "float32",
    **overrides: Any,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """A GGUF file as ``(config, graphdef, params)``; ``nnx.merge(graphdef, params)`` is the
    model. Parameters are placed on ``mesh`` (without one, on the first device) and stored as
    ``param_dtype``; ``overrides`` set `ModelConfig` fields that leave the parameters' shapes
    alone (``attention``, ``remat``, ``scan_layers``...). A missing or misshapen tensor, or
    metadata itune cannot honour, is a `GGUFError` naming it."""
    file = _open(path)
    cfg = _config(file, param_dtype, dtype, overrides)
    _check_tensors(file, cfg)
    graphdef, params = place_params(cfg, _reader(file, cfg), mesh, rules)
    return cfg, graphdef, params


def load_gguf_tokenizer(path: str | os.PathLike):
    """``(HFTokenizer, chat format name or None)`` from a GGUF file's tokenizer metadata (see
    `itune.convert.gguf_tokenizer`)."""
    from itune.convert import gguf_tokenizer  # noqa: PLC0415  (it reads files through this module)

    return gguf_tokenizer.load_gguf_tokenizer(path)
