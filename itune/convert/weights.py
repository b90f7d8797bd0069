"""Placing weights read from another format straight into their shards.

Converters describe a checkpoint as a function ``read(path, index)`` that returns the part
``index`` (a tuple of slices) of itune's parameter ``path`` (``"blocks/attn/q"``, stacked over
layers like the model's own state). `place_params` calls it once per device shard through
`jax.make_array_from_callback`, so no host ever holds more than the shards it places, and a
reader that slices its source lazily never holds a whole tensor either.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from itune import sharding
from itune.model.decoder import Decoder, ModelConfig

Reader = Callable[[str, tuple[slice, ...]], np.ndarray]


def abstract_params(
    cfg: ModelConfig, rules: sharding.LogicalRules = ()
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters' shapes and dtypes (no memory)."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rules, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{"blocks/attn/q": (layers, d_model, heads, head_dim), ...}``: what a reader must give."""
    _, state = abstract_params(cfg)
    return {_name(path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _name(path) -> str:
    return "/".join(map(str, path))


def place_params(
    cfg: ModelConfig,
    read: Reader,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and parameters, each parameter built shard by shard from ``read`` and
    cast to ``cfg.param_dtype``. Without a mesh, everything goes to the first device."""
    if mesh is None:
        mesh = Mesh(
            np.array(jax.devices()[:1]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES
        )
    graphdef, abstract = abstract_params(cfg, rules)
    shardings = sharding.state_shardings(abstract, mesh, rules)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    placed = []
    for path, variable in nnx.to_flat_state(abstract):
        name, shape = _name(path), tuple(variable.shape)
        dtype = np.dtype(jnp.dtype(cfg.param_dtype))
        target = flat_shardings[path].get_value()

        def callback(index, name=name, shape=shape, dtype=dtype):
            part = np.asarray(read(name, _full(index, shape)))
            expected = tuple(len(range(*s.indices(n))) for s, n in zip(_full(index, shape), shape))
            if part.shape != expected:
                raise ValueError(f"{name}: the reader gave shape {part.shape} for {expected}")
            return part.astype(dtype)

        value = jax.make_array_from_callback(shape, target, callback)
        placed.append((path, variable.replace(value)))
    return graphdef, nnx.from_flat_state(placed)


def _full(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``index`` as one slice per dimension (jax may give fewer, or an empty tuple)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def host_params(params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
    """``(path, numpy array)`` per parameter, gathered to the host one at a time (for export)."""
    for path, variable in nnx.to_flat_state(params):
        value = variable.get_value()
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            value = jax.experimental.multihost_utils.process_allgather(value, tiled=True)
        yield _name(path), np.asarray(jax.device_get(value))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
