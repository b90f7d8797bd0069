"""Context parallelism on CPU: one long packed row, its step on one device against its tokens split
over 8 host devices.

  PYTHONPATH=. python bench/context_parallel.py
  PYTHONPATH=. python bench/context_parallel.py --length=4096 --rounds=2

A tiny LLaMA-shaped model (2 layers, d_model 64, 4 query heads and 2 key/value heads of 64, MLP
256, vocabulary 512, float32, AdamW) trains on one row of ``--length`` tokens (16,384 by default)
packed with segments of random length (256 to 4,096 tokens, positions restarting in each), with
the real `itune.training.step.train_step` jitted as `itune.training.trainer` jits it, on:

- ``1 device``: the row on one device (``mesh.strategy=fsdp_tp`` on a 1-device mesh);
- ``context 8``: 8 devices, ``mesh.context=8``, ``mesh.strategy=cp``: each device holds 2,048
  of the row's tokens (two chunks of the zig-zag layout) and gathers keys and values in each
  layer's attention (`itune.model.context`).

Peak memory per device is the compiled program's (`itune.training.aot.Memory`: arguments plus
outputs less donated ones plus temporaries, from ``memory_analysis()``). Time is the median
seconds per step over interleaved rounds (this machine's speed drifts; ``STACK.md``), and the
ratio of each round's pair. The 8 host devices share the machine's cores: the time column says
what the extra communication and the split attention cost, not what 8 real chips gain. (Without
context parallelism, 8 devices do not help one row: it does not split over the batch axes, and
every device would hold and compute all of it.)
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import statistics
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from itune import sharding
from itune.model.config import ModelConfig
from itune.training import aot, optimizer, state as state_lib, step

CONFIGS = {
    "1 device": dict(data=1, fsdp=1, tensor=1, context=1, strategy="fsdp_tp"),
    "context 8": dict(data=1, fsdp=1, tensor=1, context=8, strategy="cp"),
}


def model_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=512,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=256,
        rope_theta=500_000.0,
    )


def packed_row(length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((1, length), np.int32)
    positions = np.zeros((1, length), np.int32)
    start, seg = 0, 1
    while start < length:
        n = min(int(rng.integers(256, 4097)), length - start)
        segment_ids[0, start : start + n] = seg
        positions[0, start : start + n] = np.arange(n)
        start, seg = start + n, seg + 1
    return {
        "inputs": rng.integers(1, vocab, (1, length), dtype=np.int32),
        "targets": rng.integers(1, vocab, (1, length), dtype=np.int32),
        "loss_mask": rng.integers(0, 2, (1, length), dtype=np.int32),
        "segment_ids": segment_ids,
        "positions": positions,
    }


class Run:
    """One configuration's compiled step, state and batch."""

    def __init__(self, mesh_fields: dict, batch: dict[str, np.ndarray]):
        mesh_config = ml_collections.ConfigDict(mesh_fields)
        devices = jax.devices()[: mesh_config.data * mesh_config.fsdp * mesh_config.context]
        self.mesh = sharding.make_mesh(mesh_config, devices)
        rules = sharding.rules_from_config(mesh_config)
        optim = optimizer.config_section()
        tx = optimizer.make_optimizer(optim, 100)
        schedule = optimizer.learning_rate_schedule(optim, 100)
        cfg = model_config()
        layout = state_lib.state_layout(cfg, tx, self.mesh, rules)
        self.state = state_lib.init_train_state(layout, cfg, tx, self.mesh, rules)
        # One row: on the batch axes where they divide it.
        spec = sharding.logical_to_spec(("batch", None), rules, (1, 1), self.mesh)
        batch_sharding = NamedSharding(self.mesh, spec)

        def train_step(state, batch):
            return step.train_step(state, batch, graphdef=layout.graphdef, tx=tx, schedule=schedule)

        with jax.set_mesh(self.mesh):
            self.batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
            jitted = jax.jit(
                train_step,
                in_shardings=(layout.shardings, batch_sharding),
                out_shardings=(layout.shardings, NamedSharding(self.mesh, PartitionSpec())),
                donate_argnums=0,
            )
            start = time.perf_counter()
            self.compiled = jitted.lower(self.state, self.batch).compile()
            self.compile_s = time.perf_counter() - start
        self.memory = aot.Memory.of(self.compiled)

    def step(self) -> tuple[float, float]:
        """Seconds of one step, and its loss."""
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch)
            loss = float(jax.block_until_ready(metrics["loss"]))
        return time.perf_counter() - start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16_384)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batch = packed_row(args.length, model_config().vocab_size)
    runs = {}
    for name, fields in CONFIGS.items():
        runs[name] = Run(fields, batch)
        seconds, loss = runs[name].step()  # Warm-up.
        print(f"{name}: compiled in {runs[name].compile_s:.1f} s, first step {seconds:.2f} s")
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds, loss = run.step()
            times[name].append(seconds)
            losses[name].append(loss)
    ref = "1 device"
    print()
    print(
        f"One row of {args.length:,} tokens, {model_config().num_params() / 1e6:.2f}M-parameter "
        f"model, AdamW, float32; {args.rounds} rounds on {os.cpu_count()} CPU cores"
    )
    print()
    print(
        "| configuration | peak memory per device | of which temporaries | vs 1 device "
        "| s per step (min-max) | time vs 1 device |"
    )
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        ratios = [t / r for t, r in zip(times[name], times[ref])]
        print(
            f"| {name} | {run.memory.total / 2**20:,.1f} MiB "
            f"| {run.memory.temporaries / 2**20:,.1f} MiB "
            f"| {run.memory.total / runs[ref].memory.total:.3f}x "
            f"| {statistics.median(times[name]):.2f} ({min(times[name]):.2f}-"
            f"{max(times[name]):.2f}) | {statistics.median(ratios):.2f}x |"
        )
    print()
    spread = max(abs(a - b) for a, b in zip(losses["context 8"], losses[ref]))
    print(f"losses of the same steps, context 8 against 1 device: largest difference {spread:.1e}")


if __name__ == "__main__":
    main()
