"""The pure train and eval steps, and the train state they carry.

``train_step(state, batch) -> (state, metrics)`` is compiled once by `itune.training.trainer`
with explicit input and output shardings; nothing here knows about the mesh.
"""

from __future__ import annotations


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
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    groups: jax.Array | None = None,
    num_groups: int = 0,
) -> dict[str, jax.Array]:
    """Sums of token loss, correct predictions and weights over the tokens with weight 1.

    With ``groups`` (an id in ``[0, num_groups)`` per token), also the loss and weight sums of
    each group, as ``group_loss_sum`` and ``group_weight_sum`` of shape ``[num_groups]``.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    token_loss = (log_z - target_logit) * weights
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(token_loss),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
    }
    if num_groups:
        one_hot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)
        sums["group_loss_sum"] = jnp.einsum("btg,bt->g", one_hot, token_loss)
        sums["group_weight_sum"] = jnp.einsum("btg,bt->g", one_hot, weights)
    return sums


def batch_sums(
    graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array], num_groups: int = 0
):
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    groups = batch.get("source_ids") if num_groups else None
    return cross_entropy(logits, batch["targets"], batch["loss_mask"], groups, num_groups)


def loss_fn(params, graphdef, batch, num_groups: int = 0):
    """Mean cross-entropy over the trained tokens of the whole (global) batch."""
    sums = batch_sums(graphdef, params, batch, num_groups)
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    source_names: tuple[str, ...] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean loss over the batch's trained tokens.

    With ``source_names`` (more than one mixture source), the metrics also hold each source's
    trained-token count and loss, read off the batch's ``source_ids``.
    """
    num_groups = len(source_names) if len(source_names) > 1 else 0
    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, graphdef, batch, num_groups
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
        "trained_tokens": sums["weight_sum"],
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    for i, name in enumerate(source_names if num_groups else ()):
        tokens = sums["group_weight_sum"][i]
        metrics[f"trained_tokens/{name}"] = tokens
        metrics[f"loss/{name}"] = sums["group_loss_sum"][i] / jnp.maximum(tokens, 1.0)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(
    params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
    """Sums, so that batches of different sizes combine exactly."""
    return batch_sums(graphdef, params, batch)
