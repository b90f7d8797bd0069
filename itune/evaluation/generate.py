"""Greedy generation from a batch of prompts of different lengths.

Prompts are right-padded into one fixed-size buffer and decoded with the whole decode loop under
one `jax.jit`, which stops once every row has produced its stop token. Each step re-reads the
buffer, so the causal mask alone keeps padding and future tokens out of every prediction.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "stop_id", "pad_id"))
def _decode(params, tokens, lengths, *, graphdef, max_new_tokens, stop_id, pad_id):
    model = nnx.merge(graphdef, params)
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segment_ids = jnp.ones((batch, length), jnp.int32)
    rows = jnp.arange(batch)

    def keep_going(carry):
        i, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        i, tokens, done = carry
        hidden = model.hidden_states(tokens, positions, segment_ids)
        last = hidden[rows, lengths + i - 1][:, None]
        next_token = jnp.argmax(model.logits(last)[:, 0], axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, pad_id, next_token)
        tokens = tokens.at[rows, lengths + i].set(next_token)
        return i + 1, tokens, done | (next_token == stop_id)

    # Stops as soon as every row has produced its stop token.
    _, tokens, _ = jax.lax.while_loop(
        keep_going, step, (jnp.int32(0), tokens, jnp.zeros((batch,), jnp.bool_))
    )
    return tokens


def greedy_generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    stop_id: int,
    pad_id: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """The generated ids of each prompt, up to and without the stop token."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        n = len(chunk)
        chunk += [chunk[0]] * (batch_size - n) if len(prompts) > batch_size else []
        # Round the buffer up so that similar prompt sets share one compilation.
        length = -(-(max(map(len, chunk)) + max_new_tokens) // 32) * 32
        tokens = np.full((len(chunk), length), pad_id, np.int32)
        for i, prompt in enumerate(chunk):
            tokens[i, : len(prompt)] = prompt
        lengths = np.array([len(p) for p in chunk], np.int32)
        out = np.asarray(
            _decode(
                params,
                tokens,
                lengths,
                graphdef=graphdef,
                max_new_tokens=max_new_tokens,
                stop_id=stop_id,
                pad_id=pad_id,
            )
        )
        for i in range(n):
            generated = out[i, lengths[i] : lengths[i] + max_new_tokens].tolist()
            outputs.append(
                generated[: generated.index(stop_id)] if stop_id in generated else generated
            )
    return outputs
