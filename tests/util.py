"""Small builders shared by the tests."""

import ml_collections
import numpy as np

from itune.model.decoder import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=128,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        rope_theta=10_000.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def optim_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        learning_rate=1e-2,
        warmup_steps=1,
        min_learning_rate_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def packed_batch(
    seed: int, batch: int, length: int, vocab: int, segment_lengths=(5, 7, 3)
) -> dict[str, np.ndarray]:
    """Random rows, each packed with segments of the given lengths and padding after them."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    start = 0
    for seg, n in enumerate(segment_lengths, start=1):
        segment_ids[:, start : start + n] = seg
        positions[:, start : start + n] = np.arange(n)
        start += n
    inputs = rng.integers(1, vocab, (batch, length), dtype=np.int32) * (segment_ids > 0)
    targets = rng.integers(1, vocab, (batch, length), dtype=np.int32) * (segment_ids > 0)
    loss_mask = (segment_ids > 0).astype(np.int32) * rng.integers(0, 2, (batch, length))
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss_mask.astype(np.int32),
        "segment_ids": segment_ids,
        "positions": positions,
    }
