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


def preset(name: str) -> dict[str, Any]:
    """The ``config.model`` values of a preset; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r}; known presets: {sorted(PRESETS)}")
    return dict(PRESETS[name])
