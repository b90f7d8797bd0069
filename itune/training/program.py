"""The compiled train step, built in one place for training and for ahead-of-time checks.

`itune.training.trainer` runs the function `jit_train_step` returns; `itune.preflight` lowers
the very same function against abstract inputs (`abstract_state`, `abstract_batch`) on a mesh of
TPU devices that are not there, and compiles it, so that what it reports is what training runs.
The benchmarks and the tests build their steps with `jit_step`, the builder under it.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from itune import sharding
from itune.data import packing
from itune.model.decoder import ModelConfig
from itune.training import state as state_lib, step


def jit_train_step(
    config: Any,
    layout: state_lib.StateLayout,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    model_config: ModelConfig,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    source_names: Sequence[str],
):
    """`jit_step` with the options ``config`` gives the step: the mixture's ``source_names``,
    ``train.microbatches``, ``train.loss_normalization``, and LoRA dropout drawn from
    ``config.seed``."""
    return jit_step(
        layout,
        tx,
        schedule,
        mesh,
        rules,
        source_names=tuple(source_names),
        microbatches=config.train.microbatches,
        loss_normalization=config.train.loss_normalization,
        dropout_seed=config.seed if model_config.lora_dropout else None,
    )


def jit_step(
    layout: state_lib.StateLayout,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    compiler_options: dict[str, Any] | None = None,
    **step_options: Any,
):
    """`step.train_step` with ``step_options`` (its keyword arguments) under `jax.jit`, with
    the state's shardings in and out, the batch split along its rows, replicated metrics, and
    the old state donated; ``compiler_options`` are XLA's (`jax.jit`'s). Call (and lower) it
    under ``jax.set_mesh(mesh)``: the model's activation constraints read the ambient mesh."""
    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(
            step.train_step, graphdef=layout.graphdef, tx=tx, schedule=schedule, **step_options
        ),
        in_shardings=(layout.shardings, batch_sharding),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def abstract_batch(
    data_config: Any, mesh: Mesh, rules: sharding.LogicalRules
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and shardings of a global training batch (`feed.global_batch`):
    ``data.global_batch_size`` rows of ``data.seq_len`` int32 tokens per row field."""
    shape = (data_config.global_batch_size, data_config.seq_len)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    return {
        name: jax.ShapeDtypeStruct(shape, "int32", sharding=batch_sharding)
        for name in packing.ROW_FIELDS
    }


def source_names(data_config: Any) -> tuple[str, ...]:
    """The mixture's source names as the input pipeline orders them, read from the config alone
    (no file is opened): the built-in mixture when no source is configured."""
    from itune.data import mixture

    if not data_config.sources:
        return (mixture.BUILTIN,)
    return tuple(name for name, _ in data_config.sources.items())  # As `mixture.load_sources`.
