"""Held-out data: each source's eval chats, and those chats packed into this process's rows of
global batches, for the eval loss during training and the evaluation tasks."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from itune.data import mixture, packing
from itune.data.encode import encode_examples
from itune.data.spec import DataSpec

_EVAL_POSITIONS = 2**40  # Stream positions of eval chats, apart from the training stream's.


def eval_chats(data_config: Any, spec: DataSpec, num_examples: int) -> dict[str, list[dict]]:
    """Held-out chats per source: for the built-in mixture, the ``eval`` split (half trained and
    half held-out templates); for a file source, its eval slice (at most ``num_examples``)."""
    if spec.is_builtin:
        return {
            mixture.BUILTIN: [
                mixture.builtin_example(data_config, i, "eval", held_out=i % 2 == 1)
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
