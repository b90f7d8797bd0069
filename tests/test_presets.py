"""The presets of the Qwen3, Gemma 2/3 and Mixtral families have their published sizes, and an
MoE preset's FLOPs count the experts a token goes through, not all of them."""

import pytest

from itune.model import presets
from itune.model.decoder import ModelConfig

# Parameter counts of the Hugging Face checkpoints (the hub's safetensors total, which is
# `sum(p.numel() for p in model.parameters())` in transformers: a tied output embedding once).
PUBLISHED = {
    "qwen3-0.6b": 596_049_920,  # Qwen/Qwen3-0.6B ("0.6B, 0.44B non-embedding").
    "qwen3-8b": 8_190_735_360,  # Qwen/Qwen3-8B ("8.2B, 6.95B non-embedding").
    "qwen3-30b-a3b": 30_532_122_624,  # Qwen/Qwen3-30B-A3B ("30.5B, 3.3B activated").
    "mixtral-8x7b": 46_702_792_704,  # mistralai/Mixtral-8x7B-v0.1 ("46.7B").
    "gemma2-2b": 2_614_341_888,  # google/gemma-2-2b.
    "gemma3-1b": 999_885_952,  # google/gemma-3-1b-pt (text only).
    # Text decoders of google/gemma-3-4b-pt (4,300,079,472) and gemma-3-27b-pt (27,432,406,640):
    # the published totals less the SigLIP vision tower (416,866,032: 27 layers of width 1152,
    # MLP 4304, 4096 patch positions) and the projector to the text width (1152 x d_model plus
    # a 1152-wide norm: 2,950,272 for the 4b, 6,194,304 for the 27b).
    "gemma3-4b": 3_880_263_168,
    "gemma3-27b": 27_009_346_304,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_parameter_count(name):
    assert ModelConfig(**presets.preset(name)).num_params() == PUBLISHED[name]


def test_gemma3_text_counts_are_the_multimodal_totals_less_the_vision_tower():
    vision_tower = 416_866_032
    for name, total in (("gemma3-4b", 4_300_079_472), ("gemma3-27b", 27_432_406_640)):
        projector = 1152 * presets.preset(name)["d_model"] + 1152
        assert PUBLISHED[name] == total - vision_tower - projector, name


def _matmul_weights_per_token(config: ModelConfig, seq_len: int = 1024) -> float:
    """The weights a token multiplies, from ``flops_per_token`` (6 per weight plus attention,
    which grows linearly with the sequence length and is taken out here)."""
    once, twice = config.flops_per_token(seq_len), config.flops_per_token(2 * seq_len)
    return (2 * once - twice) / 6


@pytest.mark.parametrize(
    "name, active_params",
    [
        # Qwen3-30B-A3B's "3.3B activated": 8 of 128 experts per token.
        ("qwen3-30b-a3b", 3_353_032_704),
        # Mixtral 8x7B's "12.9B active": 2 of 8 experts per token.
        ("mixtral-8x7b", 12_879_925_248),
    ],
)
def test_moe_flops_count_only_the_active_experts(name, active_params):
    config = ModelConfig(**presets.preset(name))
    assert config.num_active_params() == active_params
    d, layers = config.d_model, config.num_layers
    # The active parameters less the input embedding (a lookup) and the norm scales (no matmul).
    norms = (2 * layers + 1) * d + (2 * layers * config.head_dim if config.qk_norm else 0)
    expected = active_params - config.vocab_size * d - norms
    assert _matmul_weights_per_token(config) == expected
    # The same model with every expert active: all of them in the count.
    every_expert = ModelConfig(**dict(presets.preset(name), experts_per_token=config.num_experts))
    expert = 3 * d * config.mlp_dim
    assert _matmul_weights_per_token(every_expert) == expected + layers * expert * (
        config.num_experts - config.experts_per_token
    )
