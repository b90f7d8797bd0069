"""The dense train step of two checkouts of the code, side by side: did a change make it slower?

  git worktree add /tmp/before <revision>
  PYTHONPATH=. python bench/compare_checkouts.py --before /tmp/before --after .
  PYTHONPATH=. python bench/compare_checkouts.py --before /tmp/before --quick

Each checkout runs the dense train-step benchmark (`bench/train_step.py`'s `ItuneSteps`, the
SmolLM2-135M shape, packed rows of batch 4 x 512 by default (both workers are alive at once, and
two at batch 8 did not fit in this machine's free memory), float32 and bfloat16, remat save_dots,
freed host memory kept as ``itune-train`` keeps it) in a process of its own that imports only
that checkout (its ``itune`` and its ``bench/train_step.py``). The two alternate a step of each
(ABBA order over rounds), and the table gives the ratio of each round's pair: before / after
seconds (above 1: the change made the step faster). Since this machine's load moves a step's
time by more than a few percent, each worker also reports XLA's cost analysis of its compiled
step (FLOPs, transcendentals, bytes accessed) and a digest of the optimised program
(`program_digest`): the same digest before and after means the change compiles to the same
program, and any difference in time is the load's.

``--quick`` (batch 2, 2 rounds) is a smoke run, not figures to quote.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import hashlib
import re
import statistics
import subprocess
import sys
import time
import traceback
from multiprocessing import connection as mp_connection

# XLA's cost analysis of a compiled step, compared across checkouts.
COST_KEYS = ("flops", "transcendentals", "bytes accessed")


def ratio_text(pairs: list[float]) -> str:
    return f"{statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"


def spread(times: list[float]) -> str:
    """Median (min-max) of ``times``, seconds."""
    return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"


def program_digest(hlo: str) -> str:
    """A digest of an optimised HLO module's computations, without what changes when only the
    Python source does: source locations, stack frames and the numbers of instruction names."""
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^(ENTRY )?%\S+ .*\{$", line))
    text = "\n".join(lines[start:])
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r",? ?stack_frame_id=\d+", "", text)
    text = re.sub(r"%([\w\-]+?)(\.\d+)+\b", r"%\1", text)
    text = re.sub(r"region_\d+", "region", text)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def serve(address: str, name: str, dtypes: list[str], batch_size: int, seq_len: int) -> None:
    """A checkout's worker, run with that checkout first on the path: builds its
    `bench/train_step.py`'s `ItuneSteps` and answers ``(variant, n)`` with ``run(variant, n)``."""
    from itune import runtime  # noqa: PLC0415

    runtime.keep_freed_host_memory()
    import jax  # noqa: PLC0415

    import itune  # noqa: PLC0415
    from bench import train_step  # noqa: PLC0415

    host, port = address.rsplit(":", 1)
    client = mp_connection.Client(
        (host, int(port)), authkey=bytes.fromhex(os.environ["ITUNE_BENCH_KEY"])
    )
    try:
        model_config = train_step.ModelConfig.from_config(
            train_step.configlib.model_section(train_step.PRESET)
        )
        batch = train_step.packed_batch(batch_size, seq_len, model_config.vocab_size)
        steps = train_step.ItuneSteps([(dtype, "save_dots") for dtype in dtypes], batch)
        costs = {}
        for variant in steps.steps:  # The compiled step again: from jit's cache.
            with jax.set_mesh(steps.mesh):
                compiled = steps.steps[variant].lower(steps.state, steps.batch).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            costs[variant[0]] = {k: float(cost.get(k, 0.0)) for k in COST_KEYS}
            costs[variant[0]]["program"] = program_digest(compiled.as_text())
        where = os.path.dirname(os.path.dirname(itune.__file__))
        client.send(("ok", name, (where, costs)))
        while (request := client.recv()) is not None:
            variant, n = request
            client.send(("ok", steps.run(tuple(variant), n)))
    except Exception:  # noqa: BLE001 - the parent re-raises it with the worker's traceback.
        client.send(("error", name, traceback.format_exc()))


def compare(args) -> None:
    from bench import report  # noqa: PLC0415  (the parent only: a worker imports its checkout)

    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    dtypes = args.dtypes.split(",")
    variants = [(dtype, "save_dots") for dtype in dtypes]
    key = os.urandom(16)
    listener = mp_connection.Listener(("127.0.0.1", 0), authkey=key)
    address = f"{listener.address[0]}:{listener.address[1]}"
    processes, connections, places, costs = [], {}, {}, {}
    start = time.perf_counter()
    for name, tree in trees.items():
        revision = subprocess.run(
            ["git", "-C", tree, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        places[name] = (tree, revision)
        env = dict(os.environ, PYTHONPATH=tree, ITUNE_BENCH_KEY=key.hex())
        command = [sys.executable, os.path.abspath(__file__), "--serve", address,
                   "--name", name, "--dtypes", args.dtypes,
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len)]  # fmt: skip
        # One at a time: two compilations at once on 2 cores only slow each other.
        processes.append(subprocess.Popen(command, cwd=tree, env=env))
        conn = listener.accept()
        status, got, value = conn.recv()
        if status == "error":
            raise RuntimeError(f"{name} worker failed:\n{value}")
        where, costs[got] = value
        if os.path.realpath(where) != os.path.realpath(tree):
            raise RuntimeError(f"{name} worker imported itune from {where}, not {tree}")
        connections[got] = conn
    setup_s = time.perf_counter() - start

    def run(name, variant, n):
        connections[name].send((variant, n))
        status, value = connections[name].recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    for name in trees:  # Warm-up
        for variant in variants:
            run(name, variant, 1)
    times = {(name, v): [] for name in trees for v in variants}
    for i in range(args.rounds):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for variant in variants:
            for name in order:
                seconds, _ = run(name, variant, args.steps)
                times[name, variant].append(seconds / args.steps)
    for conn in connections.values():
        conn.send(None)
    for process in processes:
        process.wait()

    print(
        f"# Dense train step before / after, SmolLM2-135M shape, batch {args.batch} x "
        f"{args.seq_len}, remat save_dots\n"
    )
    print(
        "; ".join(f"{name}: {tree} at {rev}" for name, (tree, rev) in places.items())
        + f". Setup (two compilations) {setup_s:.0f} s. {args.rounds} rounds, in each a step of "
        f"each checkout per dtype (ABBA order); median (min-max) over rounds.\n"
    )
    rows = []
    for variant in variants:
        before, after = times["before", variant], times["after", variant]
        dtype = variant[0]
        rows.append(
            [
                dtype,
                spread(before),
                spread(after),
                ratio_text([b / a for b, a in zip(before, after)]),
                *(f"{costs['after'][dtype][k] / costs['before'][dtype][k]:.4f}" for k in COST_KEYS),
                "yes"
                if costs["after"][dtype]["program"] == costs["before"][dtype]["program"]
                else "no",
            ]
        )
    report.table(
        "dense step before after",
        ["dtype", "before s/step", "after s/step", "before / after time (above 1: faster after)",
         *(f"compiled {k}, after / before" for k in COST_KEYS), "same compiled program"],
        rows,
    )  # fmt: skip
    print(
        "The compiled columns are XLA's cost analysis of each checkout's compiled step "
        "(independent of the machine's load), and whether the optimised programs' texts "
        "without source locations are equal: "
        + "; ".join(
            f"{name} {dtype} " + ", ".join(f"{c[k] / 1e9:.2f} G {k}" for k in COST_KEYS)
            for name in costs
            for dtype, c in costs[name].items()
        )
        + ".\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the checkout before the change (git worktree add ...)")
    parser.add_argument("--after", default=".", help="the checkout after it")
    parser.add_argument("--quick", action="store_true", help="batch 2, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (ABBA order)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per checkout per round")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--serve", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.name, args.dtypes.split(","), args.batch, args.seq_len)
        return
    if not args.before:
        parser.error("--before is needed (a checkout, e.g. git worktree add /tmp/before HEAD~1)")
    # Two workers live at once: at batch 8 each held 7.8 GB, more than this shared machine had
    # free for both.
    args.batch = args.batch or (2 if args.quick else 4)
    args.rounds = args.rounds or (2 if args.quick else 4)
    compare(args)


if __name__ == "__main__":
    main()
