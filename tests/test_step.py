"""The loss and the train step: group sums, sequence normalisation, gradient accumulation and the
non-finite guard."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itune.model.decoder import Decoder
from itune.training import step
from itune.training.step import cross_entropy
from tests.util import jitted_train_step, optim_config, packed_batch, tiny_model_config

# Small enough to compile quickly; 4 heads so that a (1, 2, 4) mesh shards them.
MODEL = tiny_model_config(
    vocab_size=64, d_model=16, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=4, mlp_dim=32
)


def test_group_sums_partition_the_loss_and_weights():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 6)))
    weights = jnp.asarray(rng.integers(0, 2, (2, 6)))
    groups = jnp.asarray(rng.integers(0, 3, (2, 6)))
    sums = cross_entropy(logits, targets, weights, groups, num_groups=3)
    np.testing.assert_allclose(sums["group_loss_sum"].sum(), sums["loss_sum"], rtol=1e-6)
    np.testing.assert_allclose(sums["group_weight_sum"].sum(), sums["weight_sum"])
    # Group 1 alone equals the loss over its tokens only.
    only = cross_entropy(logits, targets, weights * (groups == 1))
    np.testing.assert_allclose(sums["group_loss_sum"][1], only["loss_sum"], rtol=1e-6)
    expected = -jax.nn.log_softmax(logits)[0, 0, targets[0, 0]] * weights[0, 0]
    first = cross_entropy(logits[:1, :1], targets[:1, :1], weights[:1, :1])
    np.testing.assert_allclose(first["loss_sum"], expected, rtol=1e-6)


def test_sequence_sums_of_the_docstring_example():
    sums = step.sequence_sums(
        jnp.array([[0.0, 2, 4, 6, 8, 0]]),
        jnp.array([[0.0, 1, 1, 0, 1, 0]]),
        jnp.array([[1, 1, 1, 2, 2, 0]]),
    )
    assert float(sums["sequence_loss_sum"]) == 11.0 and float(sums["sequence_count"]) == 2.0


def _rows(segments, trained, length=16):
    """A batch whose row ``r`` holds segments of lengths ``segments[r]``, with trained tokens at
    the columns ``trained[r]``."""
    batch = packed_batch(0, len(segments), length, MODEL.vocab_size, segment_lengths=())
    for r, lengths in enumerate(segments):
        start = 0
        for seg, n in enumerate(lengths, start=1):
            batch["segment_ids"][r, start : start + n] = seg
            batch["positions"][r, start : start + n] = np.arange(n)
            start += n
    rng = np.random.default_rng(1)
    batch["inputs"] = rng.integers(1, MODEL.vocab_size, (len(segments), length), np.int32)
    batch["targets"] = rng.integers(1, MODEL.vocab_size, (len(segments), length), np.int32)
    batch["loss_mask"] = np.zeros((len(segments), length), np.int32)
    for r, columns in enumerate(trained):
        batch["loss_mask"][r, list(columns)] = 1
    return batch


def test_sequence_normalisation_gives_a_short_and_a_long_answer_equal_weight():
    params = nnx.state(Decoder(MODEL, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(Decoder(MODEL, rngs=nnx.Rngs(0)))
    loss = jax.jit(
        lambda batch, normalization: step.loss_fn(
            params, graphdef, batch, loss_normalization=normalization
        )[0],
        static_argnums=1,
    )
    # Row 0: a short answer (1 trained token) and a long one (8); row 1: an answer of 3 tokens
    # and a sequence without trained tokens, which does not count.
    short, long, medium = [3], range(6, 14), range(3, 6)
    batch = _rows([(4, 10), (6, 3)], [[*short, *long], medium])
    alone = {}
    for name, row, columns in (("short", 0, short), ("long", 0, long), ("medium", 1, medium)):
        mask = np.zeros_like(batch["loss_mask"])
        mask[row, list(columns)] = 1
        alone[name] = float(loss(dict(batch, loss_mask=mask), "token"))
    by_sequence = float(loss(batch, "sequence"))
    by_token = float(loss(batch, "token"))
    np.testing.assert_allclose(by_sequence, np.mean(list(alone.values())), rtol=1e-6)
    expected = (alone["short"] + 8 * alone["long"] + 3 * alone["medium"]) / 12
    np.testing.assert_allclose(by_token, expected, rtol=1e-6)
    assert abs(by_sequence - by_token) > 1e-3, (by_sequence, by_token, alone)


def _uneven_batch():
    """8 rows with 1, 0, 5, 12, 1, 0, 9 and 14 trained tokens (from the start of the row) and two
    sources: microbatch ``j`` of 4 holds rows ``j`` and ``j + 4``, so 2, 0, 14 and 26 tokens."""
    batch = packed_batch(3, batch=8, length=16, vocab=MODEL.vocab_size)
    trained = np.array([1, 0, 5, 12, 1, 0, 9, 14])
    batch["loss_mask"] = (
        (batch["segment_ids"] > 0) & (np.arange(16)[None, :] < trained[:, None])
    ).astype(np.int32)
    batch["source_ids"] = np.random.default_rng(4).integers(0, 2, (8, 16), dtype=np.int32)
    return batch


@functools.lru_cache(maxsize=None)
def _run_step(normalization, microbatches, mesh_shape):
    _, state, run = jitted_train_step(
        MODEL,
        optim_config(),
        mesh_shape,
        source_names=("a", "b"),
        microbatches=microbatches,
        loss_normalization=normalization,
    )
    init = jax.device_get(state)
    new_state, metrics = run(state, _uneven_batch())
    return init, jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.parametrize(
    "normalization, mesh_shape",
    [("token", (1, 1, 1)), ("sequence", (1, 1, 1)), ("token", (1, 2, 4))],
    ids=["token", "sequence", "token_on_mesh"],
)
def test_four_microbatches_make_the_update_of_the_whole_batch(normalization, mesh_shape):
    init, ref, ref_metrics = _run_step(normalization, 1, (1, 1, 1))
    _, got, metrics = _run_step(normalization, 4, mesh_shape)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert ref_metrics["trained_tokens"] == 42 and ref_metrics["nonfinite"] == 0.0
    assert ref_metrics["trained_tokens/a"] + ref_metrics["trained_tokens/b"] == 42
    leaves, ref_leaves = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(_gate(ref) - _gate(init)).max() > 1e-3  # The step really trained.


def test_microbatches_that_do_not_divide_the_batch_fail():
    params = nnx.state(Decoder(MODEL, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(Decoder(MODEL, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="microbatches=3 does not divide the batch of 8 rows"):
        jax.eval_shape(
            functools.partial(step.accumulated_gradients, microbatches=3),
            params,
            graphdef,
            _uneven_batch(),
        )


def _gate(state):
    return nnx.to_pure_dict(state.params)["blocks"]["mlp"]["gate"]


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_a_non_finite_step_changes_nothing_and_training_goes_on():
    model = dataclasses.replace(MODEL, tie_embeddings=False)  # The table only feeds the input.
    # Warmup over 4 steps: the learning rate of step 0 is not that of step 1.
    _, state, run = jitted_train_step(model, optim_config(warmup_steps=4))
    embed = state.params["embed"]
    embed.set_value(embed.get_value().at[5].set(jnp.inf))  # Token 5 embeds to inf.
    before = jax.device_get(state)
    poisoned = packed_batch(0, batch=4, length=16, vocab=model.vocab_size)
    poisoned["inputs"][0, 0] = 5
    state, metrics = run(state, poisoned)
    after = jax.device_get(state)
    assert metrics["nonfinite"] == 1.0 and not np.isfinite(metrics["loss"])
    assert int(after.step) == 1  # The batch was consumed.
    assert _bits(after.params) == _bits(before.params)
    assert _bits(after.opt_state) == _bits(before.opt_state)

    clean = packed_batch(1, batch=4, length=16, vocab=model.vocab_size)
    clean["inputs"][clean["inputs"] == 5] = 6
    state, metrics = run(state, clean)
    trained = jax.device_get(state)
    assert metrics["nonfinite"] == 0.0 and np.isfinite(metrics["loss"])
    assert int(trained.step) == 2
    assert np.abs(_gate(trained) - _gate(before)).max() > 1e-3
    assert _bits(trained.opt_state) != _bits(before.opt_state)
    # The skipped step did not advance the schedule: this update, and its reported learning
    # rate, are those of a first step.
    _, fresh, fresh_run = jitted_train_step(model, optim_config(warmup_steps=4))
    _, first_metrics = fresh_run(fresh, clean)
    assert first_metrics["learning_rate"] > 0
    assert float(metrics["learning_rate"]) == float(first_metrics["learning_rate"])
