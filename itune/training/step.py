"""The pure train and eval steps, and the train state they carry.

``train_step(state, batch) -> (state, metrics)`` is compiled once by `itune.training.trainer`
with explicit input and output shardings; nothing here knows about the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from itune.model import moe
from itune.training import chunked_loss
from itune.training.state import TrainState

# How the loss of a batch is averaged (`train_step`'s ``loss_normalization``).
LOSS_NORMALIZATIONS = ("token", "sequence")


def sequence_sums(
    token_loss: jax.Array, weights: jax.Array, segment_ids: jax.Array
) -> dict[str, jax.Array]:
    """Per sequence (packed segment) mean token loss, summed over the sequences that have trained
    tokens (``sequence_loss_sum``), and their number (``sequence_count``). A sequence's mean is
    over its tokens of weight 1 (``sum(loss * weight) / sum(weight)``).

    ``segment_ids`` are in ``[0, length]`` per row (0, padding, is never a sequence), e.g. a row
    of segments ``[1, 1, 1, 2, 2, 0]``, token losses ``[0, 2, 4, 6, 8, 0]`` and weights
    ``[0, 1, 1, 0, 1, 0]`` hold two sequences of mean loss 3 and 8: sum 11, count 2.
    """
    num_segments = segment_ids.shape[-1] + 1
    per_row = jax.vmap(lambda x, ids: jax.ops.segment_sum(x, ids, num_segments=num_segments))
    loss = per_row(token_loss * weights, segment_ids)  # [batch, length + 1]
    count = per_row(weights, segment_ids)
    trained = (count > 0) & (jnp.arange(num_segments) > 0)
    return {
        "sequence_loss_sum": jnp.sum(jnp.where(trained, loss / jnp.maximum(count, 1.0), 0.0)),
        "sequence_count": jnp.sum(trained.astype(jnp.float32)),
    }


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    groups: jax.Array | None = None,
    num_groups: int = 0,
    segment_ids: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Sums of token loss, correct predictions and weights over the tokens with weight 1.

    With ``groups`` (an id in ``[0, num_groups)`` per token), also the loss and weight sums of
    each group, as ``group_loss_sum`` and ``group_weight_sum`` of shape ``[num_groups]``. With
    ``segment_ids``, also the `sequence_sums`.
    """
    logits = logits.astype(jnp.float32)
    # One max serves both the stable log-sum-exp and the accuracy (a token is predicted when
    # its logit is the largest): an argmax would be a second, slower pass over the vocabulary.
    max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= max_logit).astype(jnp.float32)
    return token_sums(log_z - target_logit, correct, weights, groups, num_groups, segment_ids)


def token_sums(
    unweighted_loss: jax.Array,
    correct: jax.Array,
    weights: jax.Array,
    groups: jax.Array | None = None,
    num_groups: int = 0,
    segment_ids: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """`cross_entropy`'s sums from each token's loss and correctness ``[batch, length]``."""
    weights = weights.astype(jnp.float32)
    token_loss = unweighted_loss * weights
    sums = {
        "loss_sum": jnp.sum(token_loss),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
    }
    if num_groups:
        one_hot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)
        sums["group_loss_sum"] = jnp.einsum("btg,bt->g", one_hot, token_loss)
        sums["group_weight_sum"] = jnp.einsum("btg,bt->g", one_hot, weights)
    if segment_ids is not None:
        sums.update(sequence_sums(unweighted_loss, weights, segment_ids))
    return sums


def batch_sums(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: dict[str, jax.Array],
    num_groups: int = 0,
    sequences: bool = False,
    dropout_rng: jax.Array | None = None,
):
    """`cross_entropy` sums of the model's logits; with ``sequences``, the `sequence_sums` too.
    ``dropout_rng`` turns on the model's dropout (LoRA's). With the model's
    ``loss_vocab_chunk``, from `chunked_loss.token_log_loss` of its hidden states."""
    model = nnx.merge(graphdef, params)
    kwargs = {} if dropout_rng is None else {"dropout_rng": dropout_rng}
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    groups = batch.get("source_ids") if num_groups else None
    segment_ids = batch["segment_ids"] if sequences else None
    cfg = model.cfg
    hidden, weight, router_stats = model.features(*inputs, **kwargs)
    if cfg.loss_vocab_chunk:
        loss, correct = chunked_loss.token_log_loss(
            hidden,
            weight,
            batch["targets"],
            cfg.loss_vocab_chunk,
            cfg.final_logit_softcap,
        )
        sums = token_sums(loss, correct, batch["loss_mask"], groups, num_groups, segment_ids)
    else:
        logits = model.logits_from(hidden, weight)
        sums = cross_entropy(
            logits,
            batch["targets"],
            batch["loss_mask"],
            groups,
            num_groups,
            segment_ids,
        )
    if router_stats is not None:
        losses = moe.router_losses(cfg, router_stats)
        sums.update(losses)
        sums["router_penalty"] = (
            cfg.router_aux_loss_coef * losses["router_aux_loss"]
            + cfg.router_z_loss_coef * losses["router_z_loss"]
        )
    return sums


def _check_normalization(loss_normalization: str) -> None:
    if loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(
            f"loss_normalization={loss_normalization!r}; expected one of {LOSS_NORMALIZATIONS}"
        )


def loss_denominator(batch: dict[str, jax.Array], loss_normalization: str = "token") -> jax.Array:
    """What the loss sum of the whole batch is divided by: its trained tokens ("token") or its
    sequences with trained tokens ("sequence"); at least 1. Needs no model."""
    _check_normalization(loss_normalization)
    weights = batch["loss_mask"].astype(jnp.float32)
    if loss_normalization == "token":
        count = jnp.sum(weights)
    else:
        count = sequence_sums(weights, weights, batch["segment_ids"])["sequence_count"]
    return jnp.maximum(count, 1.0)


def _numerator(sums: dict[str, jax.Array], loss_normalization: str) -> jax.Array:
    return sums["loss_sum" if loss_normalization == "token" else "sequence_loss_sum"]


def loss_fn(params, graphdef, batch, num_groups: int = 0, loss_normalization: str = "token"):
    """The loss of the whole (global) batch, and its sums: by default the mean cross-entropy
    over its trained tokens; with ``loss_normalization="sequence"`` the mean over its sequences
    of each sequence's mean token loss."""
    _check_normalization(loss_normalization)
    sums = batch_sums(graphdef, params, batch, num_groups, loss_normalization == "sequence")
    numerator = _numerator(sums, loss_normalization)
    return numerator / loss_denominator(batch, loss_normalization), sums


def _split_microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """``[B, ...] -> [k, B / k, ...]``, microbatch ``j`` holding rows ``j, j + k, j + 2k, ...``:
    each device's contiguous block of rows is spread over all microbatches, so a batch sharded
    along its rows gives microbatches sharded the same way."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"microbatches={k} does not divide the batch of {x.shape[0]} rows")
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {name: split(x) for name, x in batch.items()}


def accumulated_gradients(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch: dict[str, jax.Array],
    *,
    num_groups: int = 0,
    loss_normalization: str = "token",
    microbatches: int = 1,
    dropout_rng: jax.Array | None = None,
):
    """``(loss, sums, grads)`` of `loss_fn` over the whole batch, computed ``microbatches`` at a
    time.

    Each microbatch's loss *sum* is divided by the denominator of the whole batch
    (`loss_denominator`), so the microbatches' losses and gradients simply add up to those of the
    full batch, however its trained tokens (or sequences) are spread over the microbatches.
    Gradients are accumulated in float32 under `jax.lax.scan`.
    """
    _check_normalization(loss_normalization)
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches}; expected a positive number")
    sequences = loss_normalization == "sequence"
    denominator = loss_denominator(batch, loss_normalization)

    def objective(p, b, rng=dropout_rng):
        sums = batch_sums(graphdef, p, b, num_groups, sequences, rng)
        loss = _numerator(sums, loss_normalization) / denominator
        # The routers' weighted auxiliary losses: each microbatch's, so their mean in the sum.
        return loss + sums.get("router_penalty", 0.0) / microbatches, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if microbatches == 1:
        (loss, sums), grads = grad_fn(params, batch)
        return loss, sums, grads

    def body(totals, indexed):
        i, microbatch = indexed
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        (loss, sums), grads = grad_fn(params, microbatch, rng)
        return jax.tree.map(lambda t, x: t + x.astype(t.dtype), totals, (loss, sums, grads)), None

    micro = _split_microbatches(batch, microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    (loss_shape, sums_shape), grads_shape = jax.eval_shape(grad_fn, params, first)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.float32), (loss_shape, sums_shape, grads_shape)
    )
    (loss, sums, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(microbatches), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, sums, grads


def schedule_count(opt_state: optax.OptState, default: jax.Array) -> jax.Array:
    """The step count the optimizer's learning-rate schedule is at (its `ScaleByScheduleState`;
    behind ``state.step`` once non-finite steps were skipped), or ``default`` without one."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    for leaf in jax.tree.leaves(opt_state, is_leaf=is_schedule):
        if is_schedule(leaf):
            return leaf.count
    return default


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    source_names: tuple[str, ...] = (),
    microbatches: int = 1,
    loss_normalization: str = "token",
    dropout_seed: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the batch's loss (`loss_fn`), its gradient accumulated over
    ``microbatches`` (`accumulated_gradients`: the same update as the whole batch at once).

    If the loss or the gradient norm is not finite, the update is skipped: parameters and
    optimizer state stay as they were (bitwise), ``step`` still advances (the batch is
    consumed), and the metric ``nonfinite`` is 1.0 (else 0.0). With ``source_names`` (more than
    one mixture source), the metrics also hold each source's trained-token count and token-mean
    loss, read off the batch's ``source_ids``. With "sequence" normalisation, ``loss`` is the
    optimised sequence mean and ``token_loss`` the token mean. ``dropout_seed`` turns on the
    model's dropout, with a key drawn from it and the step.
    """
    num_groups = len(source_names) if len(source_names) > 1 else 0
    loss, sums, grads = accumulated_gradients(
        state.params,
        graphdef,
        batch,
        num_groups=num_groups,
        loss_normalization=loss_normalization,
        microbatches=microbatches,
        dropout_rng=(
            None
            if dropout_seed is None
            else jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        ),
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state),
        (state.params, state.opt_state),
    )
    metrics = {
        "loss": loss,
        "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
        "trained_tokens": sums["weight_sum"],
        "grad_norm": grad_norm,
        "learning_rate": schedule(schedule_count(state.opt_state, state.step)),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    for name in ("router_aux_loss", "router_z_loss"):
        if name in sums:  # Each microbatch's value, summed: their mean.
            metrics[name] = sums[name] / microbatches
    if loss_normalization == "sequence":
        metrics["token_loss"] = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
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
