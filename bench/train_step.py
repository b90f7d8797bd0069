"""Train-step speed on CPU: itune's MFU, and its throughput against Hugging Face + PyTorch.

  PYTHONPATH=. python bench/train_step.py
  PYTHONPATH=. python bench/train_step.py --quick

The SmolLM2-135M shape (`itune.model.presets`, 30 layers, d_model 576, vocabulary 49,152) trains
on one fixed batch of packed random rows (8 x 512 by default; every row filled with segments of
random length, positions restarting in each), with AdamW (`itune.training.optimizer`, the base
config's settings) in four configurations:

- itune float32 and itune bfloat16 computation (float32 parameters): the real
  `itune.training.step.train_step` under `jax.jit`, built as `itune.training.trainer` builds it,
  with ``model.remat="save_dots"`` by default (``--remat none,save_dots`` adds a row per policy;
  saving only the dots and recomputing the elementwise chains was 1.35x faster than no remat in
  bfloat16 here; docs/benchmarks.md says what limits each figure);
- PyTorch float32 and PyTorch bfloat16 (`torch.autocast("cpu", dtype=torch.bfloat16)`): a
  transformers `LlamaForCausalLM` of the same shape with ``attn_implementation="sdpa"``, loss from
  ``labels``, ``loss.backward()`` and a `torch.optim.AdamW` step. It is given plain causal
  attention over each row (no segment mask): the same FLOPs, and SDPA's fastest path. It runs
  as a PyTorch user runs it or, with ``--torch-memory kept``, with the malloc settings that
  ``itune-train`` applies to itself on CPU (`itune.runtime.keep_freed_host_memory`: freed memory
  stays mapped instead of being faulted in again every step), which speed PyTorch up as well.
  One PyTorch process at a time: two kept processes and itune's do not fit in 24 GiB together.

The configurations run in interleaved rounds (itune f32, torch f32, itune bf16, torch bf16, then
again), since this shared machine's speed drifts (``STACK.md``, gotcha 11). itune and PyTorch each
run in a process of their own, one at a time, as a user runs either: in one process, each
framework's step ran slower right after the other's (``--same-process`` measures it that way).
The table gives the
median seconds per step over rounds with the min-max range, and the itune/PyTorch throughput
ratio of each round's pair. MFU is the model's FLOPs per step (`ModelConfig.flops_per_token` x
positions, no recomputation counted) over the matmul peak of the same dtype measured in this run
(`itune.training.flops.measured_cpu_peak`).

A second table times each forward projection of the step alone, in each framework's process, as
each framework computes it: itune's `itune.model.matmul` under XLA against transformers'
``nn.functional.linear`` (under autocast in bfloat16), on each step's own shapes: itune's loss
computes the logits a vocabulary slice at a time (``model.loss_vocab_chunk``,
`itune.training.chunked_loss`) and recomputes them in the backward, PyTorch's at once. A last
line gives the seconds the step's products take at these rates in each framework, and the rest
of each step.

``--quick`` (about 3 minutes) uses batch 2 x 512 and 2 rounds: a smoke run of the benchmark, not
figures to quote. The default (3 rounds of 1 step per config after a warm-up step each) takes
about 7 minutes on a 2-core host; ``--remat none,save_dots`` about 10.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import functools
import gc
import multiprocessing
import statistics
import time
import traceback
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bench import report
from itune import configlib, runtime, sharding
from itune.model import matmul
from itune.model.decoder import ModelConfig
from itune.training import chunked_loss, flops, optimizer, program, state as state_lib

PRESET = "smollm2-135m"
# The label of PyTorch rows run with itune's malloc settings (`_serve`).
KEPT = "freed memory kept"


def packed_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Rows filled with segments of 16 to seq_len / 2 tokens (the last one cut at the row's end):
    ``inputs``, ``targets`` (the next token, here random), ``positions`` restarting at 0 in each
    segment, ``segment_ids`` from 1, ``loss_mask`` all ones."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        start, segment = 0, 1
        while start < seq_len:
            length = min(int(rng.integers(16, seq_len // 2 + 1)), seq_len - start)
            segment_ids[row, start : start + length] = segment
            positions[row, start : start + length] = np.arange(length)
            start, segment = start + length, segment + 1
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": np.ones((batch_size, seq_len), np.int32),
    }


class Projection(NamedTuple):
    """A forward projection of the step, ``[m, k] x [k, n]``, run ``per_step`` times, each run
    with ``products`` products in all (itself and its two gradients; one more where the
    backward recomputes it)."""

    name: str
    m: int
    k: int
    n: int
    per_step: int
    float32_out: bool = False  # The logits.
    products: int = 3


def projections(model_config: ModelConfig, positions: int, vocab_chunk: int) -> list[Projection]:
    """The step's forward projections; the logits a vocabulary slice at a time with
    ``vocab_chunk`` (as `itune.training.chunked_loss` computes them, recomputed in the backward),
    else whole."""
    d, layers = model_config.d_model, model_config.num_layers
    heads = model_config.num_heads * model_config.head_dim
    kv = model_config.num_kv_heads * model_config.head_dim
    mlp = model_config.mlp_dim
    if vocab_chunk:
        count, size = chunked_loss.vocabulary_slices(model_config.vocab_size, vocab_chunk)
        logits = Projection("logits", positions, d, size, count, float32_out=True, products=4)
    else:
        logits = Projection("logits", positions, d, model_config.vocab_size, 1, float32_out=True)
    return [
        Projection("query / attention output", positions, d, heads, 2 * layers),
        Projection("key / value", positions, d, kv, 2 * layers),
        Projection("MLP gate / up", positions, d, mlp, 2 * layers),
        Projection("MLP down", positions, mlp, d, layers),
        logits,
    ]


def products_seconds(shapes: list[Projection], rates: list[float]) -> float:
    """Seconds of the step's products (each forward projection and its gradients) at the
    forward projections' ``rates``."""
    return sum(s.products * s.per_step * 2 * s.m * s.k * s.n / r for s, r in zip(shapes, rates))


def best_seconds(run, repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls of ``run`` after a warm-up call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


class ItuneSteps:
    """itune's jitted train step for each ``(dtype, remat)`` variant, over one shared train state
    (the parameters are float32 in all; only the graph's computation dtype and remat differ)."""

    def __init__(self, variants: list[tuple[str, str]], batch: dict, num_steps: int = 1000):
        config = configlib.base_config()
        self.mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules_from_config(config.mesh)
        tx = optimizer.make_optimizer(config.optim, num_steps)
        schedule = optimizer.learning_rate_schedule(config.optim, num_steps)
        batch_sharding = sharding.batch_sharding(self.mesh, rules)
        self.model_configs, self.steps = {}, {}
        layout = None
        for variant in variants:
            dtype, remat = variant
            section = configlib.model_section(PRESET, dtype=dtype, remat=remat)
            model_config = ModelConfig.from_config(section)
            layout = state_lib.state_layout(model_config, tx, self.mesh, rules, config.seed)
            self.model_configs[variant] = model_config
            self.steps[variant] = program.jit_step(layout, tx, schedule, self.mesh, rules)
        self.state = state_lib.init_train_state(
            layout, self.model_configs[variants[-1]], tx, self.mesh, rules, config.seed
        )
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, batch_sharding)
        self.compile_s = {}
        for variant in variants:
            start = time.perf_counter()
            with jax.set_mesh(self.mesh):
                self.steps[variant].lower(self.state, self.batch).compile()
            self.compile_s[variant] = time.perf_counter() - start

    def run(self, variant: tuple[str, str], n: int) -> tuple[float, float]:
        """Seconds for ``n`` steps, and the last step's loss."""
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            for _ in range(n):
                self.state, metrics = self.steps[variant](self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            return time.perf_counter() - start, float(metrics["loss"])

    def matmuls(self, dtype: str, shapes: list) -> list[float]:
        """FLOP/s of each forward projection as the step computes it (`itune.model.matmul`:
        ``dtype`` operands, float32 accumulation, float32 logits and ``dtype`` otherwise)."""
        rng = np.random.default_rng(0)
        rates = []
        for _, m, k, n, _, float32_out, _ in shapes:
            out_dtype = jnp.float32 if float32_out else dtype
            product = jax.jit(functools.partial(matmul.matmul, "tk,kn->tn", dtype=dtype,
                                                out_dtype=out_dtype))
            x = jnp.asarray(rng.standard_normal((m, k)), dtype)
            w = jnp.asarray(rng.standard_normal((k, n)), dtype)
            rates.append(2 * m * k * n / best_seconds(lambda: product(x, w).block_until_ready()))
        return rates


class TorchSteps:
    """transformers' `LlamaForCausalLM` of the same shape, an AdamW step per batch; float32, or
    bfloat16 autocast (float32 parameters and optimizer state) with ``dtype="bfloat16"``."""

    def __init__(self, model_config: ModelConfig, batch: dict, optim_config):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        self.torch = torch
        torch.manual_seed(0)
        hf_config = transformers.LlamaConfig(
            vocab_size=model_config.vocab_size,
            hidden_size=model_config.d_model,
            intermediate_size=model_config.mlp_dim,
            num_hidden_layers=model_config.num_layers,
            num_attention_heads=model_config.num_heads,
            num_key_value_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            rope_theta=model_config.rope_theta,
            rms_norm_eps=model_config.norm_eps,
            tie_word_embeddings=model_config.tie_embeddings,
            max_position_embeddings=model_config.max_seq_len,
            hidden_act="silu",
        )
        self.model = transformers.LlamaForCausalLM._from_config(
            hf_config, attn_implementation="sdpa", dtype=torch.float32
        )
        self.model.train()
        self.optim = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim_config.learning_rate,
            betas=(optim_config.b1, optim_config.b2),
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
        )
        # HF shifts the labels inside its loss (position t predicts label t + 1): the inputs.
        self.inputs = torch.from_numpy(np.asarray(batch["inputs"])).long()
        self.labels = self.inputs
        self.positions = torch.from_numpy(np.asarray(batch["positions"])).long()

    def one_step(self, bf16: bool) -> float:
        torch = self.torch
        self.optim.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = self.model(input_ids=self.inputs, position_ids=self.positions, labels=self.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optim.step()
        return out.loss.item()

    def run(self, variant: tuple[str, str], n: int) -> tuple[float, float]:
        dtype = variant[0]
        start = time.perf_counter()
        loss = 0.0
        for _ in range(n):
            loss = self.one_step(dtype == "bfloat16")
        return time.perf_counter() - start, loss

    def matmuls(self, dtype: str, shapes: list) -> list[float]:
        """FLOP/s of each forward projection as transformers computes it: ``nn.functional.linear``
        of float32 operands, under bfloat16 autocast for ``dtype="bfloat16"``."""
        torch = self.torch
        generator = torch.Generator().manual_seed(0)
        rates = []
        for _, m, k, n, *_ in shapes:
            x = torch.randn(m, k, generator=generator)
            w = torch.randn(n, k, generator=generator)

            def product(x=x, w=w):
                with torch.no_grad(), torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"
                ):
                    torch.nn.functional.linear(x, w)

            rates.append(2 * m * k * n / best_seconds(product))
        return rates


def _serve(connection, kind: str, variants: list, batch: dict, keep_memory: bool) -> None:
    """A worker process's loop: builds its runner, then answers ``(method, args)`` with the
    runner's ``method(*args)`` until it receives None. ``keep_memory``: glibc's malloc keeps
    freed memory (`itune.runtime.keep_freed_host_memory`, which ``itune-train`` applies on
    CPU)."""
    try:
        if keep_memory:
            runtime.keep_freed_host_memory()  # Before JAX or torch starts a thread.
        if kind == "itune":
            runner = ItuneSteps(variants, batch)
            connection.send(("ok", runner.compile_s))
        else:
            model_config = ModelConfig.from_config(configlib.model_section(PRESET))
            runner = TorchSteps(model_config, batch, configlib.base_config().optim)
            connection.send(("ok", {}))
        while (request := connection.recv()) is not None:
            method, args = request
            connection.send(("ok", getattr(runner, method)(*args)))
    except Exception:  # noqa: BLE001 - the parent re-raises it with the worker's traceback.
        connection.send(("error", traceback.format_exc()))


class Worker:
    """`ItuneSteps` (``kind="itune"``) or `TorchSteps` in a process of its own, driven through a
    pipe; `run` and `matmuls` have the runner's signatures."""

    def __init__(self, kind: str, variants: list, batch: dict, keep_memory: bool):
        context = multiprocessing.get_context("spawn")  # No inherited JAX or torch state.
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, kind, variants, batch, keep_memory), daemon=True
        )
        self.process.start()
        self.compile_s = self._receive()

    def _receive(self):
        status, value = self.connection.recv()
        if status == "error":
            raise RuntimeError(f"benchmark worker failed:\n{value}")
        return value

    def run(self, variant: tuple[str, str], n: int) -> tuple[float, float]:
        self.connection.send(("run", (variant, n)))
        return self._receive()

    def matmuls(self, dtype: str, shapes: list) -> list[float]:
        self.connection.send(("matmuls", (dtype, shapes)))
        return self._receive()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 x 512, 2 rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per config per round")
    parser.add_argument(
        "--remat",
        default="save_dots",
        help="itune's model.remat, comma-separated for one itune row per policy (e.g. "
        "none,save_dots)",
    )
    parser.add_argument("--no-torch", action="store_true", help="itune only (no ratio)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--torch-memory",
        choices=("default", "kept"),
        default="default",
        help="PyTorch's process as a user runs it, or with itune's malloc settings "
        "(freed memory kept)",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run itune and PyTorch in this one process instead of a process each",
    )
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rounds = 2, 2
    dtypes = args.dtypes.split(",")
    remats = args.remat.split(",")

    model_config = ModelConfig.from_config(configlib.model_section(PRESET))
    batch = packed_batch(args.batch, args.seq_len, model_config.vocab_size)
    positions = args.batch * args.seq_len
    flops_per_step = model_config.flops_per_token(args.seq_len) * positions

    variants = [(d, r) for d in dtypes for r in remats]
    start = time.perf_counter()
    if args.same_process:
        runtime.keep_freed_host_memory()
        itune = ItuneSteps(variants, batch)
    else:
        itune = Worker("itune", variants, batch, keep_memory=True)
    setup_s = time.perf_counter() - start
    torch_steps = None
    torch_label = "PyTorch {}" + (f", {KEPT}" if args.torch_memory == "kept" else "")
    if not args.no_torch:
        if args.same_process:
            torch_steps = TorchSteps(model_config, batch, configlib.base_config().optim)
        else:
            keep = args.torch_memory == "kept"
            torch_steps = Worker("torch", [], batch, keep_memory=keep)
    # (label, runner, (dtype, remat)) in round order: per dtype, itune's rows, then PyTorch's.
    configs = []
    for dtype in dtypes:
        configs += [(f"itune {dtype}, remat={r}", itune, (dtype, r)) for r in remats]
        if torch_steps is not None:
            configs.append((torch_label.format(dtype), torch_steps, (dtype, "")))
    for _, runner, variant in configs:  # Warm-up (jit dispatch, torch's first allocations).
        runner.run(variant, 1)
    gc.collect()

    times = {label: [] for label, _, _ in configs}
    losses = {}
    peaks = {dtype: [] for dtype in ("float32", "bfloat16")}
    for _ in range(args.rounds):
        for dtype in peaks:  # `measured_cpu_peak` itself, uncached: once per round.
            peaks[dtype].append(flops.measured_cpu_peak.__wrapped__(dtype))
        for label, runner, variant in configs:
            seconds, losses[label] = runner.run(variant, args.steps)
            times[label].append(seconds / args.steps)
    shapes = {
        "itune": projections(model_config, positions, model_config.loss_vocab_chunk),
        "torch": projections(model_config, positions, 0),
    }
    rates = {
        (name, dtype): runner.matmuls(dtype, shapes[name])
        for name, runner in (("itune", itune), ("torch", torch_steps)) if runner is not None
        for dtype in dtypes
    }
    for runner in (itune, torch_steps):
        if isinstance(runner, Worker):
            runner.close()
    peak = {dtype: statistics.median(p) for dtype, p in peaks.items()}

    print(f"# Train step, {PRESET} shape, batch {args.batch} x {args.seq_len}\n")
    print(
        f"{jax.devices()[0].platform.upper()}, {os.cpu_count()} cores (shared); "
        f"{model_config.num_params() / 1e6:.1f}M parameters, "
        f"{flops_per_step / 1e12:.3f} TFLOP per step "
        f"({model_config.flops_per_token(args.seq_len) / 1e6:.0f} MFLOP/token x {positions} "
        f"positions, no recomputation counted). itune compile + init {setup_s:.0f} s. "
        + (
            "itune and PyTorch in one process. "
            if args.same_process
            else "itune and PyTorch " "in a process each. "
        )
        + f"{args.rounds} interleaved rounds of {args.steps} step(s) per config after a warm-up "
        "step; median (min-max) over rounds.\n"
    )
    print(
        "Measured matmul peak (`itune.training.flops.measured_cpu_peak`: jitted 1024^3 matmul, "
        "best of 5, float32 accumulation), once per round, median (min-max): "
        + "; ".join(
            f"{d} {peak[d] / 1e9:.0f} ({min(p) / 1e9:.0f}-{max(p) / 1e9:.0f}) GFLOP/s"
            for d, p in peaks.items()
        )
        + ". MFU is against the median peak of the config's dtype.\n"
    )
    def ratio(label: str, reference: str) -> str:
        """itune's throughput over the reference's, median (min-max) of each round's pair."""
        if not label.startswith("itune") or reference not in times:
            return "-"
        pair = [b / a for a, b in zip(times[label], times[reference])]
        return f"{statistics.median(pair):.2f}x ({min(pair):.2f}-{max(pair):.2f})"

    rows = []
    for label, _, (dtype, _) in configs:
        t = times[label]
        median = statistics.median(t)
        mfu = flops_per_step / median / peak[dtype]
        rows.append(
            [
                label,
                f"{median:.2f} ({min(t):.2f}-{max(t):.2f})",
                f"{positions / median:,.0f}",
                f"{100 * mfu:.1f}%",
                ratio(label, torch_label.format(dtype)),
                f"{losses[label]:.3f}",
            ]
        )
    header = [
        "config",
        "s/step",
        "tokens/s",
        "MFU (same-dtype peak)",
        "itune / PyTorch throughput",
        "last loss",
    ]
    report.table("train step", header, rows)

    print(
        "Each forward projection of the step alone, as each framework computes it (itune: "
        "`itune.model.matmul`, XLA; PyTorch: `nn.functional.linear`, under autocast in "
        "bfloat16), best of 5, GFLOP/s:\n"
    )
    def shape(p: Projection) -> str:
        return f"[{p.m}, {p.k}] x [{p.k}, {p.n}]" + (f" x {p.per_step}" if p.per_step > 1 else "")

    matmul_rows = []
    for dtype in dtypes:
        for i, (ours, theirs) in enumerate(zip(shapes["itune"], shapes["torch"], strict=True)):
            xla = rates["itune", dtype][i]
            shapes_text = shape(ours) if ours == theirs else f"{shape(ours)} / {shape(theirs)}"
            row = [f"{ours.name}, {dtype}", shapes_text, f"{xla / 1e9:.0f}"]
            if ("torch", dtype) in rates:
                torch_rate = rates["torch", dtype][i]
                row += [f"{torch_rate / 1e9:.0f}", f"{xla / torch_rate:.2f}x"]
            else:
                row += ["-", "-"]
            matmul_rows.append(row)
    report.table(
        "matmuls", ["product", "shape", "XLA (itune)", "PyTorch", "XLA / PyTorch"], matmul_rows
    )
    for dtype in dtypes:
        if ("torch", dtype) not in rates:
            continue
        itune_step = statistics.median(times[f"itune {dtype}, remat={remats[-1]}"])
        torch_step = statistics.median(times[torch_label.format(dtype)])
        itune_products = products_seconds(shapes["itune"], rates["itune", dtype])
        torch_products = products_seconds(shapes["torch"], rates["torch", dtype])
        with_torch_products = itune_step - itune_products + torch_products
        print(
            f"{dtype}: at these rates the step's products (each projection and its "
            f"gradients; itune's logits recomputed too) take {itune_products:.1f} s in itune "
            f"and {torch_products:.1f} s in PyTorch; the rest of the step "
            f"{itune_step - itune_products:.1f} s and {torch_step - torch_products:.1f} s. "
            f"itune with PyTorch's products: {torch_step / with_torch_products:.2f}x PyTorch.\n"
        )


if __name__ == "__main__":
    main()
