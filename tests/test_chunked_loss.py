"""The loss computed a slice of the vocabulary at a time equals the loss of the whole logits, in
value and gradients, and a train step with it equals one without it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from itune.training import chunked_loss
from tests.util import jitted_train_step, optim_config, packed_batch, tiny_model_config


@pytest.mark.parametrize(
    "vocab_size, chunk, slices",
    [(101, 32, (4, 26)), (96, 32, (3, 32)), (96, 1024, (1, 96))],
    ids=["last_slice_padded", "exact_slices", "one_slice"],
)
def test_loss_accuracy_and_gradients_equal_those_of_the_whole_logits(vocab_size, chunk, slices):
    assert chunked_loss.vocabulary_slices(vocab_size, chunk) == slices
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(vocab_size, 16)), jnp.float32)
    targets = rng.integers(0, vocab_size, (2, 8))
    targets[0, :3] = (0, vocab_size - 1, slices[1] % vocab_size)  # Both ends; a slice's first.
    targets = jnp.asarray(targets, jnp.int32)
    # A token whose target has the largest logit, so that the accuracy is not all zeros.
    weight = weight.at[targets[1, 0]].set(hidden[1, 0] * 3)
    token_weights = jnp.asarray(rng.integers(0, 3, (2, 8)), jnp.float32)

    def whole(hidden, weight):
        logits = jnp.einsum("btd,vd->btv", hidden, weight, precision="highest")
        log_probs = jax.nn.log_softmax(logits)
        loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return jnp.sum(loss * token_weights), (loss, correct)

    def sliced(hidden, weight):
        loss, correct = chunked_loss.token_log_loss(hidden, weight, targets, chunk)
        return jnp.sum(loss * token_weights), (loss, correct)

    with jax.default_matmul_precision("highest"):
        (total, (loss, correct)), grads = jax.value_and_grad(sliced, (0, 1), has_aux=True)(
            hidden, weight
        )
    (ref_total, (ref_loss, ref_correct)), ref_grads = jax.value_and_grad(
        whole, (0, 1), has_aux=True
    )(hidden, weight)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    np.testing.assert_array_equal(correct, ref_correct)
    assert correct[1, 0] == 1.0
    for name, got, ref in zip(("hidden", "weight"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "lm_head"])
def test_a_sharded_train_step_with_vocabulary_slices_equals_one_with_the_whole_logits(
    tie_embeddings,
):
    base = tiny_model_config(
        vocab_size=64, d_model=16, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=4,
        mlp_dim=32, tie_embeddings=tie_embeddings, loss_vocab_chunk=0,
    )
    sliced = dataclasses.replace(base, loss_vocab_chunk=24)  # 3 slices of 22, 2 entries padded.
    batch = packed_batch(0, 8, 16, base.vocab_size)
    results = {}
    for name, config, mesh_shape in (("whole", base, (1, 1, 1)), ("sliced", sliced, (1, 2, 4))):
        _, state, run = jitted_train_step(config, optim_config(), mesh_shape)
        new_state, metrics = run(state, batch)
        results[name] = jax.device_get((new_state.params, metrics))
    (params, metrics), (ref_params, ref_metrics) = results["sliced"], results["whole"]
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert ref_metrics["loss"] > 1.0
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
