"""Hugging Face ``config.json`` <-> `ModelConfig`: Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3
(text), Mixtral and Qwen3-MoE.

Fields that transformers would default are filled as transformers does; a field itune cannot
honour (or export) is a ValueError naming it. Both transformers 5's forms (``rope_parameters``,
per layer type for Gemma 3; ``layer_types``) and the older ones (``rope_theta``,
``rope_scaling``, ``rope_local_base_freq``, ``sliding_window_pattern``, ``max_window_layers``)
are read; exports carry both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from itune.model import attention
from itune.model.decoder import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_GEMMAS = ("gemma", "gemma2", "gemma3_text")
_SANDWICH = ("gemma2", "gemma3_text")  # Four norms a block; `ModelConfig.post_norms`.
_QK_NORM = ("qwen3", "gemma3_text", "qwen3_moe")
_MOE = ("mixtral", "qwen3_moe")
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
    "qwen3": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        num_key_value_heads=32,
        head_dim=128,
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
    "gemma2": dict(
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=6,
        final_logit_softcapping=None,
        max_position_embeddings=131_072,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
    ),
    "mixtral": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        num_key_value_heads=8,
        sliding_window=None,
        rope_theta=1_000_000.0,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.001,
    ),
    "qwen3_moe": dict(
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        num_key_value_heads=4,
        sliding_window=4096,
        num_local_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        router_aux_loss_coef=0.001,
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
_LAYER_KINDS = ("sliding_attention", "full_attention")
# Fields of how itune runs a model, not of what it computes; config.json carries none of them.
_RUNTIME_FIELDS = (
    "attention",
    "scan_layers",
    "param_dtype",
    "dtype",
    "remat",
    "loss_vocab_chunk",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "moe_matmul",
    "router_z_loss_coef",
)


def _unsupported(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json: {field}={value!r} is not supported: {why}")


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face ``config.json`` dict of a causal LM of one of the
    `ARCHITECTURES`. ``overrides`` replace fields afterwards (``param_dtype``,
    ``attention``...). Rope parameters may be in transformers 5's ``rope_parameters`` or in the
    older ``rope_theta`` and ``rope_scaling``.

    >>> cfg = config_from_hf(dict(model_type="llama", vocab_size=100, hidden_size=64,
    ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...     num_key_value_heads=2, rope_theta=500000.0))
    >>> cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_embeddings
    (16, 2, 500000.0, False)
    >>> gemma3 = config_from_hf(dict(model_type="gemma3_text", vocab_size=100, hidden_size=64,
    ...     intermediate_size=128, num_hidden_layers=12, num_attention_heads=4, head_dim=16,
    ...     sliding_window=512, rope_scaling=dict(rope_type="linear", factor=8.0)))
    >>> gemma3.global_layer_every, gemma3.rope_local_theta, gemma3.rope_scaling, gemma3.qk_norm
    (6, 10000.0, 'linear', True)
    """
    return dataclasses.replace(ModelConfig(**_fields_from_hf(hf_config)), **overrides)


def _fields_from_hf(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    hf = dict(hf_config)
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise _unsupported("model_type", family, f"expected one of {sorted(ARCHITECTURES)}")
    for architecture in hf.get("architectures") or []:
        if architecture != ARCHITECTURES[family]:
            raise _unsupported(
                "architectures", hf["architectures"], f"expected [{ARCHITECTURES[family]!r}]"
            )
    if family in _MOE and "num_local_experts" not in hf and "num_experts" in hf:
        hf["num_local_experts"] = hf["num_experts"]  # transformers' attribute_map.
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
    if hf.get("router_jitter_noise"):
        raise _unsupported(
            "router_jitter_noise", hf["router_jitter_noise"], "itune's router adds no noise"
        )
    heads = int(need("num_attention_heads"))
    d_model = int(need("hidden_size"))
    head_dim = int(hf.get("head_dim") or d_model // heads)
    fields = dict(
        vocab_size=int(need("vocab_size")),
        d_model=d_model,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_seq_len=int(hf.get("max_position_embeddings") or 8192),
        norm_eps=float(need("rms_norm_eps")),
        norm_plus_one=family in _GEMMAS,
        embed_scale=family in _GEMMAS,
        post_norms=family in _SANDWICH,
        qk_norm=family in _QK_NORM,
        mlp_activation=_activation(family, hf),
        qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        **_attention_pattern(family, hf),
        **(_gemma3_rope(hf) if family == "gemma3_text" else _rope(hf)),
    )
    if family in _SANDWICH:
        fields["query_pre_attn_scalar"] = float(need("query_pre_attn_scalar"))
        fields["final_logit_softcap"] = float(hf.get("final_logit_softcapping") or 0.0)
    if family == "gemma2":
        # Gemma 3's attention takes no soft-cap in transformers, whatever its config says.
        fields["attn_logit_softcap"] = float(hf.get("attn_logit_softcapping") or 0.0)
    fields.update(
        _moe(family, hf) if family in _MOE else dict(mlp_dim=int(need("intermediate_size")))
    )
    return fields


def _activation(family: str, hf: Mapping[str, Any]) -> str:
    """itune's MLP activation: ``hidden_act``, or Gemma 2/3's ``hidden_activation``."""
    field = "hidden_activation" if family in _SANDWICH else "hidden_act"
    name = hf.get(field)
    if family == "gemma":
        # Gemma's "gelu" means the tanh approximation (as transformers reads it); an older
        # hidden_activation field, when given, wins over hidden_act.
        if hf.get("hidden_activation"):
            field, name = "hidden_activation", hf["hidden_activation"]
        name = "gelu_pytorch_tanh" if name == "gelu" else name
    if name is None:
        raise ValueError(f"config.json: {field} is missing")
    if name not in _ACTIVATIONS:
        raise _unsupported(field, name, f"expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _moe(family: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields: every layer's MLP is one (a dense Qwen3-MoE is Qwen3)."""
    if family == "qwen3_moe":
        if int(hf["decoder_sparse_step"]) != 1:
            raise _unsupported(
                "decoder_sparse_step", hf["decoder_sparse_step"], "every layer must be sparse (1)"
            )
        if hf.get("mlp_only_layers"):
            raise _unsupported(
                "mlp_only_layers", hf["mlp_only_layers"], "every layer must be sparse ([])"
            )
    experts = int(hf["num_local_experts"])
    field = "moe_intermediate_size" if family == "qwen3_moe" and experts else "intermediate_size"
    if hf.get(field) is None:
        raise ValueError(f"config.json: {field} is missing")
    if not experts:
        return dict(mlp_dim=int(hf[field]))
    top_k = int(hf["num_experts_per_tok"])
    if not 1 <= top_k <= experts:
        raise _unsupported("num_experts_per_tok", top_k, f"expected 1 to {experts} experts")
    return dict(
        mlp_dim=int(hf[field]),
        num_experts=experts,
        experts_per_token=top_k,
        router_renormalize=family == "mixtral" or bool(hf["norm_topk_prob"]),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
    )


def _rope_fields(params: Mapping[str, Any], field: str, kinds: Sequence[str]) -> dict[str, Any]:
    """ModelConfig's rope fields of one rope parameter dict (``rope_theta`` filled in)."""
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise _unsupported("partial_rotary_factor", partial, "RoPE must cover the whole head")
    theta = float(params["rope_theta"])
    if kind not in kinds:
        raise _unsupported(
            f"{field}.rope_type", kind, f"expected one of {', '.join(map(repr, kinds))}"
        )
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling="none")
    needed = {
        "linear": ("factor",),
        "yarn": ("factor", "original_max_position_embeddings"),
    }.get(kind, ("factor", "low_freq_factor", "high_freq_factor"))
    for key in needed:
        if params.get(key) is None:
            raise ValueError(f"config.json: {field}.{key} is missing (rope_type {kind!r})")
    if kind == "linear":
        return dict(
            rope_theta=theta, rope_scaling="linear", rope_scaling_factor=float(params["factor"])
        )
    if kind == "yarn":
        return _yarn_fields(params, theta)
    return dict(
        rope_theta=theta,
        rope_scaling="llama3",
        rope_scaling_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_len=int(params["original_max_position_embeddings"]),
    )


def _yarn_fields(params: Mapping[str, Any], theta: float) -> dict[str, Any]:
    """ModelConfig's YaRN fields, the attention factor worked out as transformers does when
    ``config.json`` gives ``mscale`` and ``mscale_all_dim`` instead."""
    factor = float(params["factor"])
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:

        def get_mscale(scale, m):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return dict(
        rope_theta=theta,
        rope_scaling="yarn",
        rope_scaling_factor=factor,
        rope_original_max_len=int(params["original_max_position_embeddings"]),
        rope_yarn_beta_fast=float(params.get("beta_fast") or 32.0),
        rope_yarn_beta_slow=float(params.get("beta_slow") or 1.0),
        rope_yarn_truncate=bool(params.get("truncate", True)),
        rope_attention_factor=float(attention_factor or 0.0),
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
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if params.get("rope_type", params.get("type")) in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return _rope_fields(params, field, ("default", "linear", "llama3", "yarn"))


def _gemma3_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3's two RoPEs: the global layers' (``rope_parameters['full_attention']``, or
    ``rope_theta`` and ``rope_scaling``), scaled or not, and the sliding layers' unscaled one
    (``rope_parameters['sliding_attention']``, or ``rope_local_base_freq``)."""
    params = hf.get("rope_parameters")
    if params:
        if not all(isinstance(v, Mapping) for v in params.values()):
            raise _unsupported(
                "rope_parameters",
                params,
                "Gemma 3 expects them per layer type (full_attention, sliding_attention)",
            )
        full = dict(params.get("full_attention") or {"rope_type": "default"})
        sliding = dict(params.get("sliding_attention") or {"rope_type": "default"})
    else:
        full, sliding = {"rope_type": "default"}, {"rope_type": "default"}
    scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling:  # The oldest name of rope_type.
        scaling.setdefault("rope_type", scaling.pop("type"))
    full.update(scaling)  # As transformers does, also over rope_parameters.
    full.setdefault("rope_theta", hf["rope_theta"])
    full.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    sliding.setdefault("rope_theta", hf["rope_local_base_freq"])
    field = "rope_parameters" if params else "rope_scaling"
    kinds = ("default", "linear", "llama3", "yarn")
    fields = _rope_fields(full, f"{field}.full_attention" if params else field, kinds)
    if _rope_fields(sliding, "rope_parameters.sliding_attention", kinds) == fields:
        return fields  # rope_local_theta 0: the sliding layers rotate as the global ones.
    local = _rope_fields(sliding, "rope_parameters.sliding_attention", ("default",))
    return dict(fields, rope_local_theta=local["rope_theta"])


def _attention_pattern(family: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    """``sliding_window`` and ``global_layer_every`` from the family's window fields.

    Mistral's and Mixtral's window applies to every layer; Qwen2's and Qwen3's only with
    ``use_sliding_window``, and then to the layers that ``layer_types`` (or
    ``max_window_layers``) mark as sliding; Qwen3-MoE's with ``use_sliding_window`` to every
    layer; Gemma 2's and Gemma 3's to the layers of ``layer_types`` (by default every second,
    or all but every ``sliding_window_pattern``-th).
    """
    window = int(hf.get("sliding_window") or 0)
    layers = int(hf["num_hidden_layers"])
    if family in ("mistral", "mixtral"):
        return dict(sliding_window=window)
    if family in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window"):
        return dict(sliding_window=0)
    if family == "qwen3_moe":
        return dict(sliding_window=window)
    if family not in ("qwen2", "qwen3", "gemma2", "gemma3_text") or not window:
        return dict(sliding_window=0)
    field = "layer_types"
    kinds = hf.get("layer_types")
    if not kinds and family in ("qwen2", "qwen3"):
        field = "max_window_layers"
        first = int(hf["max_window_layers"])
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    elif not kinds:
        field = "sliding_window_pattern"
        every = 2 if family == "gemma2" else int(hf["sliding_window_pattern"])
        kinds = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)
        ]
    kinds = list(kinds)
    if len(kinds) != layers or not set(kinds) <= set(_LAYER_KINDS):
        raise _unsupported("layer_types", kinds, f"expected {layers} of {', '.join(_LAYER_KINDS)}")
    if "sliding_attention" not in kinds:
        return dict(sliding_window=0)
    if "full_attention" not in kinds:
        return dict(sliding_window=window)
    every = kinds.index("full_attention") + 1
    periodic = [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)
    ]
    if kinds != periodic:
        value = hf.get(field) if field != "layer_types" else kinds
        raise _unsupported(
            field,
            value,
            "itune's global layers are every n-th (layer i global when (i + 1) % n == 0)",
        )
    return dict(sliding_window=window, global_layer_every=every)


# ----------------------------------------------------------------------------------------------
# Export


def _choose_family(cfg: ModelConfig) -> str:
    """The only Hugging Face family that could compute ``cfg``, by its distinguishing fields."""
    if cfg.num_experts:
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.post_norms:
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if cfg.norm_plus_one or cfg.embed_scale:
        return "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face model type that computes what ``cfg`` does: Mixtral or Qwen3-MoE for
    experts (the latter with q/k norm), Gemma 2 or 3 for pre- and post-norms (Gemma 3 with q/k
    norm), Gemma for its norm and embedding scale, Qwen3 for q/k norm, Qwen2 for q/k/v bias,
    Mistral for a sliding window, else Llama. A ValueError names a field that the family
    cannot carry (its ``config.json`` would make transformers compute something else)."""
    if cfg.norm_plus_one != cfg.embed_scale:
        raise ValueError(
            "model.norm_plus_one and model.embed_scale exist in Hugging Face only together "
            f"(Gemma); got norm_plus_one={cfg.norm_plus_one}, embed_scale={cfg.embed_scale}"
        )
    family = _choose_family(cfg)
    if family == "gemma" and cfg.mlp_activation == "gelu":
        raise ValueError("model.mlp_activation='gelu': Gemma reads 'gelu' as tanh GELU")
    back = ModelConfig(**_fields_from_hf(_to_hf(cfg, family, None)))
    ours, theirs = _semantics(cfg), _semantics(back)
    for key, value in ours.items():
        if theirs[key] != value:
            names = {
                "layers": "sliding_window, global_layer_every",
                "rope": "rope_theta, rope_scaling, rope_local_theta",
            }.get(key, key)
            shown = ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names.split(", "))
            raise ValueError(f"model.{shown} has no {family} equivalent in Hugging Face")
    return family


def _semantics(cfg: ModelConfig) -> dict[str, Any]:
    """What ``cfg`` computes, in the fields a ``config.json`` carries, so that two configs
    that compute the same compare equal (a window on no layer is none, a RoPE of no layer
    is irrelevant...)."""
    values = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in _RUNTIME_FIELDS and not f.name.startswith("rope_")
    }
    sliding = tuple(cfg.layer_is_sliding())
    values.pop("sliding_window")
    values.pop("global_layer_every")
    values["layers"] = (cfg.sliding_window if any(sliding) else 0, sliding if any(sliding) else ())
    values["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar or float(cfg.head_dim)
    scaled = {
        "none": (),
        "linear": (cfg.rope_scaling_factor,),
        "llama3": (
            cfg.rope_scaling_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_max_len,
        ),
        "yarn": (
            cfg.rope_scaling_factor,
            cfg.rope_original_max_len,
            cfg.rope_yarn_beta_fast,
            cfg.rope_yarn_beta_slow,
            cfg.rope_yarn_truncate,
            attention.rope_attention_factor(cfg),
        ),
    }[cfg.rope_scaling]
    global_rope = (cfg.rope_theta, cfg.rope_scaling, *scaled)
    local_rope = (cfg.rope_local_theta, "none") if cfg.rope_local_theta else global_rope
    values["rope"] = (
        global_rope if not all(sliding) else None,
        local_rope if any(sliding) else None,
    )
    if not cfg.num_experts:
        for name in ("experts_per_token", "router_renormalize", "router_aux_loss_coef"):
            values.pop(name)
    return values


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` (see `family_of`), readable by transformers 4 and 5."""
    return _to_hf(cfg, family_of(cfg), dtype)


def _rope_dict(theta: float, cfg: ModelConfig, scaled: bool) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(theta)}
    if scaled and cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=float(cfg.rope_scaling_factor))
    if scaled and cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=float(cfg.rope_scaling_factor),
            low_freq_factor=float(cfg.rope_low_freq_factor),
            high_freq_factor=float(cfg.rope_high_freq_factor),
            original_max_position_embeddings=int(cfg.rope_original_max_len),
        )
    if scaled and cfg.rope_scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=float(cfg.rope_scaling_factor),
            original_max_position_embeddings=int(cfg.rope_original_max_len),
            beta_fast=float(cfg.rope_yarn_beta_fast),
            beta_slow=float(cfg.rope_yarn_beta_slow),
            truncate=bool(cfg.rope_yarn_truncate),
        )
        if cfg.rope_attention_factor:  # Otherwise transformers derives it from the factor.
            rope["attention_factor"] = float(cfg.rope_attention_factor)
    return rope


def _to_hf(cfg: ModelConfig, family: str, dtype: str | None) -> dict[str, Any]:
    rope = _rope_dict(cfg.rope_theta, cfg, scaled=True)
    layer_types = [
        "sliding_attention" if sliding else "full_attention" for sliding in cfg.layer_is_sliding()
    ]
    sliding = "sliding_attention" in layer_types
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
        "rope_scaling": rope if cfg.rope_scaling != "none" else None,
        "attention_dropout": 0.0,
        "dtype": dtype or cfg.param_dtype,
        "torch_dtype": dtype or cfg.param_dtype,  # transformers 4's name.
    }
    if family != "qwen2":
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family in _GEMMAS:
        hf["hidden_activation"] = hf["hidden_act"]  # transformers 4 (and Gemma 2/3) read this one.
    if family in ("mistral", "mixtral"):
        hf["sliding_window"] = cfg.sliding_window or None
    if family in ("qwen2", "qwen3"):
        hf.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window or None,
            # transformers 4 reads this instead of layer_types: exact for all or none sliding.
            max_window_layers=0 if "full_attention" not in layer_types else cfg.num_layers,
            layer_types=layer_types,
        )
    if family in _SANDWICH:
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        if scalar != int(scalar):
            raise ValueError(
                f"model.query_pre_attn_scalar={scalar}: Gemma's config.json takes whole numbers"
            )
        hf.update(
            query_pre_attn_scalar=int(scalar),
            final_logit_softcapping=cfg.final_logit_softcap or None,
            attn_logit_softcapping=cfg.attn_logit_softcap or None,
            sliding_window=cfg.sliding_window if sliding else None,
            layer_types=layer_types,
            use_bidirectional_attention=False,
        )
    if family == "gemma3_text":
        local = (
            _rope_dict(cfg.rope_local_theta, cfg, scaled=False) if cfg.rope_local_theta else rope
        )
        hf.update(
            rope_parameters={"full_attention": rope, "sliding_attention": dict(local)},
            rope_local_base_freq=float(local["rope_theta"]),  # transformers 4's name.
        )
        if sliding and cfg.global_layer_every:
            hf["sliding_window_pattern"] = cfg.global_layer_every  # transformers 4.5x's name.
    if family in _MOE:
        hf.update(
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
        )
    if family == "mixtral":
        hf.update(num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
    if family == "qwen3_moe":
        hf.update(
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.mlp_dim,
            norm_topk_prob=cfg.router_renormalize,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=bool(cfg.sliding_window),
            sliding_window=cfg.sliding_window or None,
        )
    return hf
