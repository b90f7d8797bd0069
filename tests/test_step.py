"""The loss: per-group sums add up to the whole."""

import jax
import jax.numpy as jnp
import numpy as np

from itune.training.step import cross_entropy


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
