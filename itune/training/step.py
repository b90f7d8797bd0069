"""The pure train and eval steps, and the train state they carry.

``train_step(state, batch) -> (state, metrics)`` is compiled once by `itune.training.trainer`
with explicit input and output shardings; nothing here knows about the mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> dict[str, jax.Array]:
    """Sums of token loss, correct predictions and weights over the tokens with weight 1."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum((log_z - target_logit) * weights),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
    }


def batch_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array]):
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def loss_fn(params, graphdef, batch):
    """Mean cross-entropy over the trained tokens of the whole (global) batch."""
    sums = batch_sums(graphdef, params, batch)
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, graphdef, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
        "trained_tokens": sums["weight_sum"],
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(
    params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
    """Sums, so that batches of different sizes combine exactly."""
    return batch_sums(graphdef, params, batch)
