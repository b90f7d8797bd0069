"""Creating the train state directly in its shards.

The model is first built abstractly (`nnx.eval_shape`: no memory), its logical axis names give
the shardings, and then parameters and optimizer state are initialised inside `jax.jit` with those
``out_shardings``, so no device ever holds more than its own shards.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from itune import sharding
from itune.model.decoder import Decoder, ModelConfig


@struct.dataclass
class TrainState:
    """What a train step carries from one step to the next, and a checkpoint holds."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The model's graph, the abstract train state and its shardings."""

    graphdef: nnx.GraphDef
    abstract: TrainState
    shardings: TrainState


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _divides(spec: tuple, shape: tuple[int, ...], mesh: Mesh) -> bool:
    for axes, size in zip(spec, shape):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if size % math.prod(mesh.shape[a] for a in axes):
            return False
    return True


def derived_sharding(
    shape: tuple[int, ...], param_shape: tuple[int, ...], param_sharding: NamedSharding
) -> NamedSharding:
    """The sharding of an optimizer-state array ``shape`` kept for a parameter of ``param_shape``.

    The parameter's own sharding when the shapes match. Otherwise the array is taken to be the
    parameter reduced over some dimensions (Adafactor's factored row and column moments), either
    dropped (``(L, d, h, k) -> (L, h, k)``) or kept with size 1: those dimensions leave the
    parameter's spec and the others keep their mesh axes. Anything else is replicated.
    """
    mesh = param_sharding.mesh
    spec = tuple(param_sharding.spec) + (None,) * (len(param_shape) - len(param_sharding.spec))
    shape, param_shape = tuple(shape), tuple(param_shape)
    if shape == param_shape:
        return param_sharding
    candidates = []
    if len(shape) == len(param_shape) and all(s in (1, p) for s, p in zip(shape, param_shape)):
        candidates.append(tuple(a if s == p else None for a, s, p in zip(spec, shape, param_shape)))
    elif len(shape) < len(param_shape):
        for dropped in itertools.combinations(
            range(len(param_shape)), len(param_shape) - len(shape)
        ):
            kept = [i for i in range(len(param_shape)) if i not in dropped]
            if tuple(param_shape[i] for i in kept) == shape:
                candidates.append(tuple(spec[i] for i in kept))
    for candidate in candidates:
        if _divides(candidate, shape, mesh):
            return NamedSharding(mesh, PartitionSpec(*candidate))
    return _replicated(mesh)


def optimizer_state_shardings(
    tx: optax.GradientTransformation,
    abstract_opt: optax.OptState,
    abstract_params: nnx.State,
    param_shardings: nnx.State,
    mesh: Mesh,
) -> optax.OptState:
    """A sharding for every leaf of the optimizer state (``jax.eval_shape(tx.init, ...)``):
    arrays kept per parameter follow the parameter's (`derived_sharding`), counters and other
    scalars are replicated."""

    def value(x):
        return x.get_value() if isinstance(x, nnx.Variable) else x

    def per_param(leaf, param, param_sharding):
        if isinstance(leaf, optax.MaskedNode):  # No state for a frozen parameter (LoRA).
            return leaf
        sharding = derived_sharding(value(leaf).shape, value(param).shape, value(param_sharding))
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return optax.tree_map_params(
        tx,
        per_param,
        abstract_opt,
        abstract_params,
        param_shardings,
        transform_non_params=lambda _: _replicated(mesh),
        is_leaf=lambda x: isinstance(x, (nnx.Variable, optax.MaskedNode)),
    )


def state_layout(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    seed: int = 0,
) -> StateLayout:
    abstract_model = nnx.eval_shape(lambda: Decoder(model_config, rules, rngs=nnx.Rngs(seed)))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optimizer_state_shardings(
        tx, abstract_opt, abstract_params, param_shardings, mesh
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt
    )
    shardings = TrainState(step=_replicated(mesh), params=param_shardings, opt_state=opt_shardings)
    return StateLayout(graphdef, abstract, shardings)


def init_train_state(
    layout: StateLayout,
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    seed: int = 0,
) -> TrainState:
    def init() -> TrainState:
        params = nnx.state(Decoder(model_config, rules, rngs=nnx.Rngs(seed)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=layout.shardings)()


def abstract_with_shardings(layout: StateLayout) -> TrainState:
    """`ShapeDtypeStruct`s carrying the target shardings: restore targets for a checkpoint."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        layout.abstract,
        layout.shardings,
    )
