"""Ahead-of-time compilation of the train step for a TPU slice, from any host.

`compile_for_devices` builds the train state's layout and the jitted step exactly as
`itune.training.trainer` does (`itune.training.program`), lowers it against abstract inputs on a
mesh of the target's devices (from libtpu's topology API: no TPU needed; `lower_for_devices`,
seconds) and compiles it (`compile_lowered`, XLA's part: minutes for a large model). The
compiled program tells how much memory each device needs (`Memory`); the traced one how many
FLOPs a step takes (`StepFlops`).

XLA's cost analysis counts the body of a loop once, whatever its trip count: a step whose layers
run under `lax.scan` reports the FLOPs of one layer, gradient accumulation's scan those of one
microbatch, and on TPU a matmul with FSDP-gathered weights, which XLA turns into a loop over the
weight's shards, a fraction of its FLOPs. The FLOPs are therefore counted on the traced program
(`flops.program_flops`: each scan body times its length), and XLA's figure is kept beside them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Sequence

import jax

from itune import sharding
from itune.convert import run_model
from itune.model.decoder import ModelConfig
from itune.training import flops, optimizer, program, state as state_lib

# The figures of XLA's out-of-memory messages, needed and available: "the total memory required
# for HLO temporaries (102.26G) exceeds available HBM (95.74G)", or "Used 97.5G of 95.74G hbm".
_OOM_FIGURES = (
    re.compile(
        r"required for ([\w ]+) \(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)"
    ),
    re.compile(r"Used ()([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", re.IGNORECASE),
)


def per_device_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of `jax.ShapeDtypeStruct`s that carry shardings
    (the largest shard, where shards differ)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Bytes per device of the step's inputs, by kind."""

    parameters: int
    optimizer_state: int
    batch: int


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device of a compiled program (`jax.stages.Compiled.memory_analysis`)."""

    arguments: int  # The inputs: train state and batch.
    outputs: int  # The new train state and the metrics.
    aliased: int  # Outputs written over donated inputs (the old train state).
    temporaries: int  # Activations, gradients and everything else the step allocates.
    code: int  # The compiled program itself.
    # Host memory the step uses beside each device: activations offloaded there
    # (``model.remat='offload_dots'``), not counted in `total`.
    host: int = 0

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        live = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        temporaries = m.temp_size_in_bytes
        # XLA:TPU reports the peak of its buffer assignment, arguments and outputs included,
        # and no temporary size; the CPU backend the other way round.
        peak = getattr(m, "peak_memory_in_bytes", 0)
        if not temporaries and peak > live:
            temporaries = peak - live
        return cls(
            arguments=m.argument_size_in_bytes,
            outputs=m.output_size_in_bytes,
            aliased=m.alias_size_in_bytes,
            temporaries=temporaries,
            code=m.generated_code_size_in_bytes,
            host=getattr(m, "host_temp_size_in_bytes", 0)
            + getattr(m, "host_argument_size_in_bytes", 0)
            + getattr(m, "host_output_size_in_bytes", 0)
            - getattr(m, "host_alias_size_in_bytes", 0),
        )


class DoesNotFit(Exception):
    """The step needs more memory per device than the target has: ``inputs`` (`Inputs`), and
    XLA's figures as it printed them (``needed`` for ``what``, of ``available``), when given."""

    def __init__(self, message: str, inputs: Inputs, what="", needed="", available=""):
        super().__init__(message)
        self.inputs, self.what, self.needed, self.available = inputs, what, needed, available


@dataclasses.dataclass(frozen=True)
class Lowered:
    """A train step lowered for a set of devices (no XLA compilation yet: seconds, not
    minutes), with what it was built from."""

    lowered: Any  # jax.stages.Lowered
    traced: Any  # jax.stages.Traced, whose program the FLOPs are counted on.
    model_config: ModelConfig
    mesh: jax.sharding.Mesh
    inputs: Inputs
    model_flops: float  # Per step, as MFU counts them (`StepFlops.model`).
    start: float  # time.perf_counter() when lowering began.


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A train step compiled for a set of devices, with what it was built from."""

    compiled: Any  # jax.stages.Compiled
    model_config: ModelConfig
    mesh: jax.sharding.Mesh
    seconds: float  # Lowering and compilation time.
    flops: "StepFlops"
    inputs: Inputs


def lower_for_devices(
    config: Any, devices: Sequence[Any], model_config: ModelConfig | None = None
) -> Lowered:
    """The train step of ``config`` lowered for ``devices`` (those of a TPU topology, or any
    others), for ``model_config`` or else the model ``config`` trains
    (`itune.convert.run_model.resolve`, without a workdir)."""
    start = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.mesh)
    # As in `trainer.train_and_evaluate`, from here to the compiled step.
    model_config = model_config or run_model.resolve(config).config
    num_steps = config.train.num_steps
    tx = optimizer.make_model_optimizer(config.optim, num_steps, model_config)
    schedule = optimizer.learning_rate_schedule(config.optim, num_steps)
    layout = state_lib.state_layout(model_config, tx, mesh, rules, config.seed)
    train_step = program.jit_train_step(
        config, layout, tx, schedule, model_config, mesh, rules, program.source_names(config.data)
    )
    state = state_lib.abstract_with_shardings(layout)
    batch = program.abstract_batch(config.data, mesh, rules)
    inputs = Inputs(
        per_device_bytes(state.params), per_device_bytes(state.opt_state), per_device_bytes(batch)
    )
    with jax.set_mesh(mesh):
        traced = train_step.trace(state, batch)
        lowered = traced.lower()
    tokens = config.data.global_batch_size * config.data.seq_len
    model_flops = model_config.flops_per_token(config.data.seq_len) * tokens
    return Lowered(lowered, traced, model_config, mesh, inputs, model_flops, start)


def compile_lowered(lowered: Lowered) -> Compiled:
    """XLA's compilation of a lowered step; `DoesNotFit` when it runs out of device memory."""
    try:
        compiled = lowered.lowered.compile()
    except Exception as e:  # XlaRuntimeError, whose module path varies between jax releases.
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        figures = next(filter(None, (p.search(message) for p in _OOM_FIGURES)), None)
        what, needed, available = figures.groups() if figures else ("", "", "")
        raise DoesNotFit(_first_lines(message), lowered.inputs, what, needed, available) from None
    step_flops = StepFlops(
        xla=reported_flops(compiled) * lowered.mesh.devices.size,
        program=flops.program_flops(lowered.traced.jaxpr),
        model=lowered.model_flops,
    )
    seconds = time.perf_counter() - lowered.start
    return Compiled(
        compiled, lowered.model_config, lowered.mesh, seconds, step_flops, lowered.inputs
    )


def compile_for_devices(
    config: Any, devices: Sequence[Any], model_config: ModelConfig | None = None
) -> Compiled:
    """`lower_for_devices`, then `compile_lowered`: raises `DoesNotFit` when XLA runs out of
    device memory while compiling."""
    return compile_lowered(lower_for_devices(config, devices, model_config))


def _first_lines(message: str, n: int = 3) -> str:
    return "\n".join(message.strip().splitlines()[:n])


def reported_flops(compiled) -> float:
    """FLOPs per device of a compiled program, as XLA's cost analysis counts them."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # One entry per program in older jax releases.
        cost = cost[0]
    return float(cost.get("flops", 0.0))


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one train step over all devices."""

    xla: float  # XLA's cost analysis of the compiled program (loop bodies once).
    program: float  # Every matmul of the traced step, loops by their length, remat included.
    model: float  # 6 per matmul weight per token plus causal attention, as MFU counts them.
