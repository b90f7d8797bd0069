"""Rotary position embedding and segment-aware causal attention.

Reference implementation in plain XLA ops: scores in float32, a mask that is causal within a
segment and never crosses segments of a packed row.
"""

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates ``x [batch, length, heads, head_dim]`` by ``positions [batch, length]``.

    Rotate-half convention (as in Hugging Face LLaMA): dimension i pairs with i + head_dim / 2.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, head_dim / 2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """``[batch, q, k]`` booleans: same segment and not in the future.

    Padding (segment 0) attends to padding only, which keeps every softmax row non-empty.
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same_segment & causal[None]


def dot_product_attention(q, k, v, segment_ids):
    """Grouped-query attention. q: ``[b, t, heads, d]``; k, v: ``[b, s, kv_heads, d]``."""
    b, t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(b, t, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    mask = attention_mask(segment_ids)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, num_heads, head_dim)
