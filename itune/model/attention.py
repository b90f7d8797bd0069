"""Rotary position embedding and segment-aware causal attention, in three implementations.

``xla`` is the reference, in plain XLA ops: scores in float32, a mask that is causal within a
segment and never crosses segments of a packed row. ``jax`` calls `jax.nn.dot_product_attention`,
which on GPU picks cuDNN's fused (flash) attention and elsewhere XLA's. ``splash`` runs the Pallas
splash attention kernel of TPUs (elsewhere only in Pallas's interpreter, for tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from itune.model.matmul import written_out

IMPLEMENTATIONS = ("xla", "jax", "splash")


def rope_frequencies(cfg: Any, local: bool = False) -> np.ndarray:
    """Inverse frequencies ``[head_dim / 2]`` (float32), scaled as configured; with ``local``,
    those of the sliding layers' own base (``rope_local_theta``), unscaled."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    if local:
        return inv_freq
    if cfg.rope_scaling == "linear":
        return (inv_freq / np.float32(cfg.rope_scaling_factor)).astype(np.float32)
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
    if cfg.rope_scaling == "yarn":
        inv_freq = _yarn_frequencies(cfg, inv_freq)
    return inv_freq


def _yarn_frequencies(cfg: Any, inv_freq: np.ndarray) -> np.ndarray:
    """YaRN's frequencies (transformers' ``_compute_yarn_parameters``): dimension ``i`` keeps its
    frequency above the ramp (many turns over the original length), takes it divided by the
    factor below it (few turns), and a linear mix on it."""
    dim, theta = cfg.head_dim, cfg.rope_theta

    def dimension(turns):  # The dimension whose wavelength fits `turns` times in the length.
        return (
            dim
            * math.log(cfg.rope_original_max_len / (turns * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = dimension(cfg.rope_yarn_beta_fast), dimension(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    kept = (1 - ramp).astype(np.float32)
    scaled = inv_freq / np.float32(cfg.rope_scaling_factor)
    return (scaled * (1 - kept) + inv_freq * kept).astype(np.float32)


def rope_attention_factor(cfg: Any) -> float:
    """What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor:
        return float(cfg.rope_attention_factor)
    factor = cfg.rope_scaling_factor
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale=1.0) -> jax.Array:
    """Rotates ``x [batch, length, heads, head_dim]`` by ``positions [batch, length]``; cos and
    sin multiplied by ``scale`` (`rope_attention_factor`).

    Rotate-half convention (as in Hugging Face LLaMA): dimension i pairs with i + head_dim / 2.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, d / 2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    if not isinstance(scale, (int, float)) or scale != 1.0:
        sin, cos = sin * scale, cos * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_mask(segment_ids: jax.Array, sliding_window: int = 0) -> jax.Array:
    """``[batch, q, k]`` booleans: same segment, not in the future (nor, with a sliding window,
    ``sliding_window`` or more tokens back).

    Padding (segment 0) attends to padding only, which keeps every softmax row non-empty.
    """
    positions = jnp.arange(segment_ids.shape[-1])
    return row_mask(positions, positions, segment_ids, segment_ids, sliding_window)


def row_mask(q_index, k_index, q_segments, k_segments, sliding_window: int = 0) -> jax.Array:
    """`attention_mask` of queries and keys at the given indices in their row (``[q]``, ``[k]``)
    with segment ids ``[batch, q]`` and ``[batch, k]``: ``[batch, q, k]`` booleans."""
    offset = q_index[:, None] - k_index[None, :]
    allowed = offset >= 0
    if not isinstance(sliding_window, int):  # Traced (a layer's own, under scan); 0: none.
        allowed &= (offset < sliding_window) | (sliding_window == 0)
    elif sliding_window:
        allowed &= offset < sliding_window
    same_segment = q_segments[:, :, None] == k_segments[:, None, :]
    return same_segment & allowed[None]


def attend(
    q,
    k,
    v,
    segment_ids,
    implementation: str = "xla",
    sliding_window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
):
    """Grouped-query attention. q: ``[b, t, heads, d]``; k, v: ``[b, s, kv_heads, d]``.

    Scores are ``q.k * scale`` (default ``d ** -0.5``), soft-capped to ``softcap *
    tanh(scores / softcap)`` when ``softcap`` is set (not with ``jax``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "xla":
        return dot_product_attention(
            q, k, v, segment_ids, sliding_window, scale=scale, softcap=softcap
        )
    if implementation == "jax":
        if softcap:
            raise ValueError("attention 'jax' has no soft-cap: use 'xla' or 'splash'")
        mask = attention_mask(segment_ids, sliding_window)[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
        return out.astype(q.dtype)
    if implementation == "splash":
        return splash_attention(q, k, v, segment_ids, sliding_window, scale=scale, softcap=softcap)
    raise ValueError(
        f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}"
    )


def dot_product_attention(
    q,
    k,
    v,
    segment_ids,
    sliding_window: int = 0,
    block: int = 128,
    scale: float | None = None,
    softcap: float = 0.0,
):
    """The reference: grouped-query attention in XLA ops, scores and softmax in float32.

    q, k and v are laid out as batches of plain matrices, one per (example, kv head): queries
    ``[b * kv_heads, t * group, d]`` (a kv head's query group interleaved by position), keys
    transposed to ``[b * kv_heads, d, s]``, values ``[b * kv_heads, s, d]``, so that every
    product of the forward and backward is a plain batched matmul of compute-dtype operands
    (`_blocked_attention`). Causal self-attention runs in query blocks of ``block`` positions,
    each against the keys up to its own end: the fully masked upper blocks of the score matrix
    are never computed (5/8 of it is, at 4 blocks). The mask enters as an additive float32
    bias ``[b, t, s]`` (`mask_bias`), built once and added to each block's scores: XLA:CPU
    fuses one add of a plain array far better than the segment and position comparisons
    broadcast over the heads of every block.
    """
    bias = mask_bias(segment_ids, sliding_window)
    blocks = _query_blocks(q.shape[1], k.shape[1], block)
    return biased_attention(q, k, v, bias, blocks, scale, softcap)


def biased_attention(q, k, v, bias, blocks, scale: float | None = None, softcap: float = 0.0):
    """`dot_product_attention` under a given mask ``bias [b, t, s]`` (`mask_bias`), in the
    given query ``blocks``: ``(first query, end query, keys)`` each, a block's queries attending
    to the first ``keys`` keys only (those after are masked for all of them)."""
    b, t, num_heads, head_dim = q.shape
    s, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    q = q.reshape(b, t, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q = q.reshape(b * num_kv_heads, t * group, head_dim)
    k = k.transpose(0, 2, 3, 1).reshape(b * num_kv_heads, head_dim, s)
    v = v.transpose(0, 2, 1, 3).reshape(b * num_kv_heads, s, head_dim)
    q = q * jnp.asarray(head_dim**-0.5 if scale is None else scale, q.dtype)
    blocks = tuple((int(start), int(end), int(keys)) for start, end, keys in blocks)
    out = _blocked_attention(q, k, v, bias, group, blocks, float(softcap))
    out = out.reshape(b, num_kv_heads, t, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, num_heads, head_dim)


# Added to masked scores: far below any score, yet finite, so that no sum of it overflows.
MASKED = -1e30


def mask_bias(segment_ids: jax.Array, sliding_window: int = 0) -> jax.Array:
    """``[batch, q, k]`` float32: 0 where `attention_mask` allows, `MASKED` elsewhere."""
    allowed = attention_mask(segment_ids, sliding_window)
    return jnp.where(allowed, 0.0, MASKED).astype(jnp.float32)


def _mm(a, b):
    """``[n, m, k] x [n, k, p] -> [n, m, p]``, accumulated and returned in float32."""
    dims = (((2,), (1,)), ((0,), (0,)))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _transposed(x):
    """``x [n, a, b] -> [n, b, a]``, written out in memory (`matmul.written_out`): a plain
    transpose would be folded into the product as a transposed operand, off XLA:CPU's bfloat16
    path."""
    return written_out(jnp.swapaxes(x, 1, 2))


def _query_blocks(t: int, s: int, block: int) -> tuple[tuple[int, int, int], ...]:
    """``(first position, end position, keys)`` of each query block."""
    if t == s and t > block and t % block == 0:
        return tuple((start, start + block, start + block) for start in range(0, t, block))
    return ((0, t, s),)


def _block_scores(q, k_t, bias, group, start, end, keys, softcap=0.0):
    """Scaled float32 scores ``[b, kv_heads, positions, group, keys]`` of one query block
    (soft-capped with ``softcap``), the masked ones pushed down by `MASKED`; and the tanh of
    the soft-cap (for its derivative; None without one)."""
    n, _, head_dim = q.shape
    b = bias.shape[0]
    scores = _mm(q[:, start * group : end * group], k_t[:, :, :keys])
    scores = scores.reshape(b, n // b, end - start, group, keys)
    squashed = None
    if softcap:
        squashed = jnp.tanh(scores / softcap)
        scores = squashed * softcap
    return scores + bias[:, None, start:end, None, :keys], squashed


def _attention_forward(q, k_t, v, bias, group, blocks, softcap=0.0):
    """Output ``[n, rows, d]`` and each row's log-sum-exp of scores ``[n, rows]``, both float32."""
    n, rows, head_dim = q.shape
    outputs, log_sum_exps = [], []
    for start, end, keys in blocks:
        scores, _ = _block_scores(q, k_t, bias, group, start, end, keys, softcap)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - row_max)  # Normalised after the product: one pass fewer.
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = _mm(weights.astype(v.dtype).reshape(n, -1, keys), v[:, :keys])
        out = out.reshape(weights.shape[:-1] + (head_dim,)) / total
        outputs.append(out.reshape(n, -1, head_dim))
        log_sum_exps.append((row_max + jnp.log(total)).reshape(n, -1))
    return jnp.concatenate(outputs, axis=1), jnp.concatenate(log_sum_exps, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked_attention(q, k_t, v, bias, group, blocks, softcap=0.0):
    """Attention over the batched-matrix layout of `dot_product_attention`, with the backward
    of flash attention written out: it keeps only the output and the log-sum-exp of each row
    (named for remat, `ATTENTION_RESIDUALS`), recomputes each block's probabilities from them,
    and lays every product out as a plain batched matmul with no transposed score matrix (XLA's
    CPU backend runs the transposed forms far slower). Under plain autodiff the softmax's
    backward needs the probabilities kept, and a remat policy that saves no batched product
    recomputes the whole forward."""
    return _attention_forward(q, k_t, v, bias, group, blocks, softcap)[0].astype(q.dtype)


ATTENTION_RESIDUALS = ("attention_out", "attention_log_sum_exp")


def _attention_fwd(q, k_t, v, bias, group, blocks, softcap):
    out, log_sum_exp = _attention_forward(q, k_t, v, bias, group, blocks, softcap)
    # Kept in float32, as the backward reads it: XLA:CPU updates a layer's slice of a stacked
    # bfloat16 residual through float32, rewriting the whole stack at every layer.
    out = checkpoint_name(out, ATTENTION_RESIDUALS[0])
    log_sum_exp = checkpoint_name(log_sum_exp, ATTENTION_RESIDUALS[1])
    return out.astype(q.dtype), (q, k_t, v, bias, out, log_sum_exp)


def _attention_bwd(group, blocks, softcap, residuals, d_out):
    q, k_t, v, bias, out, log_sum_exp = residuals
    n, rows, head_dim = q.shape
    s = k_t.shape[2]
    dtype = q.dtype
    d_out = d_out.astype(dtype)
    # Softmax's backward: d_scores = p * (d_p - sum_j p_j d_p_j), and that sum is d_out . out.
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)
    # The small operands transposed once, so that no product contracts a leading dimension.
    k, v_t = _transposed(k_t), _transposed(v)
    q_t, d_out_t = _transposed(q), _transposed(d_out)
    d_q_blocks = []
    d_k_t = d_v_t = jnp.zeros((n, head_dim, s), jnp.float32)
    for start, end, keys in blocks:
        first, last = start * group, end * group
        scores, squashed = _block_scores(q, k_t, bias, group, start, end, keys, softcap)
        per_row = scores.shape[:-1] + (1,)
        probs = jnp.exp(scores - log_sum_exp[:, first:last].reshape(per_row))
        d_v_t_block = _mm(d_out_t[:, :, first:last], probs.astype(dtype).reshape(n, -1, keys))
        d_probs = _mm(d_out[:, first:last], v_t[:, :, :keys]).reshape(scores.shape)
        d_scores = probs * (d_probs - row_dot[:, first:last].reshape(per_row))
        if softcap:  # Through the soft-cap: d(c tanh(s / c)) / ds = 1 - tanh(s / c)^2.
            d_scores = d_scores * (1.0 - squashed * squashed)
        d_scores = d_scores.astype(dtype).reshape(n, -1, keys)
        d_q_blocks.append(_mm(d_scores, k[:, :keys]))
        d_k_t_block = _mm(q_t[:, :, first:last], d_scores)
        pad = ((0, 0), (0, 0), (0, s - keys))
        d_k_t += jnp.pad(d_k_t_block, pad)
        d_v_t += jnp.pad(d_v_t_block, pad)
    d_q = jnp.concatenate(d_q_blocks, axis=1).astype(dtype)
    d_k_t, d_v = d_k_t.astype(k_t.dtype), jnp.swapaxes(d_v_t, 1, 2).astype(v.dtype)
    return d_q, d_k_t, d_v, jnp.zeros_like(bias)


_blocked_attention.defvjp(_attention_fwd, _attention_bwd)


def cached_attention(
    q,
    k_cache,
    v_cache,
    positions,
    sliding_window=0,
    scale: float | None = None,
    softcap: float = 0.0,
):
    """Queries ``[b, t, heads, d]`` at ``positions [b, t]`` over a cache ``[b, s, kv_heads, d]``
    whose slot ``j`` holds position ``j``: causal (and windowed) by position, scores in float32,
    scaled and soft-capped as in `attend`. ``sliding_window`` may be traced (0: none)."""
    b, t, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    q = q.reshape(b, t, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5 if scale is None else scale)
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    offset = positions[:, :, None] - jnp.arange(k_cache.shape[1])[None, None, :]  # [b, t, s]
    allowed = offset >= 0
    if not isinstance(sliding_window, int):
        allowed &= (offset < sliding_window) | (sliding_window == 0)
    elif sliding_window:
        allowed &= offset < sliding_window
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.astype(v_cache.dtype).reshape(b, t, num_heads, head_dim)


def splash_attention(
    q,
    k,
    v,
    segment_ids,
    sliding_window: int = 0,
    block: int = 128,
    scale: float | None = None,
    softcap: float = 0.0,
):
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
    kernel = kernel_lib.make_splash_mqa_single_device(
        mask,
        block_sizes=sizes,
        interpret=interpret,
        attn_logits_soft_cap=softcap or None,
    )
    # [b, kv, group, t, d] queries, pre-scaled: the kernel does not scale.
    qs = (
        (q * (head_dim**-0.5 if scale is None else scale))
        .reshape(b, t, num_kv_heads, group, head_dim)
        .transpose(0, 2, 3, 1, 4)
    )
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    segments = segment_ids.astype(jnp.int32)

    def one_head(qh, kh, vh, seg):
        return kernel(qh, kh, vh, segment_ids=kernel_lib.SegmentIds(q=seg, kv=seg))

    per_head = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(qs, ks, vs, segments)  # [b, kv, group, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, num_heads, head_dim).astype(q.dtype)
