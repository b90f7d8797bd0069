"""The decoder: packed segments are independent, positions restart per segment."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itune.model.decoder import Decoder
from tests.util import packed_batch, tiny_model_config


def _logits(model, batch):
    return np.asarray(
        model(
            jnp.asarray(batch["inputs"]),
            jnp.asarray(batch["positions"]),
            jnp.asarray(batch["segment_ids"]),
        )
    )


def test_packed_segments_never_attend_to_each_other():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    batch = packed_batch(0, batch=2, length=16, vocab=128, segment_lengths=(5, 6, 3))
    before = _logits(model, batch)
    changed = dict(batch)
    changed["inputs"] = batch["inputs"].copy()
    changed["inputs"][:, 5:11] = (batch["inputs"][:, 5:11] + 17) % 127 + 1  # Segment 2 only.
    after = _logits(model, changed)
    seg = batch["segment_ids"][0]
    for s in (1, 3):
        np.testing.assert_array_equal(before[:, seg == s], after[:, seg == s])
    assert not np.allclose(before[:, seg == 2], after[:, seg == 2])


def test_a_packed_segment_gives_the_same_logits_as_the_example_alone():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(1))
    batch = packed_batch(1, batch=1, length=16, vocab=128, segment_lengths=(5, 6))
    packed = _logits(model, batch)
    alone = {k: v[:, 5:11] for k, v in batch.items()}
    alone["segment_ids"] = np.ones_like(alone["segment_ids"])
    np.testing.assert_allclose(packed[:, 5:11], _logits(model, alone), rtol=1e-5, atol=1e-5)


def test_model_is_causal():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(2))
    batch = packed_batch(2, batch=1, length=12, vocab=128, segment_lengths=(12,))
    before = _logits(model, batch)
    batch["inputs"][:, 8] = (batch["inputs"][:, 8] % 100) + 5
    after = _logits(model, batch)
    np.testing.assert_array_equal(before[:, :8], after[:, :8])
    assert not np.allclose(before[:, 8:], after[:, 8:])


def test_scan_over_layers_matches_running_them_one_by_one():
    cfg = tiny_model_config(num_layers=3)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    batch = packed_batch(3, batch=2, length=10, vocab=128, segment_lengths=(10,))
    tokens, pos, seg = (jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids"))
    x = jnp.take(model.embed[...], tokens, axis=0)
    graphdef, stacked = nnx.split(model.blocks)
    for i in range(cfg.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
        x = block(x, pos, seg)
    expected = model.logits(model.final_norm(x))
    np.testing.assert_allclose(_logits(model, batch), np.asarray(expected), rtol=1e-5, atol=1e-5)
