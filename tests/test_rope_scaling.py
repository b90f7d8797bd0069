"""RoPE scaling (linear, YaRN) against transformers beyond the original length, both ways through
``config.json``."""

import numpy as np
import pytest
import torch
import transformers

from itune.convert import hf, hf_config
from itune.model import attention
from tests.util import from_pretrained_cleanly, hf_logits, itune_logits, max_relative_error

transformers.utils.logging.disable_progress_bar()

ORIGINAL = 32  # The "pretrained" length; the rows are three times as long.
SEQ = 3 * ORIGINAL
TOLERANCE = 1e-4
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
CASES = {
    "llama_linear": (transformers.LlamaConfig, dict(rope_type="linear", factor=4.0)),
    # The default attention factor (0.1 ln 4 + 1) and ramp.
    "llama_yarn": (
        transformers.LlamaConfig,
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL),
    ),
    # Qwen3 (q/k norms) with every YaRN parameter given, the ramp's ends not rounded.
    "qwen3_yarn": (
        transformers.Qwen3Config,
        dict(
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=ORIGINAL,
            beta_fast=16.0,
            beta_slow=2.0,
            attention_factor=1.25,
            truncate=False,
        ),
    ),
    # DeepSeek's form of the attention factor: mscale over mscale_all_dim.
    "mistral_yarn_mscale": (
        transformers.MistralConfig,
        dict(
            rope_type="yarn",
            factor=8.0,
            original_max_position_embeddings=ORIGINAL,
            mscale=1.0,
            mscale_all_dim=0.5,
        ),
    ),
}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, SEQ), dtype=np.int32)


def _build(name, path):
    config_class, rope = CASES[name]
    torch.manual_seed(0)
    rope = dict(rope, rope_theta=10_000.0)
    # The longer length is the original times the factor (transformers warns otherwise).
    length = int(rope["factor"] * ORIGINAL)
    config = config_class(**dict(COMMON, max_position_embeddings=length), rope_parameters=rope)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval().save_pretrained(path)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_scaled_rope_matches_transformers_beyond_the_original_length(name, tokens, tmp_path):
    model = _build(name, str(tmp_path / "hf"))
    reference = hf_logits(model, tokens)
    cfg, graphdef, params = hf.load_hf(str(tmp_path / "hf"))
    kind = CASES[name][1]["rope_type"]
    assert cfg.rope_scaling == kind
    error = max_relative_error(itune_logits(graphdef, params, tokens), reference)
    print(f"\n{name}: {SEQ} positions (original {ORIGINAL}), max relative error {error:.2e}")
    assert error < TOLERANCE
    # The scaling matters: the same weights without it are far off.
    _, plain_graphdef, plain_params = hf.load_hf(str(tmp_path / "hf"), rope_scaling="none")
    assert max_relative_error(itune_logits(plain_graphdef, plain_params, tokens), reference) > 1e-2
    # Export: the config.json transformers reads gives the very same logits.
    hf.save_hf(str(tmp_path / "out"), cfg, params)
    exported = from_pretrained_cleanly(str(tmp_path / "out"))
    assert max_relative_error(hf_logits(exported, tokens), reference) == 0.0
    assert hf.load_hf(str(tmp_path / "out"))[0] == cfg


def test_yarn_frequencies_and_factor_are_transformers_own():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama_yarn", "qwen3_yarn", "mistral_yarn_mscale"):
        config_class, rope = CASES[name]
        length = int(rope["factor"] * ORIGINAL)
        config = config_class(
            **dict(COMMON, max_position_embeddings=length),
            rope_parameters=dict(rope, rope_theta=10_000.0),
        )
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
        cfg = hf_config.config_from_hf(config.to_dict())
        np.testing.assert_allclose(attention.rope_frequencies(cfg), inv_freq.numpy(), rtol=1e-6)
        assert attention.rope_attention_factor(cfg) == pytest.approx(factor, rel=1e-12)
