"""The device mesh and the one place where logical axis names become mesh axes.

Layers name their dimensions (``'embed'``, ``'mlp'``, ``'heads'``, ``'activation_batch'``...);
a rules table maps each name to a mesh axis, a tuple of mesh axes, or None (replicated).
Changing strategy (data parallel, FSDP, tensor parallel, context parallel) is a change of rules,
never of the model:
``config.mesh.strategy`` picks one of `STRATEGIES`, and ``config.mesh.rules``, when given,
replaces its table.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

# ``context`` last: a config or a shape that names only the first three axes gets context 1.
MESH_AXES = ("data", "fsdp", "tensor", "context")

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
    ("expert", None),
)


# Every device a data-parallel replica: parameters replicated, the batch split over all axes.
DATA_PARALLEL_RULES: LogicalRules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("activation_batch", ("data", "fsdp", "tensor")),
)
# Fully sharded data parallel: the batch over data and fsdp, parameters split along 'embed' over
# fsdp (gathered layer by layer in the forward and backward passes).
FSDP_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
)
# Tensor parallel (Megatron style): heads, MLP and vocabulary split over tensor; the batch over
# data only.
TENSOR_PARALLEL_RULES: LogicalRules = (
    ("batch", "data"),
    ("activation_batch", "data"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
)
# Expert parallel (mixtures of experts): each device along fsdp holds whole experts, a share of
# them (an expert array's 'expert' dimension takes fsdp before its 'embed' can); the other
# parameters as in fsdp_tp. XLA gathers a layer's experts where its tokens meet them.
EXPERT_PARALLEL_RULES: LogicalRules = (("expert", "fsdp"),) + tuple(
    rule for rule in DEFAULT_RULES if rule[0] != "expert"
)
# Context parallel: as fsdp_tp, and the sequence of every activation split over context
# (attention gathers the keys and values, `itune.model.context`); parameters split along 'embed'
# over fsdp and context together, so that the context devices do not each hold a replica.
CONTEXT_PARALLEL_RULES: LogicalRules = (
    ("activation_length", "context"),
    ("embed", ("fsdp", "context")),
) + tuple(rule for rule in DEFAULT_RULES if rule[0] not in ("activation_length", "embed"))
STRATEGIES: dict[str, LogicalRules] = {
    "dp": DATA_PARALLEL_RULES,
    "fsdp": FSDP_RULES,
    "tp": TENSOR_PARALLEL_RULES,
    "fsdp_tp": DEFAULT_RULES,
    "ep": EXPERT_PARALLEL_RULES,
    "cp": CONTEXT_PARALLEL_RULES,
}


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, ...]:
    """The ``(data, fsdp, tensor, context)`` sizes of ``config.mesh`` for ``num_devices``
    devices; an axis the config does not name has size 1.

    One axis size may be -1: it takes all devices left over by the others.
    """
    shape = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one of {MESH_AXES} may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices do "
                f"not divide by {known}"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} "
            f"devices, but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``data, fsdp, tensor, context`` sized by ``config.mesh`` (see
    `mesh_shape`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: Flax layers and sharding propagation expect them (Explicit is jax's new default).
    return Mesh(
        device_grid(shape, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def device_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """``devices`` arranged as a mesh of ``shape``.

    Other platforms keep the devices' order. TPUs are placed by their physical layout
    (`mesh_utils.create_device_mesh`), so that each mesh axis runs along the chips' interconnect;
    with several slices (multi-slice), the slices split the first mesh axes that they divide
    (``data`` first), so that only those axes' collectives cross the data-center network.
    """
    shape = tuple(shape)
    if devices[0].platform != "tpu":
        return np.array(devices).reshape(shape)
    from jax.experimental import mesh_utils

    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    across, left = [], num_slices
    for size in shape:
        across.append(math.gcd(size, left))
        left //= across[-1]
    if left != 1:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, shape))}: the axes do not split into "
            f"{num_slices} slices (make mesh.data a multiple of the slice count)"
        )
    try:
        if num_slices == 1:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        within = tuple(size // n for size, n in zip(shape, across))
        return mesh_utils.create_hybrid_device_mesh(
            within, tuple(across), devices, allow_split_physical_axes=True
        )
    except (AssertionError, NotImplementedError, ValueError) as e:
        # Shapes that the layout search does not cover still work, with slower collectives.
        logging.warning("Placing TPU devices in mesh order, not by their layout: %s", e)
        return np.array(devices).reshape(shape)


def describe(shape: Sequence[int]) -> str:
    """``'data 2, fsdp 2, tensor 2'``: the axes' sizes, context only where it splits rows."""
    sizes = zip(MESH_AXES, shape)
    return ", ".join(f"{a} {n}" for a, n in sizes if a != "context" or n > 1)


def abstract_mesh(shape: Sequence[int]) -> AbstractMesh:
    """A mesh of the given ``(data, fsdp, tensor, context)`` sizes without devices: for plans.
    Axes left out at the end have size 1."""
    shape = tuple(shape) + (1,) * (len(MESH_AXES) - len(shape))
    return AbstractMesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(mesh_config: Any) -> LogicalRules:
    """``config.mesh.rules`` if given, else the table of ``config.mesh.strategy``."""
    rules = mesh_config.get("rules")
    if not rules:
        strategy = mesh_config.get("strategy") or "fsdp_tp"
        if strategy not in STRATEGIES:
            raise ValueError(f"mesh.strategy={strategy!r}; expected one of {sorted(STRATEGIES)}")
        rules = STRATEGIES[strategy]
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


def plan(
    abstract_state: Any, mesh: Mesh | AbstractMesh, rules: LogicalRules
) -> list[dict[str, Any]]:
    """How each array of an abstract `nnx.State` is laid out on ``mesh``: ``path``, ``shape``,
    ``dtype``, logical ``axes``, the ``spec`` (mesh axes per dimension) and ``bytes_per_device``."""
    rows = []
    for path, variable in nnx.to_flat_state(abstract_state):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        spec = logical_to_spec(names, rules, variable.shape, mesh)
        shards = 1
        for axes in spec:
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                shards *= mesh.shape[axis]
        size = math.prod(variable.shape) * np.dtype(variable.dtype).itemsize
        rows.append(
            dict(
                path="/".join(map(str, path)),
                shape=tuple(variable.shape),
                dtype=str(np.dtype(variable.dtype)),
                axes=tuple(names),
                spec=spec,
                bytes_per_device=size // shards,
            )
        )
    return rows
