"""Creating the train state directly in its shards.

The model is first built abstractly (`nnx.eval_shape`: no memory), its logical axis names give
the shardings, and then parameters and optimizer state are initialised inside `jax.jit` with those
``out_shardings``, so no device ever holds more than its own shards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from itune import sharding
from itune.model.decoder import Decoder, ModelConfig
from itune.training.step import TrainState


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The model's graph, the abstract train state and its shardings."""

    graphdef: nnx.GraphDef
    abstract: TrainState
    shardings: TrainState


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


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
    # Optimizer moments are shaped like the parameters and take their shardings; counters and
    # other scalars are replicated.
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: _replicated(mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
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
