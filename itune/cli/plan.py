"""``itune-plan``: how a config's parameters and optimizer state lie on a mesh, without devices.

  itune-plan --config=configs/smoke.py --config.model.preset=llama3-8b \\
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

Prints each parameter's shape, logical axes, mesh axes and bytes per device, then the totals per
device for the parameters and the state of the config's optimizer (``config.optim.name``, with
LoRA only the adapters'), sharded as training shards it. The mesh is abstract: ``--devices``
(default: this host's count) only resolves a ``-1`` axis. The model is the one the config trains
(`itune.convert.run_model.resolve`, without a workdir); the second line says where its
architecture and vocabulary size come from.
"""

from __future__ import annotations

from itune.cli import common as cli

cli.quiet_tensorflow()

from absl import app, flags
from ml_collections import config_flags

# Defined when the command runs, so that importing `format_plan` defines no flags.
_FLAGS: dict = {}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _spec(spec) -> str:
    parts = []
    for axes in spec:
        if axes is None:
            parts.append("-")
        else:
            parts.append("+".join((axes,) if isinstance(axes, str) else axes))
    return "(" + ", ".join(parts) + ")"


def format_plan(config, num_devices: int) -> str:
    """The plan of ``config`` on ``num_devices`` devices, as a markdown table and totals."""
    from itune import sharding
    from itune.convert import run_model, weights
    from itune.training import optimizer

    run = run_model.resolve(config)
    model_config = run.config
    rules = sharding.rules_from_config(config.mesh)
    shape = sharding.mesh_shape(config.mesh, num_devices)
    mesh = sharding.abstract_mesh(shape)
    _, abstract = weights.abstract_params(model_config, rules)
    rows = sharding.plan(abstract, mesh, rules)
    mesh_text = sharding.describe(shape)
    strategy = "custom rules" if config.mesh.get("rules") else f"strategy {config.mesh.strategy}"
    lines = [
        f"Sharding plan: {model_config.num_params() / 1e6:,.1f}M parameters "
        f"({model_config.param_dtype}), mesh ({mesh_text}), {strategy}",
        f"model: {run.architecture}; vocabulary {model_config.vocab_size:,}: {run.vocabulary}",
        "",
        "| parameter | shape | logical axes | mesh axes | bytes per device |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        axes = "(" + ", ".join(a or "-" for a in row["axes"]) + ")"
        lines.append(
            f"| {row['path']} | {row['shape']} | {axes} | {_spec(row['spec'])} | "
            f"{_bytes(row['bytes_per_device'])} |"
        )
    params = sum(r["bytes_per_device"] for r in rows)
    tx = optimizer.make_model_optimizer(config.optim, config.train.num_steps, model_config)
    opt_state = _optimizer_state_bytes(model_config, tx, mesh, rules, config.seed)
    lines += [
        "",
        f"per device: parameters {_bytes(params)}, {config.optim.name} state "
        f"{_bytes(opt_state)}, total {_bytes(params + opt_state)} (activations not included)",
    ]
    return "\n".join(lines)


def _optimizer_state_bytes(model_config, tx, mesh, rules, seed: int) -> int:
    """Bytes per device of ``tx``'s state, sharded as `itune.training.state` shards it."""
    import math

    import jax

    from itune.training import state as state_lib

    layout = state_lib.state_layout(model_config, tx, mesh, rules, seed)
    arrays = jax.tree.leaves(layout.abstract.opt_state)
    shardings = jax.tree.leaves(layout.shardings.opt_state)
    return sum(
        math.prod(sharding.shard_shape(array.shape)) * array.dtype.itemsize
        for array, sharding in zip(arrays, shardings, strict=True)
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    import jax

    print(format_plan(_FLAGS["config"].value, _FLAGS["devices"].value or jax.device_count()))


def run():
    """Console entry point."""
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "The config file, with its arguments after a colon.", lock_config=True
    )
    _FLAGS["devices"] = flags.DEFINE_integer(
        "devices", None, "Devices of the mesh; default: this host's count."
    )
    cli.run(main, required=["config"])


if __name__ == "__main__":
    run()
