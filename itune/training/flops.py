"""Model FLOPs utilisation: the model's FLOPs per second over the devices' peak.

Peaks are the published dense bfloat16 figures per chip for TPUs and GPUs; on CPU there is no such
figure, so the host's matmul throughput is measured once (a jitted square matmul in the
computation dtype) and stands for the peak of all its devices together.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import jax
import jax.numpy as jnp

from itune import topology

# Dense bfloat16 FLOP/s per chip, by the start of `jax.Device.device_kind`, for accelerators
# that `itune.topology.CHIPS` (the TPUs that itune compiles for) does not list.
PEAK_FLOPS = (
    ("TPU v3", 123e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
)


def device_peak(device: jax.Device) -> float | None:
    """The published peak of one accelerator, None when it is not known."""
    chip = topology.chip_for_device_kind(device.device_kind)
    if chip is not None:
        return chip.peak_flops
    for prefix, flops in PEAK_FLOPS:
        if device.device_kind.startswith(prefix):
            return flops
    return None


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` jitted ``size``-cubed matmuls on the first CPU device."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def total_peak(dtype: str = "bfloat16") -> tuple[float, str]:
    """The peak FLOP/s of all devices of the run, and where the figure comes from."""
    devices = jax.devices()
    peak = device_peak(devices[0])
    if peak is not None:
        return peak * len(devices), f"{len(devices)} x {devices[0].device_kind} (published)"
    if devices[0].platform == "cpu":
        # Forced host devices share the host's cores: the host's throughput is their total.
        hosts = jax.process_count()
        flops = measured_cpu_peak(dtype) * hosts
        return flops, f"{hosts} CPU host(s), measured {dtype} matmul"
    logging.warning("No peak FLOP/s known for %s: MFU is not reported", devices[0].device_kind)
    return 0.0, "unknown"


def _jaxprs(value) -> list:
    """The jaxprs inside an equation's parameter (one, or a tuple of branches)."""
    from jax.extend import core

    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _jaxprs(v)]
    return []


def _dot_flops(eqn) -> float:
    """2 x the multiply-adds of a ``dot_general``: every lhs element meets every free rhs
    element."""
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [n for i, n in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
    return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _ragged_dot_flops(eqn) -> float:
    """2 x the multiply-adds of a ``ragged_dot_general`` (each row meets its own group's matrix
    only), in all three forms (the product and its two transposes): the three operands' sizes
    multiply to the square of the multiply-adds times the number of groups."""
    lhs, rhs, groups = (math.prod(v.aval.shape) for v in eqn.invars[:3])
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2.0 * math.sqrt(lhs * rhs * out / groups)


def program_flops(jaxpr) -> float:
    """Matmul FLOPs of a traced program (``jax.jit(f).trace(...).jaxpr``) over all devices: every
    ``dot_general`` and ``ragged_dot_general``, a loop's body as many times as the loop runs
    (`lax.scan`'s length), the costlier branch of a ``cond``, a ``shard_map`` body once per
    device, and what rematerialisation recomputes, as jax emitted it.

    XLA's own cost analysis counts a loop body once: the layers' scan, gradient accumulation's
    scan, and the loops XLA itself makes of matmuls with gathered FSDP weights on TPU.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "ragged_dot_general":
            total += _ragged_dot_flops(eqn)
        elif name == "cond":
            total += max(program_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(program_flops(j) for v in eqn.params.values() for j in _jaxprs(v))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "shard_map":  # The body's shapes are one device's.
                inner *= math.prod(
                    eqn.params["mesh"].shape[a] for a in eqn.params["newly_manual_axes"]
                )
            elif name == "pallas_call":
                inner *= math.prod(eqn.params["grid_mapping"].grid)
            total += inner
    return total
