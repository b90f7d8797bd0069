"""Importing a llama.cpp GGUF file: a LLaMA-architecture model, its tokenizer and chat format.

`load_gguf` reads the model's shape from the file's metadata and places its weights shard by
shard (`itune.convert.weights.place_params`), dequantizing only the rows of one GGUF tensor that a
shard needs at a time, never the whole model. Every type the ``gguf`` package dequantizes is
supported (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ types, ...).

Layout: a 2-D GGUF tensor, read as numpy, is the ``torch.nn.Linear`` weight ``(out, in)`` (ggml
lists its dimensions the other way round). llama.cpp stores the rows of the q and k projections
of each head permuted for interleaved (GPT-J style) RoPE; itune's RoPE is rotate-half (as in
Hugging Face LLaMA), so they are un-permuted here as transformers' GGUF loader does.

`load_gguf_tokenizer` builds an `HFTokenizer` from the tokenizer in the metadata (byte-level BPE,
``tokenizer.ggml.model == 'gpt2'``) and names the itune chat format that the file's
``tokenizer.chat_template`` writes.
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
from tokenizers import AddedToken

from itune import sharding
from itune.convert.weights import place_params
from itune.data.hf_tokenizer import HFTokenizer, _byte_decoder
from itune.model import attention
from itune.model.decoder import ModelConfig

ARCHITECTURE = "llama"

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Chat formats by a marker their template writes, checked in this order.

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
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: the GGUF metadata has no {key!r}")
        return value

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
                raise ValueError(
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


def _meta(key: str) -> str:
    return f"{ARCHITECTURE}.{key}"


def _check_architecture(file: _File) -> None:
    arch = file.require("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(
            f"{file.path}: general.architecture is {arch!r}; load_gguf supports only "
            f"{ARCHITECTURE!r} (LLaMA, Mistral and SmolLM2 files use it)"
        )


def _rope_scaling(file: _File, base: ModelConfig) -> dict[str, Any]:
    """ModelConfig fields for the RoPE scaling the file describes ({} for none)."""
    kind = file.get(_meta("rope.scaling.type"))
    factor = file.get(_meta("rope.scaling.factor"))
    if kind not in (None, "none") or (kind is None and factor not in (None, 1.0)):
        raise ValueError(
            f"{file.path}: {_meta('rope.scaling.type')}={kind!r} "
            f"({_meta('rope.scaling.factor')}={factor!r}) is not supported; itune's RoPE "
            "knows no scaling but Llama 3's"
        )
    if "rope_freqs.weight" not in file.tensors:
        return {}
    # llama.cpp writes Llama 3 scaling as per-frequency divisors (convert_hf_to_gguf.py).
    factors = file.rows("rope_freqs.weight").astype(np.float64)
    if factors.shape != (base.head_dim // 2,):
        raise ValueError(
            f"{file.path}: tensor 'rope_freqs.weight' has shape {factors.shape}; expected "
            f"({base.head_dim // 2},)"
        )
    if np.allclose(factors, 1.0):
        return {}
    return _fit_llama3(file, base, factors)


def _fit_llama3(file: _File, base: ModelConfig, factors: np.ndarray) -> dict[str, Any]:
    """Llama 3 scaling parameters that give ``factors``, or a ValueError if none do."""
    original = int(file.get(_meta("rope.scaling.original_context_length")) or 8192)
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
        raise ValueError(
            f"{file.path}: tensor 'rope_freqs.weight' holds RoPE frequency factors that are not "
            "Llama 3 scaling, the only kind itune supports"
        )
    return fields


def _config(file: _File, param_dtype: str, dtype: str, overrides: dict[str, Any]) -> ModelConfig:
    _check_architecture(file)
    experts = file.get(_meta("expert_count"))
    if experts:
        raise ValueError(
            f"{file.path}: {_meta('expert_count')}={experts}: mixture-of-experts models "
            "are not supported"
        )
    d_model = int(file.require(_meta("embedding_length")))
    num_heads = int(file.require(_meta("attention.head_count")))
    num_kv_heads = int(file.get(_meta("attention.head_count_kv")) or num_heads)
    head_dim = int(file.get(_meta("attention.key_length")) or d_model // num_heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        value = file.get(_meta(key))
        if value is not None and int(value) != head_dim:
            raise ValueError(
                f"{file.path}: {_meta(key)}={value} differs from the head dimension "
                f"{head_dim}; not supported"
            )
    tokens = file.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens else file.get(_meta("vocab_size"))
    if not vocab_size:
        vocab_size = (
            file.shape("token_embd.weight")[0] if "token_embd.weight" in file.tensors else 0
        )
    if not vocab_size:
        raise ValueError(f"{file.path}: the GGUF metadata has no 'tokenizer.ggml.tokens'")
    base = ModelConfig(
        vocab_size=int(vocab_size),
        d_model=d_model,
        num_layers=int(file.require(_meta("block_count"))),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        mlp_dim=int(file.require(_meta("feed_forward_length"))),
        rope_theta=float(file.get(_meta("rope.freq_base")) or 10_000.0),
        max_seq_len=int(file.get(_meta("context_length")) or 8192),
        norm_eps=float(file.get(_meta("attention.layer_norm_rms_epsilon")) or 1e-5),
        sliding_window=int(file.get(_meta("attention.sliding_window")) or 0),
        tie_embeddings="output.weight" not in file.tensors,
        param_dtype=param_dtype,
        dtype=dtype,
    )
    cfg = dataclasses.replace(base, **_rope_scaling(file, base))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}")
    return dataclasses.replace(cfg, **overrides)


def gguf_config(
    path: str | os.PathLike, param_dtype: str = "float32", dtype: str = "float32", **overrides: Any
) -> ModelConfig:
    """The `ModelConfig` of a LLaMA-architecture GGUF file, from its metadata; ``overrides`` set
    other fields (``attention``, ``remat``...)."""
    return _config(_open(path), param_dtype, dtype, overrides)


def _expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (the torch Linear ``(out, in)`` layout)."""
    d, v, m = cfg.d_model, cfg.vocab_size, cfg.mlp_dim
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (v, d)
    for i in range(cfg.num_layers):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (d,),
                f"blk.{i}.attn_q.weight": (q, d),
                f"blk.{i}.attn_k.weight": (kv, d),
                f"blk.{i}.attn_v.weight": (kv, d),
                f"blk.{i}.attn_output.weight": (d, q),
                f"blk.{i}.ffn_norm.weight": (d,),
                f"blk.{i}.ffn_gate.weight": (m, d),
                f"blk.{i}.ffn_up.weight": (m, d),
                f"blk.{i}.ffn_down.weight": (d, m),
            }
        )
    return shapes


def _check_tensors(file: _File, cfg: ModelConfig) -> None:
    expected = _expected_tensors(cfg)
    for name, shape in expected.items():
        if name not in file.tensors:
            raise ValueError(f"{file.path}: the GGUF file has no tensor {name!r}")
        if file.shape(name) != shape:
            raise ValueError(
                f"{file.path}: tensor {name!r} has shape {file.shape(name)}; the metadata "
                f"implies {shape}"
            )
    unexpected = sorted(set(file.tensors) - set(expected) - {"rope_freqs.weight"})
    if unexpected:
        raise ValueError(
            f"{file.path}: tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} have "
            "no place in itune's LLaMA model (biases? another architecture?)"
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

    def norm(tensor: str):
        return lambda layer, index: file.rows(f"blk.{layer}.{tensor}.weight")[index]

    return {
        "blocks/attn/q": projection("attn_q", cfg.num_heads, True),
        "blocks/attn/k": projection("attn_k", cfg.num_kv_heads, True),
        "blocks/attn/v": projection("attn_v", cfg.num_kv_heads, False),
        "blocks/attn/o": output,
        "blocks/attn_norm/scale": norm("attn_norm"),
        "blocks/mlp_norm/scale": norm("ffn_norm"),
        "blocks/mlp/gate": transposed("ffn_gate"),
        "blocks/mlp/up": transposed("ffn_up"),
        "blocks/mlp/down": transposed("ffn_down"),
    }


def _reader(file: _File, cfg: ModelConfig) -> Callable[[str, tuple[slice, ...]], np.ndarray]:
    layers = _layer_readers(file, cfg)

    def read(path: str, index: tuple[slice, ...]) -> np.ndarray:
        if path == "embed":  # (vocab, d)
            return file.rows("token_embd.weight", index[0])[:, index[1]]
        if path == "lm_head":  # (d, vocab)
            return file.rows("output.weight", index[1]).T[index[0]]
        if path == "final_norm/scale":
            return file.rows("output_norm.weight")[index]
        if path not in layers:
            raise ValueError(f"{file.path}: the GGUF importer has no source for {path!r}")
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
    """A LLaMA-architecture GGUF file as ``(config, graphdef, params)``;
    ``nnx.merge(graphdef, params)`` is the model. Parameters are placed on ``mesh`` (without
    one, on the first device) and stored as ``param_dtype``; ``overrides`` set `ModelConfig`
    fields that leave the parameters' shapes alone (``attention``, ``remat``, ``scan_layers``...).
    A missing or misshapen tensor, or metadata itune cannot honour, is a ValueError naming it."""
    file = _open(path)
    cfg = _config(file, param_dtype, dtype, overrides)
    _check_tensors(file, cfg)
    graphdef, params = place_params(cfg, _reader(file, cfg), mesh, rules)
    return cfg, graphdef, params


def load_gguf_tokenizer(path: str | os.PathLike):
    """``(HFTokenizer, chat format name or None)`` from a GGUF file's tokenizer metadata.

    Control tokens (``<|im_start|>``...) become special tokens with their own single ids, and
    user-defined ones added tokens, as llama.cpp matches both whole in text. Only byte-level BPE
    vocabularies (``tokenizer.ggml.model == 'gpt2'``) with a pre-tokenizer `HFTokenizer` knows
    (``tokenizer.ggml.pre``: gpt2, smollm, starcoder...) are supported.
    """
    file = _open(path)
    model = file.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{file.path}: tokenizer.ggml.model is {model!r}; load_gguf_tokenizer supports only "
            "byte-level BPE ('gpt2')"
        )
    tokens = list(file.require("tokenizer.ggml.tokens"))
    merges_text = file.require("tokenizer.ggml.merges")
    types = list(file.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(
            f"{file.path}: tokenizer.ggml.token_type has {len(types)} entries for "
            f"{len(tokens)} tokens"
        )
    merges = []
    for n, merge in enumerate(merges_text):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{file.path}: tokenizer.ggml.merges[{n}] is {merge!r}")
        merges.append((pair[0], pair[1]))
    spell = {byte: char for char, byte in _byte_decoder().items()}
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    specials = []
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_CONTROL, _USER_DEFINED):
            # Matched whole in the raw text: kept as spelled, with its own id.
            specials.append(AddedToken(token, special=kind == _CONTROL, normalized=False))
        elif not set(token) <= alphabet:
            # A normal token spelled in plain text rather than the byte alphabet.
            token = "".join(spell[byte] for byte in token.encode("utf-8"))
        vocab.setdefault(token, token_id)

    def special_id(key: str) -> int | None:
        value = file.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    add_bos = file.get("tokenizer.ggml.add_bos_token")
    tokenizer = HFTokenizer.from_vocab_and_merges(
        vocab,
        merges,
        specials,
        bos=special_id("bos_token_id"),
        eos=special_id("eos_token_id"),
        pad=special_id("padding_token_id"),
        pre_tokenizer=file.get("tokenizer.ggml.pre") or "gpt2",
        name=file.path,
        add_bos_token=None if add_bos is None else bool(add_bos),
    )
    from itune.data import chat  # noqa: PLC0415

    return tokenizer, chat.format_for_template(file.get("tokenizer.chat_template"))
