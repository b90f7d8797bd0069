"""The input pipeline: chats -> rendered, tokenized, masked -> packed rows -> sharded batches.

Reads ``config.data``. The training stream is infinite and a pure function of the seed and the
example index, so a run resumed at step k starts again exactly at batch k. In a multi-process run
each process reads and renders only its data shards (`mixture.data_shards`), and `global_batch`
assembles the global `jax.Array` from the per-process parts.
"""

from __future__ import annotations

import dataclasses
import threading
import functools
import itertools
import logging
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
import tensorflow as tf

from itune.data import chat, mixture, packing, synthetic_tasks
from itune.data.encode import cut_pieces, encode_example, encode_examples  # noqa: F401
from itune.data.hf_tokenizer import load_tokenizer_path
from itune.data.tokenizer import MAX_PIECE_CHARS, Tokenizer, cached_sentencepiece


def configure_tensorflow() -> None:
    """Keeps TensorFlow off accelerators and its thread pools small, so XLA keeps the cores."""
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # Already initialised in this process: the first setting stands.
        pass


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Everything the rest of itune needs to know about the data of a run."""

    tokenizer: Tokenizer
    chat_format: chat.ChatFormat
    seq_len: int
    global_batch_size: int
    sources: list[mixture.Source]
    on_bad_example: str = "error"
    train_on: str = "all_assistant"

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @functools.cached_property
    def source_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.source_names)}

    @property
    def is_builtin(self) -> bool:
        return len(self.sources) == 1 and self.sources[0].name == mixture.BUILTIN

    @property
    def stop_id(self) -> int:
        fmt = self.chat_format
        return self.tokenizer.special_id(fmt.end_of_turn, fmt.special_tokens.get(fmt.end_of_turn))


def load_tokenizer(
    data_config: Any, workdir: str, sources: list[mixture.Source] | None = None
) -> Tokenizer:
    """The tokenizer of ``data.tokenizer``: a ``.model`` path, or a SentencePiece vocabulary
    trained on the run's own data and cached in ``<workdir>/tokenizer``."""
    tok_config = data_config.tokenizer
    if tok_config.path:
        return load_tokenizer_path(tok_config.path)
    fmt = chat.get_format(data_config.chat_format)
    seed, n = data_config.seed, tok_config.num_corpus_examples
    sources = sources or mixture.load_sources(data_config)
    builtin = sources[0].is_builtin
    num_shards, _ = mixture.data_shards(data_config)

    def corpus() -> Iterator[str]:
        if builtin:
            yield from synthetic_tasks.corpus(seed, n)
            chats = (builtin_example(data_config, i, "train") for i in range(min(n, 2000)))
        else:
            # Shard 0, which process 0 (the one that trains the vocabulary) reads.
            stream = mixture.train_stream(data_config, sources, 0, num_shards)
            chats = (example for example, _ in itertools.islice(stream, n))
        # Chats as rendered, so that the chat markup's words become pieces too; each only as far
        # as a row's tokens can reach into it, so that a huge record is not all of the corpus.
        keep_end = data_config.truncation == "truncate_prompt_left"
        max_chars = (data_config.seq_len + 1) * MAX_PIECE_CHARS
        for example in chats:
            pieces, _ = cut_pieces(chat.render(example["messages"], fmt), max_chars, keep_end)
            yield from filter(None, chat.to_text(pieces).split("\n"))

    def cached() -> Tokenizer:
        key = {"seed": seed, "corpus_examples": n, "version": 2}
        key["sources"] = "builtin" if builtin else repr(data_config.sources.to_dict())
        return cached_sentencepiece(
            cache_dir=f"{workdir}/tokenizer",
            key=key,
            lines_fn=corpus,
            vocab_size=tok_config.vocab_size,
            special_tokens=list(fmt.special_tokens),
            # Real text has characters the training sample may miss.
            byte_fallback=not builtin,
            corpus_name="the built-in tasks" if builtin else f"data.sources (up to {n} examples)",
        )

    if jax.process_count() == 1:
        return cached()
    # Process 0 trains and saves the vocabulary; the others then load the same file.
    tokenizer = cached() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("itune: tokenizer ready")
    return tokenizer or cached()


def make_spec(data_config: Any, workdir: str, tokenizer: Tokenizer | None = None) -> DataSpec:
    """The run's data: its sources, and ``tokenizer`` or else ``data.tokenizer``'s."""
    sources = mixture.load_sources(data_config)
    tokenizer = tokenizer or load_tokenizer(data_config, workdir, sources)
    fmt = chat.get_format(data_config.chat_format)
    if data_config.global_batch_size % jax.process_count():
        raise ValueError(
            f"data.global_batch_size={data_config.global_batch_size} must divide by the "
            f"number of processes ({jax.process_count()})"
        )
    return DataSpec(
        tokenizer,
        fmt,
        data_config.seq_len,
        data_config.global_batch_size,
        sources,
        data_config.on_bad_example,
        data_config.train_on,
    )


def builtin_example(
    data_config: Any, index: int, split: str, held_out: bool = False, families=None
) -> dict:
    return synthetic_tasks.make_example(
        data_config.seed,
        index,
        split,
        held_out_templates=held_out,
        system_prompt_rate=data_config.builtin.system_prompt_rate,
        families=families or data_config.builtin.families or None,
    )


_EVAL_POSITIONS = 2**40
ROW_ID = "row_id"  # Numbers each row of a training stream; see `RowStates`.


def _row_signature(seq_len: int) -> dict[str, tf.TensorSpec]:
    signature = {k: tf.TensorSpec((seq_len,), tf.int32) for k in packing.ROW_FIELDS}
    signature[ROW_ID] = tf.TensorSpec((), tf.int64)
    return signature


class RowStates:
    """The pipeline's state after each of the most recent rows, by row id.

    The input pipeline runs ahead of training (prefetch), so the state to checkpoint is the one
    after the last row of the last batch that training consumed, looked up here by its id.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._states: dict[int, dict] = {}

    def record(self, row_id: int, state: dict) -> None:
        self._states[row_id] = state
        self._states.pop(row_id - self.capacity, None)

    def after(self, row_id: int) -> dict:
        if row_id not in self._states:
            raise KeyError(f"no pipeline state kept for row {row_id} (capacity {self.capacity})")
        return self._states[row_id]


def _shard_rows(data_config, spec, shard, num_shards, stats, state):
    """One shard's rows, each with the shard's state after it."""
    packer = packing.Packer(
        spec.seq_len, data_config.pack_open_rows, spec.tokenizer.pad_id, data_config.truncation
    )
    packer.stats = stats
    if state:
        packer.restore(state["packer"])
    chats = mixture.train_stream(
        data_config, spec.sources, shard, num_shards, start=state["stream"] if state else None
    )
    for chat_example, position in chats:
        try:
            encoded = next(encode_examples([chat_example], spec, packer.stats, packer.truncation))
        except StopIteration:  # Skipped as a bad example (counted).
            continue
        for row in packer.add(encoded):
            yield row, {"stream": position, "packer": packer.state()}


def train_rows(
    data_config: Any,
    spec: DataSpec,
    stats: packing.PackingStats | None = None,
    state: dict | None = None,
    states: RowStates | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's infinite stream of packed rows, from ``state`` or the beginning.

    Rows come from this process's shards (`mixture.data_shards`) in turn, ``global_batch_size /
    shards`` from each. Each row carries a ``row_id``; with ``states``, the pipeline's state after
    each row (per shard: stream position, the packer's open rows and counters) is recorded there,
    ready to be checkpointed and passed back as ``state``.
    """
    stats = stats if stats is not None else packing.PackingStats()
    num_shards, shards = mixture.data_shards(data_config)
    shard_states = dict(state["shards"]) if state else {}
    if state and sorted(map(int, shard_states)) != list(shards):
        raise ValueError(f"data state holds shards {sorted(shard_states)}, this process {shards}")
    streams = {
        s: _shard_rows(data_config, spec, s, num_shards, stats, shard_states.get(str(s)))
        for s in shards
    }
    rows_per_shard = spec.global_batch_size // num_shards
    row_id = state["row_id"] if state else 0
    while True:
        for s in shards:
            for _ in range(rows_per_shard):
                row, shard_states[str(s)] = next(streams[s])
                row_id += 1
                if states is not None:
                    states.record(row_id, {"shards": dict(shard_states), "row_id": row_id})
                yield row | {ROW_ID: np.int64(row_id)}


def train_dataset(
    data_config: Any,
    spec: DataSpec,
    start_step: int = 0,
    state: dict | None = None,
    states: RowStates | None = None,
    stop: threading.Event | None = None,
) -> tuple[tf.data.Dataset, packing.PackingStats]:
    """Per-process batches of `train_rows`, without end until ``stop`` is set.

    Resumes from a checkpointed pipeline ``state`` when given; otherwise from batch
    ``start_step``, by replaying the stream from its start (exact, but slower). Pass the same
    ``stop`` to the `BatchIterator` that reads the dataset: closing it then ends the dataset.
    """
    stats = packing.PackingStats()
    per_process = spec.global_batch_size // jax.process_count()

    def batches() -> Iterator[dict[str, np.ndarray]]:
        # Batched here rather than by tf.data: its per-element cost is paid once per batch.
        rows = train_rows(data_config, spec, stats, state, states)
        while stop is None or not stop.is_set():
            chunk = [next(rows) for _ in range(per_process)]
            yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}

    signature = {
        k: tf.TensorSpec((per_process,) + v.shape, v.dtype)
        for k, v in _row_signature(spec.seq_len).items()
    }
    ds = tf.data.Dataset.from_generator(batches, output_signature=signature)
    if start_step and not state:
        ds = ds.skip(start_step)
    return ds.prefetch(data_config.prefetch), stats


def eval_chats(data_config: Any, spec: DataSpec, num_examples: int) -> dict[str, list[dict]]:
    """Held-out chats per source: for the built-in mixture, the ``eval`` split (half trained and
    half held-out templates); for a file source, its eval slice (at most ``num_examples``)."""
    if spec.is_builtin:
        return {
            mixture.BUILTIN: [
                builtin_example(data_config, i, "eval", held_out=i % 2 == 1)
                for i in range(num_examples)
            ]
        }
    return {
        s.name: [
            # Eval positions are drawn apart from the training stream's; few-shot exemplars
            # come from the rest of the eval slice.
            s.templated(example, data_config.seed, _EVAL_POSITIONS + i, s.eval, i)
            for i, example in enumerate(s.eval[:num_examples])
        ]
        for s in spec.sources
        if s.eval
    }


def eval_batches(
    data_config: Any, spec: DataSpec, num_examples: int
) -> tuple[dict[str, list[dict[str, np.ndarray]]], packing.PackingStats]:
    """The held-out chats of each source, packed into this process's rows of global batches.

    Every process packs the whole set, which is small, so that all agree on the number of batches;
    each then keeps its own rows of every global batch. The last batch is padded with empty rows.
    """
    stats = packing.PackingStats()
    batches = {}
    for name, chats in eval_chats(data_config, spec, num_examples).items():
        packer = packing.Packer(
            spec.seq_len, data_config.pack_open_rows, spec.tokenizer.pad_id, data_config.truncation
        )
        packer.stats = stats
        encoded = encode_examples(chats, spec, stats, packer.truncation)
        rows = list(packing.pack(encoded, packer, flush=True))
        if not rows:
            continue
        batch = spec.global_batch_size
        rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (-len(rows) % batch)
        per_process = batch // jax.process_count()
        first = jax.process_index() * per_process
        batches[name] = [
            {
                k: np.stack([r[k] for r in rows[start + first : start + first + per_process]])
                for k in packing.ROW_FIELDS
            }
            for start in range(0, len(rows), batch)
        ]
    return batches, stats


def log_stats(
    name: str, stats: packing.PackingStats, seq_len: int, max_dropped_share: float = 1.0
) -> None:
    """Logs what the packer did, with a warning when more examples were dropped than allowed."""
    logging.info("%s data: %s", name, stats.summary(seq_len))
    dropped = sum(stats.dropped.values())
    if dropped > max_dropped_share * max(1, stats.examples):
        logging.warning(
            "%s data: %d of %d examples (%.1f%%) were dropped (%s), more than "
            "data.max_dropped_share=%.1f%%",
            name,
            dropped,
            stats.examples,
            100 * dropped / max(1, stats.examples),
            ", ".join(f"{n} {why}" for why, n in sorted(stats.dropped.items())),
            100 * max_dropped_share,
        )
