"""Sampling from the decoder: jitted prefill, then decoding over a key/value cache.

Prompts of different lengths are right-padded into one ``[batch, prompt_len]`` block. The
prefill writes every prompt position into a cache of static size ``cache_len``; each decode step
then feeds one token per row at that row's own next position. A cache slot holds the position of
the same number, so the causal mask by position alone keeps padding and stale slots out (a row's
decoded tokens overwrite its padding as they go).

The whole decode loop is one `jax.lax.while_loop` under `jax.jit`, stopping once every row has
produced a stop token or ``max_new_tokens``. Sampling is greedy (``temperature`` 0) or from the
temperature-scaled distribution cut to its ``top_k`` tokens and its ``top_p`` nucleus. Each prompt
draws from its own key, derived from the seed and the prompt's index in the request, so what a
prompt gets does not depend on the other prompts in its batch.

On a mesh, parameters stay where training put them and the batch is split over the batch axes;
the model's logical-axis constraints shard the activations and the cache the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from itune import sharding
from itune.model.decoder import LayerCache

# Prompt and cache lengths are rounded up to multiples of this, so that similar requests share
# one compilation.
LENGTH_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token, and when to stop."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (argmax).
    top_k: int = 0  # Keep only the k most likely tokens; 0: all.
    top_p: float = 1.0  # Keep the smallest set of tokens whose probability reaches p; 1: all.
    stop_ids: tuple[int, ...] = ()  # Any of these ends a row (it is not part of the output).
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; expected at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; expected >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; expected 0 < top_p <= 1")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed}; expected 0 <= seed < 2**32")


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """``logits [..., vocab]`` with every token outside the top-k and the top-p nucleus at -inf.

    The nucleus is the smallest prefix of the tokens sorted by probability whose total reaches
    ``top_p``; the most likely token is always kept.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # Probability of the more likely tokens.
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def pick_tokens(logits: jax.Array, keys: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row of ``logits [batch, vocab]``, row ``i`` drawing with ``keys[i]``."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampling", "cache_len", "pad_id", "return_logits")
)
def _generate(
    params,
    tokens,
    lengths,
    prompt_indices,
    seed,
    *,
    graphdef,
    sampling,
    cache_len,
    pad_id,
    return_logits,
):
    model = nnx.merge(graphdef, params)
    batch, prompt_len = tokens.shape
    steps = sampling.max_new_tokens
    stop_ids = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)
    base_key = jax.random.key(seed)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(prompt_indices)
    rows = jnp.arange(batch)

    def choose(logits, i, done):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
        token = jnp.where(done, pad_id, pick_tokens(logits, keys, sampling))
        return token, done | jnp.isin(token, stop_ids)

    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    cache = model.init_cache(batch, cache_len)
    hidden, cache = model.cached_hidden_states(tokens, positions, cache, jnp.zeros_like(lengths))
    logits = model.logits(hidden[rows, lengths - 1][:, None])[:, 0]
    token, done = choose(logits, 0, jnp.zeros((batch,), jnp.bool_))
    out = jnp.full((batch, steps), pad_id, jnp.int32).at[:, 0].set(token)
    seen = jnp.zeros((batch, steps, logits.shape[-1]) if return_logits else (0,), jnp.float32)
    if return_logits:
        seen = seen.at[:, 0].set(logits)

    # The decode loop runs over per-layer weights and caches, sliced once here.
    layers = model.unstacked_layers()
    cache = tuple(LayerCache(cache.k[i], cache.v[i]) for i in range(len(layers[1])))

    def keep_going(carry):
        i, _, done, _, _ = carry
        return (i < steps) & ~jnp.all(done)

    def step(carry):
        i, out, done, cache, seen = carry
        position = (lengths + i - 1)[:, None]
        hidden, cache = model.cached_hidden_states(
            out[:, i - 1][:, None], position, cache, lengths + i - 1, layers
        )
        logits = model.logits(hidden)[:, 0]
        token, done = choose(logits, i, done)
        if return_logits:
            seen = seen.at[:, i].set(logits)
        return i + 1, out.at[:, i].set(token), done, cache, seen

    _, out, _, _, seen = jax.lax.while_loop(
        keep_going, step, (jnp.int32(1), out, done, cache, seen)
    )
    return out, seen


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    pad_id: int,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = (),
    return_logits: bool = False,
):
    """The generated ids of each prompt, up to and without its stop token.

    ``prompts`` are token ids (each non-empty), answered ``batch_size`` at a time. With a
    ``mesh``, the batch is split over its batch axes (``batch_size`` is rounded up to a multiple
    of their size). ``return_logits``: also the float32 logits of every generated position,
    ``[n, max_new_tokens, vocab]`` (for tests; zeros after a row stopped).
    """
    if not prompts:
        return ([], []) if return_logits else []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    batch_size = min(batch_size, len(prompts))
    batch_sharding = None
    if mesh is not None:
        batch_sharding = sharding.batch_sharding(mesh, rules)
        shards = math.prod(mesh.shape[a] for a in _batch_axes(batch_sharding))
        batch_size = _round_up(batch_size, shards)
    prompt_len = _round_up(max(map(len, prompts)), LENGTH_BUCKET)
    cache_len = _round_up(prompt_len + sampling.max_new_tokens, LENGTH_BUCKET)
    # The seed is an argument of the compiled program, not part of it: a new seed reuses it.
    unseeded = dataclasses.replace(sampling, seed=0)
    outputs, all_logits = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        n = len(chunk)
        chunk += [chunk[0]] * (batch_size - n)  # Filler rows keep one compiled shape.
        tokens = np.full((batch_size, prompt_len), pad_id, np.int32)
        for i, prompt in enumerate(chunk):
            tokens[i, : len(prompt)] = prompt
        lengths = np.array([len(p) for p in chunk], np.int32)
        indices = np.arange(start, start + batch_size, dtype=np.int32)
        args = (tokens, lengths, indices)
        if batch_sharding is not None:
            args = tuple(jax.device_put(a, _leading(batch_sharding, a.ndim)) for a in args)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            out, seen = _generate(
                params,
                *args,
                np.uint32(sampling.seed),
                graphdef=graphdef,
                sampling=unseeded,
                cache_len=cache_len,
                pad_id=pad_id,
                return_logits=return_logits,
            )
        out = _to_host(out)
        for i in range(n):
            ids = out[i].tolist()
            stops = [k for k, t in enumerate(ids) if t in sampling.stop_ids]
            outputs.append(ids[: stops[0]] if stops else ids)
        if return_logits:
            all_logits.append(_to_host(seen)[:n])
    if return_logits:
        return outputs, np.concatenate(all_logits)
    return outputs


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host, also when its rows are spread over several processes."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _batch_axes(batch_sharding) -> tuple[str, ...]:
    first = batch_sharding.spec[0] if batch_sharding.spec else None
    if first is None:
        return ()
    return (first,) if isinstance(first, str) else tuple(first)


def _leading(batch_sharding, ndim: int):
    """The batch sharding for an array of ``ndim`` dimensions (split along the first)."""
    spec = jax.sharding.PartitionSpec(batch_sharding.spec[0], *([None] * (ndim - 1)))
    return jax.sharding.NamedSharding(batch_sharding.mesh, spec)
