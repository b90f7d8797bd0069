"""The device mesh and the one place where logical axis names become mesh axes.

Layers name their dimensions (``'embed'``, ``'mlp'``, ``'heads'``, ``'activation_batch'``...);
``config.mesh.rules`` maps each name to a mesh axis, a tuple of mesh axes, or None (replicated).
Changing strategy (data parallel, FSDP, tensor parallel) is a change of rules, never of the model.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, Any], ...]

# Parameter axes and activation axes are named apart so each can be placed on its own.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``data, fsdp, tensor`` sized by ``config.mesh``.

    One axis size may be -1: it takes all devices left over by the others.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(mesh_config[name]) for name in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one of {MESH_AXES} may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, shape))}: {len(devices)} devices do "
                f"not divide by {known}"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} "
            f"devices, but {len(devices)} are available"
        )
    # Auto axes: Flax layers and sharding propagation expect them (Explicit is jax's new default).
    return Mesh(
        np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def rules_from_config(mesh_config: Any) -> LogicalRules:
    rules = mesh_config.get("rules") or DEFAULT_RULES
    return tuple(
        (str(name), tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules
    )


def logical_to_spec(
    names: Sequence[str | None],
    rules: LogicalRules,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical dimension names to a `PartitionSpec` through ``rules``.

    With ``shape`` and ``mesh``, a dimension that the assigned mesh axes do not divide evenly is
    replicated instead, and a mesh axis is used at most once per array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
                logging.debug(
                    "Replicating dimension %s (%d) of %s: not divisible by mesh axes %s",
                    name,
                    shape[i],
                    names,
                    axes,
                )
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules: LogicalRules) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, x.shape, mesh))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """`NamedSharding`s for an `nnx.State`, from each variable's logical ``out_sharding`` names."""

    def to_sharding(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        spec = logical_to_spec(names, rules, variable.shape, mesh)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(to_sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of ``[batch, length]`` input arrays: batch over the rules' ``'batch'`` axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", None), rules, None, mesh))


def describe(state: Any) -> list[tuple[str, tuple[int, ...], Any, str]]:
    """(path, shape, logical names, sharding spec) per array of a sharded state, for plans."""
    rows = []
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        spec = getattr(getattr(value, "sharding", None), "spec", None)
        rows.append(
            (
                "/".join(map(str, path)),
                tuple(value.shape),
                variable.get_metadata().get("out_sharding"),
                str(spec),
            )
        )
    return rows
