"""Model presets: the shapes and numerics of well-known decoders, by name.

A config picks one with ``config.model.preset`` (see `itune.configlib.model_from_preset`);
imported checkpoints bring their own shape instead (`itune.convert`). The figures are those of
each model's published ``config.json``.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: CPU smoke tests.
    "tiny": dict(
        vocab_size=0,
        d_model=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        rope_theta=10_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=2048,
    ),
    "smollm2-135m": dict(
        vocab_size=49_152,
        d_model=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        mlp_dim=1536,
        rope_theta=100_000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=8192,
    ),
    "llama3-8b": dict(
        vocab_size=128_256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14_336,
        rope_theta=500_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        max_seq_len=8192,
    ),
    "llama3-70b": dict(
        vocab_size=128_256,
        d_model=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=28_672,
        rope_theta=500_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        max_seq_len=8192,
    ),
    "mistral-7b": dict(
        vocab_size=32_768,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14_336,
        rope_theta=1_000_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        max_seq_len=32_768,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151_936,
        d_model=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=4864,
        rope_theta=1_000_000.0,
        norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        max_seq_len=32_768,
    ),
    "gemma-2b": dict(
        vocab_size=256_000,
        d_model=2048,
        num_layers=18,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        mlp_dim=16_384,
        rope_theta=10_000.0,
        norm_eps=1e-6,
        norm_plus_one=True,
        embed_scale=True,
        mlp_activation="gelu_tanh",
        tie_embeddings=True,
        max_seq_len=8192,
    ),
}

# Llama 3.1 is Llama 3 with frequency scaling for its 128k context.
PRESETS["llama3.1-8b"] = dict(
    PRESETS["llama3-8b"],
    max_seq_len=131_072,
    rope_scaling="llama3",
    rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
)

# Qwen3: q/k RMSNorm per head, head_dim apart from d_model / heads.
PRESETS["qwen3-0.6b"] = dict(
    vocab_size=151_936,
    d_model=1024,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=3072,
    rope_theta=1_000_000.0,
    norm_eps=1e-6,
    qk_norm=True,
    tie_embeddings=True,
    max_seq_len=40_960,
)
PRESETS["qwen3-8b"] = dict(
    PRESETS["qwen3-0.6b"],
    d_model=4096,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=12_288,
    tie_embeddings=False,
)
# 128 experts of width 768 (moe_intermediate_size), 8 per token: 30.5B parameters, 3.3B active.
PRESETS["qwen3-30b-a3b"] = dict(
    PRESETS["qwen3-0.6b"],
    d_model=2048,
    num_layers=48,
    num_heads=32,
    num_kv_heads=4,
    mlp_dim=768,
    num_experts=128,
    experts_per_token=8,
    router_renormalize=True,
    router_aux_loss_coef=0.001,
    tie_embeddings=False,
)
# 8 experts of Mistral 7B's MLP, 2 per token: 46.7B parameters, 12.9B active.
PRESETS["mixtral-8x7b"] = dict(
    PRESETS["mistral-7b"],
    vocab_size=32_000,
    num_experts=8,
    experts_per_token=2,
    router_renormalize=True,
    router_aux_loss_coef=0.02,
)
# Gemma 2: pre and post norms around attention and the MLP, soft-capped attention and output
# logits, a 4096-token window on every other layer.
PRESETS["gemma2-2b"] = dict(
    vocab_size=256_000,
    d_model=2304,
    num_layers=26,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    mlp_dim=9216,
    rope_theta=10_000.0,
    norm_eps=1e-6,
    norm_plus_one=True,
    embed_scale=True,
    post_norms=True,
    query_pre_attn_scalar=256.0,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window=4096,
    global_layer_every=2,
    mlp_activation="gelu_tanh",
    tie_embeddings=True,
    max_seq_len=8192,
)
# Gemma 3 (the text decoder, Gemma3ForCausalLM): Gemma 2's block with q/k norm instead of
# soft-caps, five sliding layers (RoPE base 10,000) to one global layer (base 1,000,000; in 4b
# and 27b with linear scaling by 8 for their 128k context).
PRESETS["gemma3-1b"] = dict(
    vocab_size=262_144,
    d_model=1152,
    num_layers=26,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=6912,
    rope_theta=1_000_000.0,
    rope_local_theta=10_000.0,
    norm_eps=1e-6,
    norm_plus_one=True,
    embed_scale=True,
    post_norms=True,
    qk_norm=True,
    query_pre_attn_scalar=256.0,
    sliding_window=512,
    global_layer_every=6,
    mlp_activation="gelu_tanh",
    tie_embeddings=True,
    max_seq_len=32_768,
)
# The vocabulary of the multimodal checkpoints' text decoder (image tokens included).
PRESETS["gemma3-4b"] = dict(
    PRESETS["gemma3-1b"],
    vocab_size=262_208,
    d_model=2560,
    num_layers=34,
    num_heads=8,
    num_kv_heads=4,
    mlp_dim=10_240,
    sliding_window=1024,
    rope_scaling="linear",
    rope_scaling_factor=8.0,
    max_seq_len=131_072,
)
PRESETS["gemma3-27b"] = dict(
    PRESETS["gemma3-4b"],
    d_model=5376,
    num_layers=62,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    mlp_dim=21_504,
    query_pre_attn_scalar=168.0,
)


def preset(name: str) -> dict[str, Any]:
    """The ``config.model`` values of a preset; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r}; known presets: {sorted(PRESETS)}")
    return dict(PRESETS[name])
