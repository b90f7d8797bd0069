"""The input pipeline: chats -> encoded (`itune.data.encode`) -> packed rows -> sharded batches.

Reads ``config.data``, as the run's `DataSpec` (`itune.data.spec`) describes it: its sources and
tokenizer (`itune.data.vocabulary`). The training stream is infinite and a pure function of the
seed and the example index, so a run resumed at step k starts again exactly at batch k. In a
multi-process run each process reads and renders only its data shards (`mixture.data_shards`),
and `global_batch` assembles the global `jax.Array` from the per-process parts. Held-out chats
and their batches are `itune.data.held_out`'s.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf

from itune.data import mixture, packing
from itune.data.encode import encode_examples
from itune.data.spec import DataSpec


def configure_tensorflow() -> None:
    """Keeps TensorFlow off accelerators and its thread pools small, so XLA keeps the cores."""
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # Already initialised in this process: the first setting stands.
        pass


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
