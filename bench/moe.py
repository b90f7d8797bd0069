"""Mixture-of-experts speed on CPU: itune's MoE train step against transformers + PyTorch, and
the grouped expert products against the dense loop over experts.

  PYTHONPATH=. python bench/moe.py                      # the step and layer tables
  PYTHONPATH=. python bench/moe.py --quick              # a smoke run of both
  PYTHONPATH=. python bench/moe.py step                 # the MoE train step only
  PYTHONPATH=. python bench/moe.py layer                # the MoE layer only

(`bench/compare_checkouts.py` times the dense train step of two checkouts of the code.)

``step``: a small Qwen3-MoE (`SHAPE`: 4 layers, d_model 256, 32 experts of width 128, top-4
renormalised, q/k norm, vocabulary 8192) is built by transformers with random weights and saved;
itune imports it (`itune.convert.hf.load_hf`) and PyTorch loads it (`Qwen3MoeForCausalLM`,
``sdpa`` attention), so both start from the same weights and route the same tokens to the same
experts. Each trains float32 on one fixed batch of unpacked rows (4 x 256) with AdamW (the base
config's settings, gradients clipped to norm 1), the loss being the mean next-token cross-entropy
plus ``router_aux_loss_coef`` (0.001) x transformers' load-balancing loss in both (transformers
adds it with ``output_router_logits``). itune runs its jitted `itune.training.step.train_step`
with ``model.moe_matmul`` "tiled" (its CPU default) and "dense" (every expert on every token);
PyTorch runs ``loss.backward()`` and ``optimizer.step()`` eagerly with transformers' experts
implementation "grouped_mm" (its default, ``torch.nn.functional.grouped_mm``; ``--torch-experts
grouped_mm,eager`` adds "eager", a Python loop over the experts hit), on 1 and on 2 threads
(``torch.set_num_threads``): on this shared, overloaded 2-core machine, PyTorch's two OpenMP
threads wait on each other at every operation and its step ran 5-20x slower than on one thread.
Each framework runs in a process of its own, in interleaved rounds (this machine's speed
drifts); the ratio is itune's throughput over the fastest PyTorch row's, each round's pair,
median (min-max). The first step's losses are printed side by side: equal losses say both
computed the same thing.

``layer``: the MoE layer alone (`itune.model.moe.MoE`, 1024 tokens of d_model 256, experts of
width 128, top-4), forward and backward (the gradients of the parameters and of the input),
jitted, with ``moe_matmul`` "tiled", "ragged" (``jax.lax.ragged_dot``) and "dense", for 8, 32
and 64 experts; seconds per call as the median of interleaved rounds, and each grouped product's
speed as a ratio against "dense" in the same round. "dense" computes ``experts / top-k`` times
the expert FLOPs of the grouped products.

``--quick`` shortens each part (fewer rounds, smaller batch): a smoke run, not figures to quote.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import gc
import multiprocessing
import statistics
import tempfile
import time
import traceback

import numpy as np

from bench import report

# The step's model: Qwen3-30B-A3B's layout scaled down (q/k norm, 4 query heads per key/value
# head, many narrow experts), as transformers' Qwen3MoeConfig fields.
SHAPE = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,  # Unused: every layer is sparse.
    moe_intermediate_size=128,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
    output_router_logits=True,  # transformers adds the auxiliary loss only with it.
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)
LAYER_EXPERTS = (8, 32, 64)
LAYER_MATMULS = ("tiled", "ragged", "dense")


def ratio_text(pairs: list[float]) -> str:
    return f"{statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"


def spread(times: list[float]) -> str:
    """Median (min-max) of ``times`` (seconds) in milliseconds."""
    median, low, high = (1e3 * x for x in (statistics.median(times), min(times), max(times)))
    return f"{median:.0f} ({low:.0f}-{high:.0f})"


def token_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Unpacked rows of random tokens: one sequence a row, every position trained."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "positions": np.broadcast_to(
            np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)
        ).copy(),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "loss_mask": np.ones((batch_size, seq_len), np.int32),
    }


def save_hf_model(path: str, seed: int = 0) -> None:
    """A random transformers Qwen3-MoE of `SHAPE`, saved in ``path``."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(**SHAPE)
    model = transformers.Qwen3MoeForCausalLM._from_config(config, dtype=torch.float32)
    model.save_pretrained(path)


# ----------------------------------------------------------------------------------------------
# The MoE train step


class ItuneMoeSteps:
    """itune's jitted train step of the saved model for each ``moe_matmul``, over one train
    state (built as `itune.training.trainer` builds it, from the imported weights)."""

    def __init__(self, path: str, batch: dict, matmuls: list[str], num_steps: int = 1000):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        from itune import configlib, sharding  # noqa: PLC0415
        from itune.convert import hf  # noqa: PLC0415
        from itune.training import optimizer, program  # noqa: PLC0415
        from itune.training import state as state_lib

        self.jax = jax
        config = configlib.base_config()
        self.mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules_from_config(config.mesh)
        tx = optimizer.make_optimizer(config.optim, num_steps)
        schedule = optimizer.learning_rate_schedule(config.optim, num_steps)
        batch_sharding = sharding.batch_sharding(self.mesh, rules)
        self.steps, self.model_configs = {}, {}
        params = None
        for matmul in matmuls:
            model_config, _, loaded = hf.load_hf(path, self.mesh, rules, moe_matmul=matmul)
            params = loaded if params is None else params
            layout = state_lib.state_layout(model_config, tx, self.mesh, rules, config.seed)
            self.model_configs[matmul] = model_config
            self.steps[matmul] = program.jit_step(layout, tx, schedule, self.mesh, rules)
        self.state = jax.device_put(
            state_lib.TrainState(
                step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
            ),
            layout.shardings,
        )
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, batch_sharding)
        self.compile_s = {}
        for matmul in matmuls:
            start = time.perf_counter()
            with jax.set_mesh(self.mesh):
                self.steps[matmul].lower(self.state, self.batch).compile()
            self.compile_s[matmul] = time.perf_counter() - start

    def describe(self) -> dict:
        cfg = next(iter(self.model_configs.values()))
        return dict(
            params=cfg.num_params(),
            active=cfg.num_active_params(),
            flops_per_token=cfg.flops_per_token(int(self.batch["inputs"].shape[1])),
        )

    def run(self, matmul: str, n: int) -> tuple[float, float]:
        """Seconds for ``n`` steps, and the last step's loss (the loss of the state it
        started from)."""
        jax = self.jax
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            for _ in range(n):
                self.state, metrics = self.steps[matmul](self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            return time.perf_counter() - start, float(metrics["loss"])


class TorchMoeSteps:
    """transformers' Qwen3MoeForCausalLM of the saved model, an AdamW step per call, with the
    experts implementation named by each call."""

    def __init__(self, path: str, batch: dict, optim_config):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        self.torch = torch
        self.model = transformers.Qwen3MoeForCausalLM.from_pretrained(
            path, attn_implementation="sdpa", dtype=torch.float32
        )
        self.model.train()
        self.optim = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim_config.learning_rate,
            betas=(optim_config.b1, optim_config.b2),
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
        )
        self.inputs = torch.from_numpy(batch["inputs"]).long()
        # The targets as they are (no shift inside the loss): the same as itune's.
        self.targets = torch.from_numpy(batch["targets"]).long()
        self.positions = torch.from_numpy(batch["positions"]).long()
        self.compile_s = {}

    def describe(self) -> dict:
        return dict(params=sum(p.numel() for p in self.model.parameters()))

    def one_step(self) -> float:
        torch = self.torch
        self.optim.zero_grad(set_to_none=True)
        out = self.model(
            input_ids=self.inputs,
            position_ids=self.positions,
            labels=self.targets,
            shift_labels=self.targets,
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optim.step()
        return out.loss.item()

    def run(self, variant: tuple[str, int], n: int) -> tuple[float, float]:
        """Seconds for ``n`` steps with ``variant = (experts implementation, threads)``, and the
        last step's loss."""
        experts, threads = variant
        if self.model.config._experts_implementation != experts:
            self.model.set_experts_implementation(experts)
        self.torch.set_num_threads(threads)
        start = time.perf_counter()
        loss = 0.0
        for _ in range(n):
            loss = self.one_step()
        return time.perf_counter() - start, loss


def _serve(connection, kind: str, path: str, batch: dict, variants: list, keep: bool) -> None:
    """A worker process's loop: builds its runner, then answers ``(method, args)`` with the
    runner's ``method(*args)`` until it receives None."""
    try:
        if keep:
            from itune import runtime  # noqa: PLC0415

            runtime.keep_freed_host_memory()  # Before JAX or torch starts a thread.
        if kind == "itune":
            runner = ItuneMoeSteps(path, batch, variants)
        else:
            from itune import configlib  # noqa: PLC0415

            runner = TorchMoeSteps(path, batch, configlib.base_config().optim)
        connection.send(("ok", runner.compile_s))
        while (request := connection.recv()) is not None:
            method, args = request
            connection.send(("ok", getattr(runner, method)(*args)))
    except Exception:  # noqa: BLE001 - the parent re-raises it with the worker's traceback.
        connection.send(("error", traceback.format_exc()))


class Worker:
    """A runner (`ItuneMoeSteps` for ``kind="itune"``, else `TorchMoeSteps`) in a process of its
    own, driven through a pipe."""

    def __init__(self, kind: str, path: str, batch: dict, variants: list, keep: bool):
        context = multiprocessing.get_context("spawn")  # No inherited JAX or torch state.
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, kind, path, batch, variants, keep), daemon=True
        )
        self.process.start()
        self.compile_s = self._receive()

    def _receive(self):
        status, value = self.connection.recv()
        if status == "error":
            raise RuntimeError(f"benchmark worker failed:\n{value}")
        return value

    def call(self, method: str, *args):
        self.connection.send((method, args))
        return self._receive()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def bench_step(args) -> None:
    batch = token_batch(args.batch, args.seq_len, SHAPE["vocab_size"])
    matmuls = args.itune_matmuls.split(",")
    torch_variants = [
        (experts, int(threads))
        for experts in args.torch_experts.split(",")
        for threads in args.torch_threads.split(",")
    ]
    with tempfile.TemporaryDirectory(prefix="itune_bench_moe_") as path:
        save_hf_model(path)
        start = time.perf_counter()
        itune = Worker("itune", path, batch, matmuls, keep=True)
        setup_s = time.perf_counter() - start
        torch_steps = Worker("torch", path, batch, [], keep=args.torch_memory == "kept")
        described = {"itune": itune.call("describe"), "torch": torch_steps.call("describe")}
        configs = [(f"itune, moe_matmul={m}", itune, m) for m in matmuls]
        configs += [
            (f"PyTorch, experts_implementation={e}, {t} thread{'s' * (t > 1)}", torch_steps, (e, t))
            for e, t in torch_variants
        ]
        # Warm-up steps; each framework's first one starts from the saved weights.
        first_loss = {}
        for _, runner, variant in configs:
            loss = runner.call("run", variant, 1)[1]
            first_loss.setdefault(runner, loss)
        gc.collect()
        times = {label: [] for label, _, _ in configs}
        for _ in range(args.rounds):
            for label, runner, variant in configs:
                seconds, _ = runner.call("run", variant, args.steps)
                times[label].append(seconds / args.steps)
        itune.close()
        torch_steps.close()

    positions = args.batch * args.seq_len
    info = described["itune"]
    print(f"# MoE train step, Qwen3-MoE shape, batch {args.batch} x {args.seq_len}, float32\n")
    print(
        f"{os.cpu_count()} cores (shared). {SHAPE['num_hidden_layers']} layers, d_model "
        f"{SHAPE['hidden_size']}, {SHAPE['num_experts']} experts of width "
        f"{SHAPE['moe_intermediate_size']}, top-{SHAPE['num_experts_per_tok']}, vocabulary "
        f"{SHAPE['vocab_size']}: {info['params'] / 1e6:.2f}M parameters in itune, "
        f"{described['torch']['params'] / 1e6:.2f}M in PyTorch, "
        f"{info['active'] / 1e6:.2f}M active; "
        f"{info['flops_per_token'] * positions / 1e9:.1f} GFLOP per step (active experts). "
        f"First step's loss (the saved weights, loss + 0.001 x load-balancing loss): itune "
        f"{first_loss[itune]:.6f}, PyTorch {first_loss[torch_steps]:.6f}. itune import + "
        f"compile {setup_s:.0f} s. {args.rounds} interleaved rounds of {args.steps} step(s) per "
        "config after a warm-up step; median (min-max) over rounds.\n"
    )
    torch_labels = [label for label, runner, _ in configs if runner is torch_steps]
    reference = min(torch_labels, key=lambda label: statistics.median(times[label]))
    rows = []
    for label, runner, _ in configs:
        t = times[label]
        row = [label, spread(t), f"{positions / statistics.median(t):,.0f}"]
        if runner is itune:
            row.append(ratio_text([b / a for a, b in zip(t, times[reference])]))
        else:
            row.append("(fastest)" if label == reference else "-")
        rows.append(row)
    report.table(
        "moe step",
        ["config", "ms/step", "tokens/s", "itune / fastest PyTorch throughput"],
        rows,
    )


# ----------------------------------------------------------------------------------------------
# The MoE layer alone


def bench_layer(args) -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from itune.model import moe  # noqa: PLC0415
    from itune.model.config import ModelConfig  # noqa: PLC0415

    tokens, d, width, k = (
        args.layer_tokens,
        SHAPE["hidden_size"],
        SHAPE["moe_intermediate_size"],
        SHAPE["num_experts_per_tok"],
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, tokens, d)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((1, tokens, d)), jnp.float32)
    segment_ids = jnp.ones((1, tokens), jnp.int32)
    experts_list = [int(e) for e in args.layer_experts.split(",")]
    calls, results = {}, {}
    for experts in experts_list:
        for matmul in LAYER_MATMULS:
            cfg = ModelConfig(
                vocab_size=8, d_model=d, num_layers=1, num_heads=1, num_kv_heads=1,
                head_dim=d, mlp_dim=width, num_experts=experts, experts_per_token=k,
                moe_matmul=matmul,
            )  # fmt: skip
            graphdef, params = nnx.split(moe.MoE(cfg, rngs=nnx.Rngs(0)))

            def objective(params, x, graphdef=graphdef):
                out, _ = nnx.merge(graphdef, params)(x, segment_ids)
                return jnp.sum(out * cotangent)

            grad = jax.jit(jax.grad(objective, argnums=(0, 1)))
            result = jax.block_until_ready(grad(params, x))  # Compiles.
            results[experts, matmul] = result
            calls[experts, matmul] = lambda grad=grad, params=params: jax.block_until_ready(
                grad(params, x)
            )
    times = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            for _ in range(args.layer_calls):
                call()
            times[key].append((time.perf_counter() - start) / args.layer_calls)

    def error(experts, matmul) -> float:
        """Largest difference to "dense" over all gradients, relative to each one's largest."""
        got = jax.tree.leaves(results[experts, matmul])
        want = jax.tree.leaves(results[experts, "dense"])
        return max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
            for a, b in zip(got, want)
        )

    print(
        f"# MoE layer, forward + backward: {tokens} tokens, d_model {d}, experts of width "
        f"{width}, top-{k}, float32\n"
    )
    print(
        f"{args.rounds} interleaved rounds of {args.layer_calls} calls; ms per call, median "
        "(min-max); speed-up = dense's time over the product's in each round, median (min-max); "
        "'dense' does experts / top-k times the expert FLOPs.\n"
    )
    rows = []
    for experts in experts_list:
        for matmul in LAYER_MATMULS:
            t = times[experts, matmul]
            if matmul == "dense":
                speedup, diff = "1 (reference)", "-"
            else:
                speedup = ratio_text([b / a for a, b in zip(t, times[experts, "dense"])])
                diff = f"{error(experts, matmul):.1e}"
            rows.append([experts, f"{experts / k:g}", matmul, spread(t), speedup, diff])
    report.table(
        "moe layer",
        ["experts", "dense / grouped FLOPs", "moe_matmul", "ms/call", "speed-up over dense",
         "max gradient difference to dense"],
        rows,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "what", nargs="?", default="all", choices=("all", "step", "layer"),
        help="all: the step and layer tables",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per config per round")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--itune-matmuls", default="tiled,dense", help="itune's rows (step)")
    parser.add_argument(
        "--torch-experts", default="grouped_mm",
        help="transformers' experts implementations (step), each a PyTorch row per thread count",
    )  # fmt: skip
    parser.add_argument(
        "--torch-threads", default="1,2",
        help="torch.set_num_threads values (step); each a PyTorch row",
    )  # fmt: skip
    parser.add_argument(
        "--torch-memory", choices=("default", "kept"), default="default",
        help="PyTorch's process as a user runs it, or with itune's malloc settings (step)",
    )  # fmt: skip
    parser.add_argument("--layer-tokens", type=int, default=1024)
    parser.add_argument("--layer-calls", type=int, default=3, help="calls per round (layer)")
    parser.add_argument("--layer-experts", default=",".join(map(str, LAYER_EXPERTS)))
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq_len = args.seq_len or (128 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.quick:
        args.layer_tokens, args.layer_calls = 256, 1
    if args.what in ("all", "step"):
        bench_step(args)
    if args.what in ("all", "layer"):
        bench_layer(args)


if __name__ == "__main__":
    main()
