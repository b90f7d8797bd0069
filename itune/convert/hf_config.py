"""Hugging Face ``config.json`` <-> `ModelConfig`: Llama, Mistral, Qwen2 and Gemma.

Fields that transformers would default are filled as transformers does; a field itune cannot
honour (or export) is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

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
