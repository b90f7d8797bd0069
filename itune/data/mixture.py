"""Mixing instruction sources into one deterministic stream of chats, split into data shards.

``config.data.sources`` names file sources and TFDS datasets (entries with a ``tfds`` key), read by
`itune.data.sources`; with none, the stream is the built-in task mixture.

The stream is split into ``data.shards`` shards (`data_shards`): shard ``s`` holds stream
positions ``s, s + shards, ...`` and draws its examples from its own contiguous block of each
source's records, which it replays in a new seeded order every epoch. A process owns a block of
shards and reads only their records, plus each source's held-out eval slice (a fixed random
subset of records, gathered from the processes that read them). Which source position ``i``
comes from is drawn from ``(data.seed, i)`` with the mixture's rates:

- ``weights``: rates proportional to each source's ``weight``;
- ``examples``: proportional to the number of training examples, each capped at
  ``mixture_cap`` examples (FLAN's examples-proportional mixing; 0 means no cap);
- ``temperature``: proportional to ``size ** (1 / mixture_temperature)``.

A source entry may name a template bank (``"templates": "gsm8k"`` or a `TemplateBank` config):
its single-turn examples are then rephrased FLAN-style, zero- or few-shot (`itune.data.templates`).

A shard's stream is a pure function of the seed, the shard count and the position, so a resumed
run replays it exactly, and the global batches do not depend on the number of processes.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import logging
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from itune import runtime
from itune.data import sources as sources_lib
from itune.data import synthetic_tasks
from itune.data import templates as templates_lib
from itune.errors import ConfigError

MIXTURES = ("weights", "examples", "temperature")
BUILTIN = "builtin"


def data_shards(data_config: Any) -> tuple[int, range]:
    """The number of data shards and the ones this process owns (a contiguous block).

    ``data.shards`` (0: one per process) must be a multiple of the number of processes and divide
    the global batch size, whose rows come from every shard alike.
    """
    num_processes = jax.process_count()
    num_shards = data_config.shards or num_processes
    if num_shards % num_processes or data_config.global_batch_size % num_shards:
        raise ConfigError(
            f"data.shards={num_shards} must be a multiple of the number of processes "
            f"({num_processes}) and divide data.global_batch_size={data_config.global_batch_size}"
        )
    per_process = num_shards // num_processes
    first = jax.process_index() * per_process
    return num_shards, range(first, first + per_process)


@dataclasses.dataclass
class Source:
    """One source: this process's training examples by shard (None for the infinite built-in;
    a `sources_lib.RecordPool` for sources read on demand) and the whole held-out eval slice."""

    name: str
    weight: float
    shards: dict[int, Sequence[dict]] | None
    eval: list[dict]
    stats: sources_lib.SourceStats
    size: int = 0  # Training examples over all shards: the source's size in a mixture.
    bank: templates_lib.TemplateBank | None = None  # Rephrases single-turn examples.

    @property
    def is_builtin(self) -> bool:
        return self.shards is None

    def pool(self, shard: int) -> Sequence[dict]:
        """The training examples of ``shard``, which this process must own."""
        if self.shards is None or shard not in self.shards:
            raise ValueError(f"source {self.name!r}: this process does not read shard {shard}")
        return self.shards[shard]

    def templated(
        self, example: dict, seed: int, index: int, pool: Sequence[dict], pool_index: int | None
    ) -> dict:
        """``example`` rephrased by the source's template bank, few-shot exemplars from ``pool``
        (where the example is at ``pool_index``); as is without a bank."""
        if self.bank is None:
            return example
        return templates_lib.template_example(example, self.bank, seed, index, pool, pool_index)

    def __len__(self) -> int:
        return self.size


def load_sources(
    data_config: Any, shards: tuple[int, range] | None = None, *, log_skips: bool = True
) -> list[Source]:
    """Reads this process's share of every configured source (``shards``: `data_shards`); the
    built-in mixture when none is configured. Every process must call it (they exchange the
    eval slices and the shard sizes). Skipped bad records are logged unless not ``log_skips``
    (for a reading whose records are read again, and logged, for training)."""
    if not data_config.sources:
        return [Source(BUILTIN, 1.0, None, [], sources_lib.SourceStats(BUILTIN))]
    num_shards, own = shards or data_shards(data_config)
    entries, banks = {}, {}
    for name, entry in data_config.sources.items():
        values = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        bank = values.pop("templates", None)
        if bank:
            banks[name] = templates_lib.TemplateBank.from_config(bank)
        entries[name] = values
    specs = sources_lib.specs_from_config(entries)
    # Every source is found and holds records before any is read: a missing or empty file stops
    # the run at once, naming it.
    counts = [sources_lib.count_records(spec) for spec in specs]
    for spec, num_records in zip(specs, counts):
        if not num_records:
            raise sources_lib.DataError(
                _where(spec.name, entries[spec.name]),
                "has no records; give it some, or remove it from data.sources",
                reason="no records",
            )
    loaded, local = [], []
    for spec, num_records in zip(specs, counts):
        num_eval = min(data_config.eval_examples_per_source, num_records // 2)
        # The eval slice is a fixed random subset of the records, never trained on.
        order = np.random.default_rng([data_config.seed, 7]).permutation(num_records)
        eval_records = {int(i) for i in order[:num_eval]}
        bounds = [s * num_records // num_shards for s in range(num_shards + 1)]
        # A source that can read a record again by its index keeps only the indices of its
        # training examples, not the examples (see `sources_lib.RecordPool`).
        table = sources_lib.record_table(spec, bounds[own.start], bounds[own.stop])
        pools: dict[int, Any] = {s: [] if table is None else array.array("q") for s in own}
        held_out, shard = [], own.start
        stats = sources_lib.SourceStats(spec.name)
        records = sources_lib.read_records(
            spec,
            data_config.on_bad_example,
            stats,
            bounds[own.start],
            bounds[own.stop],
            log_skips=log_skips,
            table=table,
        )
        for index, example in records:
            if index in eval_records:
                held_out.append((index, example))
                continue
            while index >= bounds[shard + 1]:
                shard += 1
            pools[shard].append(example if table is None else index)
        if table is not None:
            pools = {
                s: sources_lib.RecordPool(table, indices, spec, stats.format)
                for s, indices in pools.items()
            }
        if stats.skipped and log_skips:
            logging.warning("Skipped bad examples in %s", stats.summary())
        loaded.append(Source(spec.name, spec.weight, pools, [], stats, 0, banks.get(spec.name)))
        local.append({"eval": held_out, "sizes": {s: len(p) for s, p in pools.items()}})
    # Every process learns every source's eval slice and the size of each shard.
    for i, source in enumerate(loaded):
        parts = [process[i] for process in runtime.gather_json(local)]
        source.eval = [example for _, example in sorted(e for p in parts for e in p["eval"])]
        sizes = {int(s): n for p in parts for s, n in p["sizes"].items()}
        source.size = sum(sizes.values())
        if empty := sorted(s for s, n in sizes.items() if n == 0):
            raise sources_lib.DataError(
                _where(source.name, entries[source.name]),
                f"has no training examples in data shard(s) {empty} of {num_shards} "
                f"({source.stats.summary()}); give it more examples or use fewer data.shards",
                reason="no training examples",
            )
    return loaded


def _where(name: str, entry: dict) -> str:
    """A source as a user named it: ``data.sources.<name> (<its file or TFDS name>)``."""
    return f"data.sources.{name} ({entry.get('path') or entry.get('tfds')})"


def builtin_example(
    data_config: Any, index: int, split: str, held_out: bool = False, families=None
) -> dict:
    """Example ``index`` of the built-in task mixture's ``split`` (``held_out``: drawn from the
    held-out templates), as ``data.builtin`` configures it."""
    return synthetic_tasks.make_example(
        data_config.seed,
        index,
        split,
        held_out_templates=held_out,
        system_prompt_rate=data_config.builtin.system_prompt_rate,
        families=families or data_config.builtin.families or None,
    )


def mixture_rates(data_config: Any, sources: Sequence[Source]) -> np.ndarray:
    """The share of the stream that each source gets."""
    mode = data_config.mixture
    if mode not in MIXTURES:
        raise ConfigError(f"data.mixture={mode!r}; expected one of {MIXTURES}")
    if mode == "weights" or any(s.is_builtin for s in sources):
        rates = np.array([s.weight for s in sources], np.float64)
    else:
        sizes = np.array([len(s) for s in sources], np.float64)
        if mode == "examples":
            rates = np.minimum(sizes, data_config.mixture_cap or np.inf)
        else:
            rates = sizes ** (1.0 / data_config.mixture_temperature)
    return rates / rates.sum()


def _epoch_order(seed: int, source: int, shard: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 11, source, shard, epoch]).permutation(n)


def train_stream(
    data_config: Any,
    sources: Sequence[Source],
    shard: int = 0,
    num_shards: int = 1,
    start: dict | None = None,
) -> Iterator[tuple[dict, dict]]:
    """Infinite ``(chat, position)`` pairs of one data shard: stream positions ``shard + k *
    num_shards``, from ``start`` (a position yielded earlier) or from the beginning.

    ``position`` is where the stream resumes after that chat: ``{"index", "counts"}``, the next
    position and how many examples the shard has taken from each source.
    """
    rates = mixture_rates(data_config, sources)
    counts = list(start["counts"]) if start else [0] * len(sources)
    if len(counts) != len(sources):
        raise ValueError(f"data state has {len(counts)} sources, the config {len(sources)}")
    first = start["index"] if start else shard
    if first % num_shards != shard:
        raise ValueError(f"data state position {first} is not in shard {shard} of {num_shards}")
    orders: dict[tuple[int, int], np.ndarray] = {}
    for i in itertools.count(first, num_shards):
        if len(sources) == 1:
            s = 0
        else:
            s = int(np.random.default_rng([data_config.seed, 13, i]).choice(len(sources), p=rates))
        k, counts[s] = counts[s], counts[s] + 1
        position = {"index": i + num_shards, "counts": list(counts)}
        source = sources[s]
        if source.is_builtin:
            example = builtin_example(data_config, i, "train")
            yield example | {"source": source.name}, position
            continue
        pool = source.pool(shard)
        epoch, pos = divmod(k, len(pool))
        if (s, epoch) not in orders:
            orders = {key: v for key, v in orders.items() if key[0] != s}  # Keep one epoch.
            orders[(s, epoch)] = _epoch_order(data_config.seed, s, shard, epoch, len(pool))
        pool_index = int(orders[(s, epoch)][pos])
        yield source.templated(pool[pool_index], data_config.seed, i, pool, pool_index), position
