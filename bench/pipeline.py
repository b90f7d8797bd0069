"""Input-pipeline benchmarks: packing efficiency on real data, and pipeline throughput against
what the train step consumes.

  cd /work/main && PYTHONPATH=. timeout 600 /work/venv/bin/python bench/pipeline.py

Real data comes from the shared folder (``$ITUNE_SHARED``, default ``<repo>/../shared``): gsm8k,
LLaMA-Factory's alpaca demo and FastChat's dummy conversations, tokenized with SmolLM2's BPE in
the ChatML format. Speeds are reported as ratios against the train step measured in the same
run, in interleaved rounds, since the machine is shared and its absolute speed drifts.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import functools
import itertools
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bench import report
from configs import smoke
from itune import configlib, sharding
from itune.data import encode, mixture, packing, pipeline
from itune.data import spec as data_spec
from itune.model.decoder import ModelConfig
from itune.training import feed, optimizer, state as state_lib, step

TARGET = 0.97  # Non-padding share wanted at seq_len 2048.
TARGET_SEQ_LEN = 2048


def shared_dir() -> pathlib.Path:
    path = pathlib.Path(configlib.shared_dir())
    if not (path / "data").is_dir() or not (path / "tokenizers" / "smollm2_bpe").is_dir():
        sys.exit(
            f"bench/pipeline.py: the shared folder {path} (with data/ and tokenizers/smollm2_bpe) "
            "is absent; set ITUNE_SHARED to point at it."
        )
    return path


def file_mix_config(shared: pathlib.Path, seq_len: int, batch_size: int, mix: str):
    """The smoke config reading the three shared files with SmolLM2's tokenizer."""
    config = smoke.get_config()
    with config.unlocked():
        config.data.sources = {
            "gsm8k": {
                "path": str(shared / "data/gsm8k/train.jsonl"),
                "format": "alpaca",
                "field_map": {"instruction": "question", "output": "answer"},
            },
            "alpaca_demo": {"path": str(shared / "data/llamafactory/alpaca_en_demo.json")},
            "fastchat": {"path": str(shared / "data/fastchat/dummy_conversation.json")},
        }
        config.data.tokenizer.path = str(shared / "tokenizers/smollm2_bpe")
        config.data.chat_format = "chatml"
        config.data.mixture = mix
        config.data.seq_len = seq_len
        config.data.global_batch_size = batch_size
    return config


def chats(data_config, spec: data_spec.DataSpec):
    """The training stream's chats (a resumable stream yields ``(chat, position)`` pairs)."""
    for item in mixture.train_stream(data_config, spec.sources):
        yield item[0] if isinstance(item, tuple) else item


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# --- 1. Packing efficiency ---------------------------------------------------------------------


def pack_one_per_row(examples, seq_len: int, pad_id: int) -> packing.PackingStats:
    """Padding only: every example alone in its row."""
    packer = packing.Packer(seq_len, max_open_rows=1, pad_id=pad_id)
    for example in examples:
        packer.add(example)
        packer.flush()
    return packer.stats


def pack_first_fit(examples, seq_len: int, open_rows: int, pad_id: int):
    """Non-padding share of the rows a training stream emits (no flush: the stream is infinite),
    and the stats after flushing the open rows (every example placed)."""
    packer = packing.Packer(seq_len, max_open_rows=open_rows, pad_id=pad_id)
    for _ in packing.pack(examples, packer, flush=False):
        pass
    streamed = packer.stats.efficiency(seq_len)
    packer.flush()
    return streamed, packer.stats


def packing_table(shared: pathlib.Path, workdir: str, args) -> None:
    config = file_mix_config(shared, TARGET_SEQ_LEN, 32, args.mixture)
    spec = data_spec.make_spec(config.data, workdir)
    sizes = {s.name: len(s) for s in spec.sources}
    # One epoch's worth of the training stream, in the order itune would train on it.
    n = args.pack_examples or sum(sizes.values())
    drawn = list(itertools.islice(chats(config.data, spec), n))
    examples = [encode.encode_example(chat, spec) for chat in drawn]
    lengths = np.array([len(e["inputs"]) for e in examples])
    per_source = {name: sum(c.get("source") == name for c in drawn) for name in sizes}
    pad_id = spec.tokenizer.pad_id

    rows = []
    for seq_len in args.seq_lens:
        settings = [("padding only (1 example/row)", None)]
        settings += [
            (f"first-fit, {k} open rows", k)
            for k in dict.fromkeys([config.data.pack_open_rows, args.big_buffer])
        ]
        for name, open_rows in settings:
            if open_rows is None:
                stats = pack_one_per_row(examples, seq_len, pad_id)
                streamed = stats.efficiency(seq_len)
            else:
                streamed, stats = pack_first_fit(examples, seq_len, open_rows, pad_id)
            flushed = stats.efficiency(seq_len)
            meets = "-"
            if seq_len == TARGET_SEQ_LEN:
                meets = "yes" if min(streamed, flushed) >= TARGET else "no"
            dropped = sum(stats.dropped.values())
            rows.append(
                [
                    seq_len,
                    name,
                    pct(streamed),
                    pct(flushed),
                    stats.rows,
                    f"{stats.tokens / max(1, stats.rows):.0f}",
                    stats.truncated,
                    dropped,
                    meets,
                ]
            )
    print("## 1. Packing efficiency on real data\n")
    print(
        f"{n} training chats drawn from itune's stream (mixture '{args.mixture}': "
        + ", ".join(f"{k} {v}" for k, v in per_source.items())
        + f"), SmolLM2 BPE + ChatML; next-token length p50 {np.median(lengths):.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}, mean {lengths.mean():.0f}. "
        "'stream' counts the rows a training stream emits (open rows never flushed), 'all' "
        f"also flushes the last open rows; the >= {TARGET:.0%} target at {TARGET_SEQ_LEN} is "
        "judged on the lower of the two.\n"
    )
    header = [
        "seq_len",
        "packer",
        "non-padding (stream)",
        "non-padding (all)",
        "rows needed",
        "tokens/row",
        "truncated",
        "dropped",
        f">= {TARGET:.0%}",
    ]
    report.table("packing", header, rows)


# --- 2. Pipeline throughput vs train-step consumption ------------------------------------------


def non_padding(batch: dict) -> int:
    return int((batch["segment_ids"] > 0).sum())


class PipelineRound:
    """One stream's `BatchIterator`, timed in rounds of ``num_batches`` batches.

    Each round first drains the prefetched batches (filled while the step ran), so that it times
    steady-state production, not batches made ahead.
    """

    def __init__(self, name: str, data_config, spec: data_spec.DataSpec):
        self.name, self.data_config, self.spec = name, data_config, spec
        stop = threading.Event()
        dataset, self.stats = pipeline.train_dataset(data_config, spec, stop=stop)
        self.batches = feed.BatchIterator(dataset, stop=stop)
        self.first = next(self.batches)
        self.results: list[tuple[float, int, int]] = []  # (seconds, tokens, batches)

    def run(self, num_batches: int) -> None:
        for _ in range(self.data_config.prefetch + 1):
            next(self.batches)
        tokens = 0
        start = time.perf_counter()
        for _ in range(num_batches):
            tokens += non_padding(next(self.batches))
        self.results.append((time.perf_counter() - start, tokens, num_batches))

    def examples_per_batch(self) -> float:
        return self.stats.examples / max(1, self.stats.rows) * self.spec.global_batch_size

    def close(self) -> None:
        self.batches.close()


class StepRound:
    """The smoke config's jitted train step, built as `itune.training.trainer` builds it, fed one
    fixed pre-built batch."""

    def __init__(self, config, spec: data_spec.DataSpec, local_batch: dict):
        self.mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules_from_config(config.mesh)
        model_config = ModelConfig.from_config(config.model, spec.tokenizer.vocab_size)
        num_steps = config.train.num_steps
        tx = optimizer.make_optimizer(config.optim, num_steps)
        schedule = optimizer.learning_rate_schedule(config.optim, num_steps)
        layout = state_lib.state_layout(model_config, tx, self.mesh, rules, config.seed)
        self.state = state_lib.init_train_state(
            layout, model_config, tx, self.mesh, rules, config.seed
        )
        batch_sharding = sharding.batch_sharding(self.mesh, rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.train_step = jax.jit(
            functools.partial(step.train_step, graphdef=layout.graphdef, tx=tx, schedule=schedule),
            in_shardings=(layout.shardings, batch_sharding),
            out_shardings=(layout.shardings, replicated),
            donate_argnums=0,
        )
        # Only the model's fields: a pipeline may add bookkeeping fields to its batches.
        fields = {k: local_batch[k] for k in packing.ROW_FIELDS}
        self.batch = jax.block_until_ready(feed.global_batch(fields, batch_sharding))
        self.tokens = non_padding(local_batch)
        self.results: list[tuple[float, int, int]] = []
        self.steps(3)  # Compiles.

    def steps(self, n: int) -> float:
        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            metrics = None
            for _ in range(n):
                self.state, metrics = self.train_step(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            return time.perf_counter() - start

    def run(self, num_steps: int) -> None:
        # Untimed steps first, while the pipelines' prefetch threads finish refilling.
        self.steps(2)
        self.results.append((self.steps(num_steps), self.tokens * num_steps, num_steps))


def stage_times(pipe: PipelineRound, num_batches: int) -> dict[str, float]:
    """Seconds per batch of `pipeline.train_rows` run directly (no tf.data), then of each of its
    stages run alone on as many chats, all in this thread."""
    data_config, spec = pipe.data_config, pipe.spec
    stats = packing.PackingStats()
    rows = pipeline.train_rows(data_config, spec, stats)
    # Past the packer's first fill, which consumes chats before any row comes out.
    for _ in itertools.islice(rows, data_config.pack_open_rows + spec.global_batch_size):
        pass
    first = stats.examples
    start = time.perf_counter()
    for _ in itertools.islice(rows, num_batches * spec.global_batch_size):
        pass
    times = {"train_rows": time.perf_counter() - start}
    num_examples = stats.examples - first
    start = time.perf_counter()
    drawn = list(itertools.islice(chats(data_config, spec), num_examples))
    times["draw chats"] = time.perf_counter() - start
    start = time.perf_counter()
    encoded = [encode.encode_example(chat, spec) for chat in drawn]
    times["render + tokenize"] = time.perf_counter() - start
    start = time.perf_counter()
    packer = packing.Packer(spec.seq_len, data_config.pack_open_rows, spec.tokenizer.pad_id)
    for _ in packing.pack(encoded, packer, flush=False):
        pass
    times["pack"] = time.perf_counter() - start
    return {k: v / num_batches for k, v in times.items()}


def throughput_tables(shared: pathlib.Path, workdir: str, args) -> None:
    smoke_config = smoke.get_config()
    smoke_spec = data_spec.make_spec(smoke_config.data, workdir)
    mix_batch = max(1, smoke_config.data.global_batch_size * smoke_config.data.seq_len // 2048)
    mix_config = file_mix_config(shared, 2048, args.mix_batch or mix_batch, args.mixture)
    mix_spec = data_spec.make_spec(mix_config.data, workdir)

    pipes = [
        PipelineRound("(a) smoke, built-in data", smoke_config.data, smoke_spec),
        PipelineRound("(c) file mix, SmolLM2, seq_len 2048", mix_config.data, mix_spec),
    ]
    step_round = StepRound(smoke_config, smoke_spec, pipes[0].first)
    for pipe in pipes:
        pipe.run(max(2, args.batches // 4))  # Warm-up.
        pipe.results.clear()
    step_round.steps(2)  # Lets the prefetch threads refill before anything is timed.
    stages = {pipe.name: [] for pipe in pipes}
    for _ in range(args.rounds):
        for pipe in pipes:
            # Stages first, while the prefetch buffers are full and their threads idle.
            stages[pipe.name].append(stage_times(pipe, args.stage_batches))
            pipe.run(args.batches)
            step_round.run(args.steps)
    for pipe in pipes:
        pipe.close()

    # A step round follows every pipeline round; each pipeline round is compared with its own.
    step_results = step_round.results
    step_tps = [tokens / sec for sec, tokens, _ in step_results]
    step_spb = [sec / n for sec, _, n in step_results]
    rows = []
    for p, pipe in enumerate(pipes):
        pairs = list(zip(pipe.results, step_results[p :: len(pipes)], strict=True))
        pipe_tps = [tokens / sec for (sec, tokens, _), _ in pairs]
        pipe_spb = [sec / n for (sec, _, n), _ in pairs]
        ratios = [a / (s_tok / s_sec) for a, (_, (s_sec, s_tok, _)) in zip(pipe_tps, pairs)]
        shares = [b / (s_sec / n) for b, (_, (s_sec, _, n)) in zip(pipe_spb, pairs)]
        tokens_per_batch = sum(t for _, t, _ in pipe.results) / sum(n for *_, n in pipe.results)
        rows.append(
            [
                pipe.name,
                f"{pipe.spec.global_batch_size} x {pipe.spec.seq_len}",
                f"{tokens_per_batch:.0f}",
                f"{1e3 * statistics.median(pipe_spb):.1f}",
                f"{statistics.median(pipe_tps):,.0f}",
                f"{statistics.median(ratios):.1f}x ({min(ratios):.1f}-{max(ratios):.1f})",
                f"{pct(statistics.median(shares))} ({pct(min(shares))}-{pct(max(shares))})",
            ]
        )
    rows.append(
        [
            "(b) smoke train step (consumption)",
            f"{smoke_spec.global_batch_size} x {smoke_spec.seq_len}",
            step_round.tokens,
            f"{1e3 * statistics.median(step_spb):.1f}",
            f"{statistics.median(step_tps):,.0f}",
            "1x",
            "100%",
        ]
    )
    print("## 2. Pipeline throughput vs train-step consumption\n")
    print(
        f"{args.rounds} rounds of [smoke pipeline {args.batches} batches, smoke step "
        f"{args.steps} steps, file-mix pipeline {args.batches} batches, smoke step {args.steps} "
        f"steps] on {jax.devices()[0].platform.upper()} ({os.cpu_count()} cores, shared); each "
        "pipeline round (after draining its prefetched batches) against the step round right "
        "after it: median (min-max) over rounds. Tokens are non-padding positions; the ratio is "
        "pipeline tokens/s over step tokens/s, the share is pipeline time per batch over step "
        "time per batch (by default a file-mix batch holds as many positions as a smoke batch). "
        "Absolute ms and tokens/s are medians and drift with the machine's load.\n"
    )
    header = [
        "stream",
        "batch (rows x seq_len)",
        "tokens/batch",
        "ms/batch",
        "tokens/s",
        "pipeline / consumption",
        "pipeline time / step time",
    ]
    report.table("throughput", header, rows)

    print("### Where the pipeline's time goes\n")
    print(
        f"Per round, before its tf.data round: `train_rows` iterated directly for "
        f"{args.stage_batches} batches, then each of its stages alone on as many chats, in the "
        "main thread. ms per batch (median over rounds) and, in brackets, the share of the tf.data "
        "pipeline's time per batch in the same round (median); 'tf.data overhead' is the tf.data "
        "time minus `train_rows` (`from_generator`, batching, prefetch thread).\n"
    )
    stage_rows = []
    for pipe in pipes:
        per_round = list(zip(stages[pipe.name], pipe.results, strict=True))
        for times, (sec, _, n) in per_round:
            times["tf.data overhead"] = sec / n - times["train_rows"]
            times["tf.data pipeline"] = sec / n
        names = list(per_round[0][0])
        cells = []
        for name in names:
            ms = statistics.median(1e3 * t[name] for t, _ in per_round)
            share = statistics.median(t[name] / (sec / n) for t, (sec, _, n) in per_round)
            cells.append(f"{ms:.2f} ({pct(share)})")
        stage_rows.append([pipe.name, f"{pipe.examples_per_batch():.0f}"] + cells)
    header = ["stream", "chats/batch"] + [f"{name} ms" for name in names]
    report.table("stages", header, stage_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    parser.add_argument("--batches", type=int, default=40, help="pipeline batches per round")
    parser.add_argument("--steps", type=int, default=15, help="train steps per round")
    parser.add_argument(
        "--stage-batches", type=int, default=10, help="batches' worth of chats per stage timing"
    )
    parser.add_argument(
        "--mix-batch",
        type=int,
        default=0,
        help="rows per file-mix batch at seq_len 2048; 0: as many positions as a smoke batch",
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--big-buffer", type=int, default=64, help="open rows of the big packer")
    parser.add_argument(
        "--pack-examples", type=int, default=0, help="chats to pack; 0: one epoch's worth"
    )
    parser.add_argument(
        "--mixture",
        default="examples",
        choices=mixture.MIXTURES,
        help="how the file sources mix (config.data.mixture)",
    )
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    shared = shared_dir()
    pipeline.configure_tensorflow()
    start = time.perf_counter()
    # The smoke config's tokenizer is trained and cached in a workdir; a fresh one each run.
    with tempfile.TemporaryDirectory(prefix="itune_bench_") as workdir:
        if not args.skip_packing:
            packing_table(shared, workdir, args)
        if not args.skip_throughput:
            throughput_tables(shared, workdir, args)
    print(f"Total {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
