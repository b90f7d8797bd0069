"""Rotary position embedding and segment-aware causal attention, in three implementations.

``xla`` is the reference, in plain XLA ops: scores in float32, a mask that is causal within a
segment and never crosses segments of a packed row. ``jax`` calls `jax.nn.dot_product_attention`,
which on GPU picks cuDNN's fused (flash) attention and elsewhere XLA's. ``splash`` runs the Pallas
splash attention kernel of TPUs (elsewhere only in Pallas's interpreter, for tests).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from itune.model.matmul import matmul

IMPLEMENTATIONS = ("xla", "jax", "splash")


def rope_frequencies(cfg: Any) -> np.ndarray:
    """Inverse frequencies ``[head_dim / 2]`` (float32), with Llama-3 scaling if configured."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.float32(cfg.rope_theta) ** exponents).astype(np.float32)
    if cfg.rope_scaling == "llama3":
        factor, low, high = (
            cfg.rope_scaling_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
        )
        old_len = cfg.rope_original_max_len
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x [batch, length, heads, head_dim]`` by ``positions [batch, length]``.

    Rotate-half convention (as in Hugging Face LLaMA): dimension i pairs with i + head_dim / 2.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, d / 2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_mask(segment_ids: jax.Array, sliding_window: int = 0) -> jax.Array:
    """``[batch, q, k]`` booleans: same segment, not in the future (nor, with a sliding window,
    ``sliding_window`` or more tokens back).

    Padding (segment 0) attends to padding only, which keeps every softmax row non-empty.
    """
    length = segment_ids.shape[-1]
    offset = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    allowed = offset >= 0
    if sliding_window:
        allowed &= offset < sliding_window
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same_segment & allowed[None]


def attend(q, k, v, segment_ids, implementation: str = "xla", sliding_window: int = 0):
    """Grouped-query attention. q: ``[b, t, heads, d]``; k, v: ``[b, s, kv_heads, d]``."""
    if implementation == "xla":
        return dot_product_attention(q, k, v, segment_ids, sliding_window)
    if implementation == "jax":
        mask = attention_mask(segment_ids, sliding_window)[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return out.astype(q.dtype)
    if implementation == "splash":
        return splash_attention(q, k, v, segment_ids, sliding_window)
    raise ValueError(
        f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}"
    )


def dot_product_attention(q, k, v, segment_ids, sliding_window: int = 0, block: int = 128):
    """The reference: grouped-query attention in XLA ops, scores and softmax in float32.

    q, k and v are first laid out heads-major (``[b, kv_heads, rows, d]``, a kv head's query
    group folded into its rows), so that both products are plain batched matmuls whose results
    need no transpose: the small q/k/v/output arrays move, not the ``[t, s]`` score matrices.
    Causal self-attention runs in query blocks of ``block`` rows, each against the keys up to
    its own end: the fully masked upper blocks of the score matrix are never computed (5/8 of
    it is, at 4 blocks).
    """
    b, t, num_heads, head_dim = q.shape
    s, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    q = q.reshape(b, t, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, s, d]
    mask = attention_mask(segment_ids, sliding_window)[:, None, None]  # [b, 1, 1, t, s]
    blocked = t == s and t > block and t % block == 0
    outputs = []
    for start in range(0, t, block) if blocked else (0,):
        end = start + block if blocked else t
        keys = end if blocked else s  # Keys after a block's last query are all masked.
        rows = group * (end - start)
        q_block = q[:, :, :, start:end].reshape(b, num_kv_heads, rows, head_dim)
        scores = matmul("bkqd,bksd->bkqs", q_block, k[:, :, :keys], q.dtype, jnp.float32)
        scores = scores.reshape(b, num_kv_heads, group, end - start, keys) * head_dim**-0.5
        scores = jnp.where(mask[..., start:end, :keys], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).reshape(b, num_kv_heads, rows, keys)
        out = matmul("bkqs,bksd->bkqd", probs, v[:, :, :keys], v.dtype)
        outputs.append(out.reshape(b, num_kv_heads, group, end - start, head_dim))
    out = jnp.concatenate(outputs, axis=3).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, num_heads, head_dim)


def cached_attention(q, k_cache, v_cache, positions, sliding_window: int = 0):
    """Queries ``[b, t, heads, d]`` at ``positions [b, t]`` over a cache ``[b, s, kv_heads, d]``
    whose slot ``j`` holds position ``j``: causal (and windowed) by position, scores in float32."""
    b, t, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    q = q.reshape(b, t, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    offset = positions[:, :, None] - jnp.arange(k_cache.shape[1])[None, None, :]  # [b, t, s]
    allowed = offset >= 0
    if sliding_window:
        allowed &= offset < sliding_window
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.astype(v_cache.dtype).reshape(b, t, num_heads, head_dim)


def splash_attention(q, k, v, segment_ids, sliding_window: int = 0, block: int = 128):
    """The Pallas splash attention kernel (TPU); Pallas's interpreter elsewhere.

    The kernel runs per example and per key/value head (an MQA kernel over that head's group of
    query heads); the sequence length must be a multiple of ``block``.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_kernel as kernel_lib,
        splash_attention_mask as mask_lib,
    )

    b, t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    if t % block:
        raise ValueError(f"splash attention needs a length divisible by {block}, got {t}")
    if sliding_window:
        window = mask_lib.LocalMask((t, t), (sliding_window - 1, 0), offset=0)
        mask = mask_lib.MultiHeadMask([window] * group)
    else:
        mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, t))] * group)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    interpret = jax.default_backend() != "tpu"
    kernel = kernel_lib.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    # [b, kv, group, t, d] queries, pre-scaled: the kernel does not scale.
    qs = (q * head_dim**-0.5).reshape(b, t, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    segments = segment_ids.astype(jnp.int32)

    def one_head(qh, kh, vh, seg):
        return kernel(qh, kh, vh, segment_ids=kernel_lib.SegmentIds(q=seg, kv=seg))

    per_head = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(qs, ks, vs, segments)  # [b, kv, group, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, num_heads, head_dim).astype(q.dtype)
