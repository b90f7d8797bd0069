"""`ModelConfig`: the shape and numerics of a decoder, one field per switch of a family.

Each Hugging Face family is a choice of these fields (`itune.convert.hf_config`); the decoder
(`itune.model.decoder`) reads nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from itune.model import attention, lora, moe

MLP_ACTIVATION_NAMES = ("silu", "gelu_tanh", "gelu")  # See decoder.MLP_ACTIVATIONS.
REMATS = ("none", "full", "save_dots", "offload_dots")  # See decoder.REMAT_POLICIES.
ROPE_SCALINGS = ("none", "llama3", "linear", "yarn")
# Metadata of the `ModelConfig` fields that decide the parameters' shapes: a checkpoint only
# restores into a model whose shape fields are all equal (`shape_fields`).
SHAPE = {"shape": True}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder (built from ``config.model``)."""

    vocab_size: int = dataclasses.field(metadata=SHAPE)
    d_model: int = dataclasses.field(metadata=SHAPE)
    num_layers: int = dataclasses.field(metadata=SHAPE)
    num_heads: int = dataclasses.field(metadata=SHAPE)
    num_kv_heads: int = dataclasses.field(metadata=SHAPE)
    head_dim: int = dataclasses.field(metadata=SHAPE)
    mlp_dim: int = dataclasses.field(metadata=SHAPE)
    rope_theta: float = 10_000.0
    # Llama-3 frequency scaling: frequencies of wavelengths above original_max_len /
    # low_freq_factor are divided by the factor, those below original_max_len / high_freq_factor
    # kept, and those between interpolated.
    # "linear" divides every frequency by the factor (Gemma 3's global layers). "yarn" (YaRN,
    # as transformers computes it) divides the frequencies of fewer than rope_yarn_beta_slow
    # turns over original_max_len by the factor, keeps those of more than rope_yarn_beta_fast,
    # ramps linearly between, and multiplies cos and sin by rope_attention_factor. The scaling
    # applies to the global layers, and to all layers when rope_local_theta is 0.
    rope_scaling: str = "none"  # One of ROPE_SCALINGS.
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_truncate: bool = True  # The ramp's ends rounded to whole dimensions.
    rope_attention_factor: float = 0.0  # YaRN's; 0: 0.1 * ln(factor) + 1.
    max_seq_len: int = 8192  # The longest sequence the model was made for (exported as such).
    norm_eps: float = 1e-5
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) (Gemma) rather than w.
    mlp_activation: str = "silu"  # The gate's activation: one of MLP_ACTIVATIONS.
    qkv_bias: bool = dataclasses.field(
        default=False, metadata=SHAPE
    )  # Bias on the q, k and v projections (Qwen2).
    embed_scale: bool = False  # Embeddings multiplied by sqrt(d_model) (Gemma).
    tie_embeddings: bool = dataclasses.field(default=True, metadata=SHAPE)
    sliding_window: int = 0  # Attend to at most this many previous tokens (0: all; Mistral v0.1).
    # With a sliding window: 0, every layer slides; n, every n-th layer (layer i with
    # (i + 1) % n == 0) attends globally and the others slide (Gemma 2: 2, Gemma 3: 6).
    global_layer_every: int = 0
    rope_local_theta: float = (
        0.0  # RoPE base of the sliding layers, unscaled (0: as global; Gemma 3).
    )
    # RMSNorm of each query and key head (over head_dim) before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = dataclasses.field(default=False, metadata=SHAPE)
    # A second norm on the attention's and the MLP's outputs, before the residual add (Gemma 2/3).
    post_norms: bool = dataclasses.field(default=False, metadata=SHAPE)
    query_pre_attn_scalar: float = (
        0.0  # Scores scaled by its -1/2 power (0: head_dim's; Gemma 2/3).
    )
    attn_logit_softcap: float = 0.0  # Scores become cap * tanh(scores / cap) (0: none; Gemma 2).
    final_logit_softcap: float = 0.0  # Logits become cap * tanh(logits / cap) (0: none; Gemma 2).
    # Mixture of experts (`itune.model.moe`): 0, a dense MLP; n, each block's MLP is n experts,
    # gated MLPs of width mlp_dim, of which each token uses experts_per_token.
    num_experts: int = dataclasses.field(default=0, metadata=SHAPE)
    experts_per_token: int = 2
    router_renormalize: bool = (
        True  # The chosen experts' weights sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob).
    )
    router_aux_loss_coef: float = 0.0  # Load-balancing loss (transformers') added to the loss.
    router_z_loss_coef: float = 0.0  # Router z-loss (ST-MoE) added to the loss.
    moe_matmul: str = "auto"  # The experts' grouped products: one of moe.MATMULS.
    attention: str = "xla"  # One of attention.IMPLEMENTATIONS.
    scan_layers: bool = True  # False: the layers are unrolled (same parameters).
    param_dtype: str = "float32"
    dtype: str = "float32"  # Computation dtype; softmax and the loss always run in float32.
    remat: str = "none"  # 'none' | 'full' | 'save_dots' | 'offload_dots'
    # The train and eval loss compute the logits this many vocabulary entries at a time
    # (`itune.training.chunked_loss`), never those of the whole vocabulary at once; 0: at once.
    loss_vocab_chunk: int = 1024
    # LoRA (`itune.model.lora`): rank of the adapters on the projections named in lora_targets
    # (0: none). With LoRA on, only the adapters train; the base weights are frozen.
    lora_rank: int = dataclasses.field(default=0, metadata=SHAPE)
    lora_alpha: float = 16.0  # The adapters' product is scaled by lora_alpha / lora_rank.
    lora_dropout: float = 0.0  # Dropout on the adapters' input, when a dropout_rng is passed.
    lora_targets: str = dataclasses.field(
        default="q,k,v,o", metadata=SHAPE
    )  # Comma-separated, from q, k, v, o, gate, up, down.

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})"
            )
        for field, value, allowed in (
            ("remat", self.remat, REMATS),
            ("mlp_activation", self.mlp_activation, MLP_ACTIVATION_NAMES),
            ("rope_scaling", self.rope_scaling, ROPE_SCALINGS),
            ("attention", self.attention, attention.IMPLEMENTATIONS),
            ("moe_matmul", self.moe_matmul, moe.MATMULS),
        ):
            if value not in allowed:
                raise ValueError(f"model.{field}={value!r}; expected one of {list(allowed)}")
        if self.loss_vocab_chunk < 0:
            raise ValueError(f"model.loss_vocab_chunk={self.loss_vocab_chunk}; expected 0 or more")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise ValueError(
                    f"model.{field}={getattr(self, field)!r}; expected float32, bfloat16 or float16"
                )
        for field in (
            "global_layer_every",
            "rope_local_theta",
            "query_pre_attn_scalar",
            "attn_logit_softcap",
            "final_logit_softcap",
            "num_experts",
            "router_aux_loss_coef",
            "router_z_loss_coef",
        ):
            if getattr(self, field) < 0:
                raise ValueError(f"model.{field}={getattr(self, field)}; expected 0 or more")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"model.experts_per_token={self.experts_per_token}; expected 1 to "
                f"model.num_experts ({self.num_experts})"
            )
        if (
            self.num_experts
            and self.moe_matmul == "dense"
            and self.lora_rank
            and set(lora.parse_targets(self.lora_targets)) & set(lora.MLP_TARGETS)
        ):
            raise ValueError(
                "model.moe_matmul='dense' runs no expert adapters: use 'tiled' or 'ragged' "
                "with LoRA on gate, up or down"
            )
        if self.attn_logit_softcap and self.attention == "jax":
            raise ValueError(
                "model.attention='jax' has no score soft-cap: use 'xla' or 'splash' with "
                "model.attn_logit_softcap"
            )
        lora.check_config(self)

    @classmethod
    def from_config(cls, model_config: Any, vocab_size: int | None = None) -> "ModelConfig":
        """Builds from a ``config.model`` section: its ``preset`` (`itune.model.presets`), then
        the section's fields that are not None; a ``vocab_size`` of 0 (or None) takes
        ``vocab_size`` (the tokenizer's)."""
        from itune.model import presets  # noqa: PLC0415  (presets are plain data)

        fields = {f.name for f in dataclasses.fields(cls)}
        section = dict(model_config)
        unknown = sorted(set(section) - fields - {"preset"})
        if unknown:
            raise ValueError(f"config.model: unknown fields {unknown}; known: {sorted(fields)}")
        values = presets.preset(section["preset"]) if section.get("preset") else {}
        values.update({k: v for k, v in section.items() if k in fields and v is not None})
        if not values.get("vocab_size"):
            if not vocab_size:
                raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
            values["vocab_size"] = vocab_size
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        )
        if missing:
            raise ValueError(f"config.model: no value for {missing} (set them or a preset)")
        return cls(**values)

    def shape_fields(self) -> dict[str, Any]:
        """The fields that decide the parameters' shapes, by name (those marked `SHAPE`).

        >>> ModelConfig(vocab_size=8, d_model=4, num_layers=1, num_heads=2, num_kv_heads=1,
        ...             head_dim=2, mlp_dim=8).shape_fields()["d_model"]
        4
        """
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("shape")
        }

    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Whether each layer attends through the sliding window (see ``global_layer_every``).

        >>> ModelConfig(vocab_size=8, d_model=4, num_layers=4, num_heads=1, num_kv_heads=1,
        ...             head_dim=4, mlp_dim=8, sliding_window=16, global_layer_every=2
        ...             ).layer_is_sliding()
        (True, False, True, False)
        """
        every = self.global_layer_every
        return tuple(
            bool(self.sliding_window) and (not every or (i + 1) % every != 0)
            for i in range(self.num_layers)
        )

    def _block_params(self, experts_used: int) -> tuple[int, int]:
        """``(matmul weights, norm scales)`` of one block with ``experts_used`` experts."""
        d, k = self.d_model, self.head_dim
        matmuls = d * k * (2 * self.num_heads + 2 * self.num_kv_heads)
        other = self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        other += (4 if self.post_norms else 2) * d + (2 * k if self.qk_norm else 0)
        if self.num_experts:
            matmuls += d * self.num_experts + experts_used * 3 * d * self.mlp_dim
        else:
            matmuls += 3 * d * self.mlp_dim
        return matmuls, other

    def num_params(self) -> int:
        """Every parameter (all experts; LoRA adapters not counted)."""
        matmuls, other = self._block_params(self.num_experts)
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        table = self.vocab_size * self.d_model
        return self.num_layers * (matmuls + other) + table + head + self.d_model

    def num_active_params(self) -> int:
        """The parameters one token computes with: `num_params` with only its experts."""
        matmuls, other = self._block_params(self.experts_per_token)
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        table = self.vocab_size * self.d_model
        return self.num_layers * (matmuls + other) + table + head + self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward and backward, no recomputation): 6 per weight of a
        matmul that the token goes through (the embedding lookup is not one; a tied table is
        again as the output projection; of the experts, only the chosen ones), plus
        attention's two matmuls over the causal half of the sequence (over the window, for a
        sliding layer)."""
        matmuls, _ = self._block_params(self.experts_per_token)
        matmul_weights = self.num_layers * matmuls + self.vocab_size * self.d_model
        attention_flops = sum(
            6
            * self.num_heads
            * self.head_dim
            * (min(seq_len, 2 * self.sliding_window) if sliding else seq_len)
            for sliding in self.layer_is_sliding()
        )
        return 6 * matmul_weights + attention_flops
