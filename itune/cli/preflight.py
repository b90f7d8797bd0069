"""``itune-preflight``: compile a config's train step for a TPU slice ahead of time, on any host.

  itune-preflight --config=configs/llama3_8b_sft.py                   # its preflight.topology
  itune-preflight --config=configs/smoke.py --topology=v5e-4
  itune-preflight --config=configs/llama3_70b_sft.py --topology=v5p-256 --num_slices=2

Builds the same train step that training compiles (`itune.training.program`: same model,
optimizer, shardings, rematerialisation and microbatching) on a mesh of the slice's devices,
which libtpu describes without a TPU (the ``tpu`` extra), compiles it, and prints the memory each
device needs against the chip's HBM, the FLOPs of a step, and the step time those imply at 40%
and 60% MFU. A config that does not fit exits with status 1, XLA's figures and what to change.
Needs no data files: the batch is abstract, and the model is the one the config trains as
`itune.convert.run_model.resolve` finds it without a workdir (the report says where its
architecture and vocabulary size come from).
"""

from __future__ import annotations

import math
import os
import sys

from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags
from ml_collections import config_flags

_FLAGS: dict = {}
# The MFU levels at which the report gives the step time.
MFU_LEVELS = (0.4, 0.6)


def _set_up_environment() -> None:
    """Before jax is imported: compile on this host's CPU and never take a TPU it may be training
    on, and let libtpu, loaded only for its topology API, share the host with other processes
    that loaded it (it refuses otherwise)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _describe_host_to_libtpu(slice_name: str) -> None:
    """Before libtpu loads: describe the TPU host that libtpu would otherwise look for (and warn
    that it found none). The compiled program does not depend on these."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def hints(config, topology) -> list[str]:
    """What would make the step fit, most effective first, as flags to add."""
    from itune import sharding

    out = []
    mesh = config.mesh
    if mesh.data != 1 or mesh.strategy in ("dp", "tp"):
        out.append(
            "parameters and optimizer state over every chip: --config.mesh.data=1 "
            "--config.mesh.fsdp=-1 --config.mesh.strategy=fsdp_tp"
        )
    remat = config.model.get("remat") or "none"
    if remat == "none":
        out.append("rematerialise each layer: --config.model.remat=save_dots (or full)")
    elif remat == "save_dots":
        out.append("keep the saved activations in host memory: --config.model.remat=offload_dots")
    if remat in ("save_dots", "offload_dots"):
        out.append("keep only each layer's input for the backward pass: --config.model.remat=full")
    # Each microbatch must still give every batch shard whole rows.
    shape = sharding.mesh_shape(mesh, topology.num_chips)
    spec = sharding.logical_to_spec(
        ("batch",), sharding.rules_from_config(mesh), mesh=sharding.abstract_mesh(shape)
    )
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    shards = math.prod(shape[sharding.MESH_AXES.index(a)] for a in axes)
    k = 2 * config.train.microbatches
    if config.data.global_batch_size % (k * shards) == 0:
        out.append(
            f"smaller microbatches: --config.train.microbatches={k} (the same update from half "
            "the activations)"
        )
    else:
        out.append("shorter rows: --config.data.seq_len (each chip already has one row at a time)")
    out.append(f"a larger slice than {topology.name}, or more slices (--num_slices)")
    return out


def _hint_lines(config, topology) -> list[str]:
    return ["", "To make it fit, try:"] + [f"  - {h}" for h in hints(config, topology)]


def _inputs_rows(inputs) -> list[str]:
    return [
        f"| parameters | {_bytes(inputs.parameters)} |",
        f"| optimizer state | {_bytes(inputs.optimizer_state)} |",
        f"| batch | {_bytes(inputs.batch)} |",
    ]


def _setup_lines(config, run, mesh_shape) -> list[str]:
    """The model (a `run_model.RunModel`), mesh and batch."""
    tokens = config.data.global_batch_size * config.data.seq_len
    strategy = "custom rules" if config.mesh.get("rules") else f"strategy {config.mesh.strategy}"
    mesh_text = ", ".join(f"{a} {n}" for a, n in mesh_shape.items() if a != "context" or n > 1)
    model_config = run.config
    return [
        f"model: {run.architecture}, "
        f"{model_config.num_params() / 1e6:,.1f}M parameters ({model_config.param_dtype}), "
        f"compute {model_config.dtype}, remat {model_config.remat}, attention "
        f"{model_config.attention}; optimizer {config.optim.name}",
        f"vocabulary {model_config.vocab_size:,}: {run.vocabulary}",
        f"mesh ({mesh_text}), {strategy}; batch {config.data.global_batch_size} x "
        f"{config.data.seq_len} = {tokens:,} tokens in {config.train.microbatches} microbatch(es)",
    ]


def report(config, config_name: str, topology, compiled, run) -> str:
    """The printed preflight of ``run`` (`run_model.RunModel`) compiled: set-up, memory per
    device, FLOPs and implied step times."""
    from itune.training import aot

    model_config, flops = compiled.model_config, compiled.flops
    memory = aot.Memory.of(compiled.compiled)
    hbm = topology.chip.hbm_bytes
    tokens = config.data.global_batch_size * config.data.seq_len
    lines = [f"Preflight of {config_name} on {topology.describe()}"]
    lines += _setup_lines(config, run, compiled.mesh.shape)
    lines += [
        f"compiled in {compiled.seconds:.1f} s",
        "",
        "| memory per device | |",
        "|---|---|",
        *_inputs_rows(compiled.inputs),
        f"| arguments: the above in the chip's tiled layout | {_bytes(memory.arguments)} |",
        f"| outputs (new train state, metrics) | {_bytes(memory.outputs)} |",
        f"| outputs written over donated arguments | -{_bytes(memory.aliased)} |",
        f"| temporaries (activations, gradients) | {_bytes(memory.temporaries)} |",
        f"| program | {_bytes(memory.code)} |",
        f"| **total** | **{_bytes(memory.total)} of {_bytes(hbm)} HBM "
        f"({memory.total / hbm:.0%})** |",
        *(
            [f"| host memory beside it (offloaded activations) | {_bytes(memory.host)} |"]
            if memory.host
            else []
        ),
        "",
        "| FLOPs per step (all devices) | |",
        "|---|---|",
        f"| model: 6 x matmul weights per token + causal attention | {flops.model:.3e} |",
        f"| program: every matmul of the step, {model_config.num_layers} layers x "
        f"{config.train.microbatches} microbatch(es), recomputation included | "
        f"{flops.program:.3e} |",
        f"| XLA cost analysis as compiled (each loop body once) | {flops.xla:.3e} |",
        "",
        "| MFU | step time | tokens/s | tokens/s per chip | hardware FLOPs utilisation |",
        "|---|---|---|---|---|",
    ]
    peak = topology.num_chips * topology.chip.peak_flops
    for mfu in MFU_LEVELS:
        seconds = flops.model / (mfu * peak)
        lines.append(
            f"| {mfu:.0%} | {_seconds(seconds)} | {tokens / seconds:,.0f} | "
            f"{tokens / seconds / topology.num_chips:,.0f} | {mfu * flops.program / flops.model:.0%} |"
        )
    lines.append(
        f"(MFU as training reports it: model FLOPs / (step time x {topology.num_chips} chips x "
        f"{topology.chip.peak_flops / 1e12:.0f} TFLOP/s bfloat16 peak); the chips then run the "
        "program's FLOPs at the last column's share of peak)"
    )
    if memory.total > hbm:
        lines.append(f"DOES NOT FIT: {_bytes(memory.total)} per device, over {_bytes(hbm)}")
        lines += _hint_lines(config, topology)
    return "\n".join(lines)


def does_not_fit(config, config_name: str, topology, error, run) -> str:
    """The printed preflight of ``run``'s step, which XLA could not fit in device memory."""
    from itune import sharding

    shape = sharding.mesh_shape(config.mesh, topology.num_chips)
    lines = [f"Preflight of {config_name} on {topology.describe()}: DOES NOT FIT"]
    lines += _setup_lines(config, run, dict(zip(sharding.MESH_AXES, shape)))
    lines += ["", "| memory per device | |", "|---|---|", *_inputs_rows(error.inputs)]
    if error.needed:
        lines += [
            f"| {error.what or 'needed'}, as XLA counts them | {error.needed} |",
            f"| **available to them, as XLA counts it** | **{error.available} "
            f"(the chip: {_bytes(topology.chip.hbm_bytes)} HBM)** |",
        ]
    lines += ["", f"XLA: {error}"]
    lines += _hint_lines(config, topology)
    return "\n".join(lines)


def lower(config, slice_name: str, num_slices: int):
    """The preflight up to XLA's compilation: ``(topology, run, lowered)``, the slice, the
    model the config trains (`itune.convert.run_model.RunModel`) and its train step lowered for
    the slice's devices (`itune.training.aot.Lowered`)."""
    from itune import topology as topology_lib
    from itune.convert import run_model
    from itune.training import aot

    topology = topology_lib.parse_slice(slice_name, num_slices)
    _check_batch(config, topology)
    devices = topology_lib.topology_devices(topology)
    run = run_model.resolve(config)
    return topology, run, aot.lower_for_devices(config, devices, run.config)


def preflight(config, config_name: str, slice_name: str, num_slices: int) -> tuple[bool, str]:
    """(fits, the printed report) of ``config``'s train step on ``num_slices`` x ``slice_name``."""
    from itune.training import aot

    topology, run, lowered = lower(config, slice_name, num_slices)
    try:
        compiled = aot.compile_lowered(lowered)
    except aot.DoesNotFit as e:
        return False, does_not_fit(config, config_name, topology, e, run)
    fits = aot.Memory.of(compiled.compiled).total <= topology.chip.hbm_bytes
    return fits, report(config, config_name, topology, compiled, run)


def _check_batch(config, topology) -> None:
    """The input pipeline's own condition: every host (process) feeds an equal share of rows."""
    hosts = topology.num_hosts * topology.num_slices
    if config.data.global_batch_size % hosts:
        raise ValueError(
            f"data.global_batch_size={config.data.global_batch_size} must divide by the "
            f"{hosts} hosts of {topology.describe()}"
        )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = _FLAGS["config"].value
    slice_name = _FLAGS["topology"].value or config.preflight.topology
    if not slice_name:
        raise app.UsageError("No --topology, and the config names none (preflight.topology)")
    num_slices = _FLAGS["num_slices"].value or config.preflight.num_slices
    _describe_host_to_libtpu(slice_name)
    config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        fits, text = preflight(config, config_name, slice_name, num_slices)
    except (ImportError, ValueError) as e:  # No libtpu, a bad slice name or batch.
        raise UserError(str(e)) from e
    print(text)
    sys.exit(0 if fits else 1)


def run():
    """Console entry point."""
    _set_up_environment()
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "The config file, with its arguments after a colon.", lock_config=True
    )
    _FLAGS["topology"] = flags.DEFINE_string(
        "topology", None, "TPU slice (v5p-64, v5e-16, v4-8...); default: the config's."
    )
    _FLAGS["num_slices"] = flags.DEFINE_integer(
        "num_slices", None, "Slices joined over the data-center network; default: the config's."
    )
    cli.run(main, required=["config"])


if __name__ == "__main__":
    run()
