"""The token loss computed from the final hidden states, a slice of the vocabulary at a time.

``token_log_loss(hidden, weight, targets, chunk)`` gives what `itune.training.step.cross_entropy`
computes from the logits, ``hidden @ weight.T``, without ever holding the logits of the whole
vocabulary: a scan over slices of ``chunk`` vocabulary entries keeps a running max and sum of
exponentials per token (the log-sum-exp of the slices combined as they come), and the backward
recomputes each slice's logits from the hidden states, turns them into the slice's gradient
``softmax - one_hot(target)`` and multiplies it into both gradients at once.

Against the logits of the whole vocabulary (for the SmolLM2-135M shape, 8 x 512 tokens x 49,152
entries, 805 MB in float32, written by the product, read by the softmax and kept for the
backward), each slice's logits fit in the processor's cache, and the products are of a size that
XLA:CPU's bfloat16 library runs at its full rate (``bench/train_step.py``); it costs one product
more, the logits recomputed in the backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from itune.model.matmul import written_out

# Added to the logits of the padding entries of the last slice (when the vocabulary is not a
# multiple of the slice): far below any logit, yet finite.
_MASKED = -1e30


def vocabulary_slices(vocab_size: int, target: int) -> tuple[int, int]:
    """``(number of slices, slice size)``: the fewest slices of at most ``target`` entries, all
    of one size (the last one padded)."""
    count = math.ceil(vocab_size / target)
    return count, math.ceil(vocab_size / count)


def token_log_loss(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    chunk: int,
    softcap: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per token ``[batch, length]``: ``log_z - logit[target]`` (float32) and 1.0 where the target
    has the largest logit (no gradient), for logits ``hidden [batch, length, d] @ weight.T``
    (``weight [vocab, d]``, in the computation dtype; products accumulate in float32), computed
    ``chunk`` or fewer vocabulary entries at a time; with ``softcap``, of the logits
    ``softcap * tanh(logits / softcap)``."""
    b, t, d = hidden.shape
    vocab_size = weight.shape[0]
    count, size = vocabulary_slices(vocab_size, chunk)
    if count * size != vocab_size:
        weight = jnp.pad(weight, ((0, count * size - vocab_size), (0, 0)))
    loss, correct = _token_log_loss(
        hidden.reshape(b * t, d),
        weight,
        targets.reshape(b * t),
        size,
        vocab_size,
        float(softcap),
    )
    return loss.reshape(b, t), correct.reshape(b, t)


def _product(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _transposed_slices(weight, size):
    """``weight [slices * size, d]`` as ``[slices, d, size]``, written out: each slice's logits
    are then a plain product (a transposed operand takes XLA:CPU off its bfloat16 path)."""
    return written_out(weight.reshape(-1, size, weight.shape[1]).transpose(0, 2, 1))


def _slice_logits(hidden, weight_t, index, size, vocab_size, softcap=0.0):
    """The logits of slice ``index`` (soft-capped), those of the padding entries pushed down by
    `_MASKED`; and the soft-cap's tanh (None without one)."""
    logits = _product(hidden, weight_t)
    squashed = None
    if softcap:
        squashed = jnp.tanh(logits / softcap)
        logits = squashed * softcap
    if vocab_size % size:  # Only the last slice holds padding.
        column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + index * size
        logits = jnp.where(column < vocab_size, logits, _MASKED)
    return logits, squashed


def _forward(hidden, weight, targets, size, vocab_size, softcap):
    tokens = hidden.shape[0]

    def one_slice(carry, xs):
        running_max, total, target_logit = carry
        weight_t, index = xs
        logits, _ = _slice_logits(hidden, weight_t, index, size, vocab_size, softcap)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        total = total * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=-1
        )
        local = targets - index * size
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1)[:, None], axis=-1)
        target_logit = jnp.where((local >= 0) & (local < size), picked[:, 0], target_logit)
        return (new_max, total, target_logit), None

    start = (
        jnp.full((tokens,), -jnp.inf, jnp.float32),
        jnp.zeros((tokens,), jnp.float32),
        jnp.zeros((tokens,), jnp.float32),
    )
    slices = (_transposed_slices(weight, size), jnp.arange(weight.shape[0] // size))
    (max_logit, total, target_logit), _ = jax.lax.scan(one_slice, start, slices)
    log_z = max_logit + jnp.log(total)
    correct = (target_logit >= max_logit).astype(jnp.float32)
    return log_z - target_logit, correct, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_log_loss(hidden, weight, targets, size, vocab_size, softcap):
    loss, correct, _ = _forward(hidden, weight, targets, size, vocab_size, softcap)
    return loss, correct


def _token_log_loss_fwd(hidden, weight, targets, size, vocab_size, softcap):
    loss, correct, log_z = _forward(hidden, weight, targets, size, vocab_size, softcap)
    return (loss, correct), (hidden, weight, targets, log_z)


def _token_log_loss_bwd(size, vocab_size, softcap, residuals, cotangents):
    hidden, weight, targets, log_z = residuals
    d_loss = cotangents[0][:, None]
    hidden_t = written_out(hidden.T)

    def one_slice(d_hidden, xs):
        weight_slice, weight_t, index = xs
        logits, squashed = _slice_logits(hidden, weight_t, index, size, vocab_size, softcap)
        column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + index * size
        is_target = (column == targets[:, None]).astype(jnp.float32)
        d_logits = (jnp.exp(logits - log_z[:, None]) - is_target) * d_loss
        if softcap:  # d(c tanh(x / c)) / dx = 1 - tanh(x / c)^2.
            d_logits = d_logits * (1.0 - squashed * squashed)
        d_logits = d_logits.astype(hidden.dtype)
        d_hidden = d_hidden + _product(d_logits, weight_slice)
        return d_hidden, _product(hidden_t, d_logits)  # The slice's weight gradient, [d, size].

    slices = (
        weight.reshape(-1, size, weight.shape[1]),
        _transposed_slices(weight, size),
        jnp.arange(weight.shape[0] // size),
    )
    d_hidden, d_weight_t = jax.lax.scan(one_slice, jnp.zeros(hidden.shape, jnp.float32), slices)
    d_weight = d_weight_t.transpose(0, 2, 1).reshape(weight.shape)
    return d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype), None


_token_log_loss.defvjp(_token_log_loss_fwd, _token_log_loss_bwd)
