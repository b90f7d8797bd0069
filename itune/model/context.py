"""Context parallelism: each row's tokens split over the mesh axes of ``'activation_length'``.

The rules table decides: where ``'activation_length'`` maps to mesh axes of more than one device
(the ``'cp'`` strategy maps it to ``context``), every activation ``[batch, length, ...]`` holds
only its device's share of each row, and norms, MLP, router and loss run on that share as they
are. Attention is the one place where tokens meet: `attend` gathers the keys, values and segment
ids of the whole row along the context axes (all-gather, MaxText's default), and each device
attends with its own queries only.

Causal load balancing: a row cut in ``n`` contiguous shards would give the first device almost
nothing to attend to and the last device almost everything. `balance` cuts it into ``2 n``
chunks instead and gives device ``i`` chunks ``i`` and ``2 n - 1 - i`` (the zig-zag layout),
so that every device holds the same number of (query, earlier key) pairs, e.g. for ``n = 2``,
chunks ``[0, 1, 2, 3] -> [0, 3 | 1, 2]``. The decoder reorders tokens, positions and segment ids
so on entry and puts its hidden states back in row order (`unbalance`) before the loss; the mask
is built from each query's and each key's index in the row, so causality, sliding windows and
packed segments hold across shard boundaries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from itune.model import attention
from itune.sharding import LogicalRules, logical_to_spec

LENGTH = "activation_length"


def context_axes(rules: LogicalRules) -> tuple[str, ...]:
    """The mesh axes (of the ambient mesh, with more than one device) that split the sequence of
    activations under ``rules``; empty when nothing does (or outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return ()
    axes = dict(rules).get(LENGTH)
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def context_size(rules: LogicalRules) -> int:
    """How many devices share each row (1: no context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in context_axes(rules))


def _chunk(length: int, n: int) -> int:
    if length % (2 * n):
        raise ValueError(
            f"context parallelism over {n} devices needs rows of a multiple of {2 * n} "
            f"tokens (two chunks a device), got {length}"
        )
    return length // (2 * n)


def balance(x: jax.Array, n: int) -> jax.Array:
    """``x [batch, length, ...]`` in the zig-zag order of ``n`` devices: chunks ``i`` and
    ``2 n - 1 - i`` of the row side by side, for each ``i``."""
    b, length = x.shape[:2]
    c = _chunk(length, n)
    chunks = x.reshape(b, 2, n, c, *x.shape[2:])
    pairs = jnp.stack([chunks[:, 0], jnp.flip(chunks[:, 1], axis=1)], axis=2)  # [b, n, 2, c...]
    return pairs.reshape(x.shape)


def unbalance(x: jax.Array, n: int) -> jax.Array:
    """The inverse of `balance`: row order again."""
    b, length = x.shape[:2]
    c = _chunk(length, n)
    pairs = x.reshape(b, n, 2, c, *x.shape[2:])
    first, second = pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)
    return jnp.concatenate([first, second], axis=1).reshape(x.shape)


def _size(mesh, axes) -> int:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def attend(
    q,
    k,
    v,
    segment_ids,
    rules: LogicalRules,
    implementation: str = "xla",
    sliding_window=0,
    scale: float | None = None,
    softcap: float = 0.0,
):
    """`attention.attend` of a row held in the zig-zag order (`balance`) by the devices along
    the context axes: q ``[b, t, heads, d]``, k, v ``[b, t, kv_heads, d]``, segment ids ``[b, t]``
    in that order; the output in it too. ``sliding_window`` may be traced (0: none).

    Each device gathers the row's keys, values and segment ids, puts them back in row order,
    and attends with its two query chunks: the first (chunk ``i < n``) against the row's first
    half of keys only, none after it being earlier than its queries; the second against all.
    ``implementation`` "xla" runs `attention.biased_attention` (its custom backward), "jax"
    `jax.nn.dot_product_attention` under the same mask."""
    if implementation not in ("xla", "jax"):
        raise ValueError(
            f"context parallelism runs attention 'xla' or 'jax', not {implementation!r}"
        )
    if implementation == "jax" and softcap:
        raise ValueError("attention 'jax' has no soft-cap: use 'xla'")
    mesh = jax.sharding.get_abstract_mesh()
    axes = context_axes(rules)
    n = math.prod(mesh.shape[a] for a in axes)
    length = q.shape[1]
    c = _chunk(length, n)
    names = ("activation_batch", LENGTH, "activation_heads", None)
    q_spec = logical_to_spec(names, rules, q.shape, mesh)
    batch_axes, heads_axes = q_spec[0], q_spec[2]
    group = q.shape[2] // k.shape[2]
    if heads_axes is not None and k.shape[2] % _size(mesh, heads_axes):
        # Fewer key/value heads than devices along the heads' axes: each query head its own copy.
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    seq = axes[0] if len(axes) == 1 else axes
    spec = PartitionSpec(batch_axes, seq, heads_axes, None)
    row_spec = PartitionSpec(batch_axes, seq)

    def local(q, k, v, segments, window):
        index = jax.lax.axis_index(axes)

        def gathered(x):  # The whole row, in row order.
            return unbalance(jax.lax.all_gather(x, axes, axis=1, tiled=True), n)

        k, v, k_segments = gathered(k), gathered(v), gathered(segments)
        chunk = jnp.arange(c)
        q_index = jnp.concatenate([index * c + chunk, (2 * n - 1 - index) * c + chunk])
        k_index = jnp.arange(length)
        allowed = attention.row_mask(q_index, k_index, segments, k_segments, window)
        if implementation == "jax":
            out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale)
            return out.astype(q.dtype)
        bias = jnp.where(allowed, 0.0, attention.MASKED).astype(jnp.float32)
        blocks = ((0, c, length // 2), (c, 2 * c, length))
        return attention.biased_attention(q, k, v, bias, blocks, scale, softcap)

    window = jnp.asarray(sliding_window, jnp.int32)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, spec, row_spec, PartitionSpec()),
        out_specs=spec,
    )
    return sharded(q, k, v, segment_ids, window)
