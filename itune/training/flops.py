"""Model FLOPs utilisation: the model's FLOPs per second over the devices' peak.

Peaks are the published dense bfloat16 figures per chip for TPUs and GPUs; on CPU there is no such
figure, so the host's matmul throughput is measured once (a jitted square matmul in the
computation dtype) and stands for the peak of all its devices together.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp

# Dense bfloat16 FLOP/s per chip, by the start of `jax.Device.device_kind`.
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
)


def device_peak(device: jax.Device) -> float | None:
    """The published peak of one accelerator, None when it is not known."""
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
