"""Mixing instruction sources into one deterministic stream of chats.

``config.data.sources`` names file sources (`itune.data.sources`) and TFDS datasets (entries with
a ``tfds`` key, `itune.data.tfds_sources`); with none, the stream is the built-in task mixture.
A source is read once, split into a held-out eval slice and a
training part, and replayed in a new seeded order every epoch. Which source example ``i`` of the
stream comes from is drawn from ``(data.seed, i)`` with the mixture's rates:

- ``weights``: rates proportional to each source's ``weight``;
- ``examples``: proportional to the number of training examples, each capped at
  ``mixture_cap`` examples (FLAN's examples-proportional mixing; 0 means no cap);
- ``temperature``: proportional to ``size ** (1 / mixture_temperature)``.

A source entry may name a template bank (``"templates": "gsm8k"`` or a `TemplateBank` config):
its single-turn examples are then rephrased FLAN-style, zero- or few-shot (`itune.data.templates`).

The stream is a pure function of the seed and the position, so a resumed run replays it exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Iterator, Sequence

import numpy as np

from itune.data import sources as sources_lib
from itune.data import tasks, tfds_sources
from itune.data import templates as templates_lib

MIXTURES = ("weights", "examples", "temperature")
BUILTIN = "builtin"


@dataclasses.dataclass
class Source:
    """One source's training and eval examples (``train is None`` for the infinite built-in)."""

    name: str
    weight: float
    train: list[dict] | None
    eval: list[dict]
    stats: sources_lib.SourceStats
    bank: templates_lib.TemplateBank | None = None  # Rephrases single-turn examples.

    def templated(self, example: dict, seed: int, index: int, pool_index: int | None) -> dict:
        """``example`` rephrased by the source's template bank (as is without one)."""
        if self.bank is None:
            return example
        return templates_lib.template_example(
            example, self.bank, seed, index, self.train or (), pool_index
        )

    def __len__(self) -> int:
        return len(self.train) if self.train is not None else 0


def load_sources(data_config: Any) -> list[Source]:
    """Reads every configured source; the built-in mixture when none is configured."""
    if not data_config.sources:
        return [Source(BUILTIN, 1.0, None, [], sources_lib.SourceStats(BUILTIN))]
    loaded = []
    entries, banks = {}, {}
    for name, entry in data_config.sources.items():
        values = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        bank = values.pop("templates", None)
        if bank:
            banks[name] = templates_lib.TemplateBank.from_config(bank)
        entries[name] = values
    for spec in tfds_sources.specs_from_config(entries):
        stats = sources_lib.SourceStats(spec.name)
        examples = list(tfds_sources.read_any_source(spec, data_config.on_bad_example, stats))
        if stats.skipped:
            logging.warning("Skipped bad examples in %s", stats.summary())
        num_eval = min(data_config.eval_examples_per_source, len(examples) // 2)
        # The eval slice is a fixed random subset, never trained on.
        order = np.random.default_rng([data_config.seed, 7]).permutation(len(examples))
        eval_set = {int(i) for i in order[:num_eval]}
        train = [ex for i, ex in enumerate(examples) if i not in eval_set]
        held_out = [examples[int(i)] for i in sorted(eval_set)]
        if not train:
            raise ValueError(f"data.sources.{spec.name}: {spec.path} has no training examples")
        loaded.append(Source(spec.name, spec.weight, train, held_out, stats, banks.get(spec.name)))
    return loaded


def mixture_rates(data_config: Any, sources: Sequence[Source]) -> np.ndarray:
    """The share of the stream that each source gets."""
    mode = data_config.mixture
    if mode not in MIXTURES:
        raise ValueError(f"data.mixture={mode!r}; expected one of {MIXTURES}")
    if mode == "weights" or any(s.train is None for s in sources):
        rates = np.array([s.weight for s in sources], np.float64)
    else:
        sizes = np.array([len(s) for s in sources], np.float64)
        if mode == "examples":
            rates = np.minimum(sizes, data_config.mixture_cap or np.inf)
        else:
            rates = sizes ** (1.0 / data_config.mixture_temperature)
    return rates / rates.sum()


def _epoch_order(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 11, source, epoch]).permutation(n)


def train_stream(
    data_config: Any,
    sources: Sequence[Source],
    process_index: int = 0,
    process_count: int = 1,
    start: dict | None = None,
) -> Iterator[tuple[dict, dict]]:
    """Infinite ``(chat, position)`` pairs of this process: stream positions ``process_index +
    k * process_count``, from ``start`` (a position yielded earlier) or from the beginning.

    ``position`` is where the stream resumes after that chat: ``{"index", "counts"}``. Every
    process draws the source of every position (cheap), so each source's counter agrees across
    processes, and renders only its own positions.
    """
    rates = mixture_rates(data_config, sources)
    counts = list(start["counts"]) if start else [0] * len(sources)
    if len(counts) != len(sources):
        raise ValueError(f"data state has {len(counts)} sources, the config {len(sources)}")
    orders: dict[tuple[int, int], np.ndarray] = {}
    for i in itertools.count(start["index"] if start else 0):
        if len(sources) == 1:
            s = 0
        else:
            s = int(np.random.default_rng([data_config.seed, 13, i]).choice(len(sources), p=rates))
        k, counts[s] = counts[s], counts[s] + 1
        if i % process_count != process_index:
            continue
        position = {"index": i + 1, "counts": list(counts)}
        source = sources[s]
        if source.train is None:
            example = tasks.make_example(
                data_config.seed,
                k,
                "train",
                system_prompt_rate=data_config.builtin.system_prompt_rate,
                families=data_config.builtin.families or None,
            )
            yield example | {"source": source.name}, position
            continue
        epoch, pos = divmod(k, len(source))
        if (s, epoch) not in orders:
            orders = {key: v for key, v in orders.items() if key[0] != s}  # Keep one epoch.
            orders[(s, epoch)] = _epoch_order(data_config.seed, s, epoch, len(source))
        pool_index = int(orders[(s, epoch)][pos])
        yield source.templated(source.train[pool_index], data_config.seed, i, pool_index), position
