"""Packing tokenized examples into fixed-length rows with segment ids and positions.

Each example becomes next-token pairs (``inputs = ids[:-1]``, ``targets = ids[1:]``, the loss
mask shifted with the targets) before packing, so no target ever crosses into another segment.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Iterator

import numpy as np

# source_ids: which mixture source each token's example came from (for per-source metrics).
ROW_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids")
# What happens to an example longer than a row; see `Packer`.
TRUNCATION = ("truncate_response", "truncate_prompt_left", "drop")


@dataclasses.dataclass
class PackingStats:
    """What happened to the examples that reached the packer (counts, never silent)."""

    examples: int = 0
    packed: int = 0
    truncated: int = 0
    # The longest example in tokens before any truncation here (a chat cut to a window before
    # tokenizing, `itune.data.encode`, counts at its window's length, over the row's).
    longest: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    sources: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def efficiency(self, seq_len: int) -> float:
        """Share of row positions that hold a real token rather than padding."""
        return self.tokens / max(1, self.rows * seq_len)

    def summary(self, seq_len: int) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.examples} examples: {self.packed} packed into {self.rows} rows "
            f"({self.efficiency(seq_len):.1%} non-padding), {self.truncated} truncated, "
            f"dropped: {dropped}"
            + (
                f"; per source: {dict(sorted(self.sources.items()))}"
                if len(self.sources) > 1
                else ""
            )
        )


def to_next_token(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """``ids [n]`` and ``mask [n]`` -> inputs, targets and loss mask, each of length n - 1.

    >>> to_next_token(np.array([2, 7, 8, 9]), np.array([0, 0, 1, 1]))
    {'inputs': array([2, 7, 8]), 'targets': array([7, 8, 9]), 'loss_mask': array([0, 1, 1])}
    """
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


class Packer:
    """First-fit packing into at most ``max_open_rows`` rows at a time.

    An example goes into the first open row with room for it; when none has room and the buffer is
    full, the fullest open row is emitted. An example longer than ``seq_len`` is, by
    ``truncation``, cut at the end (``truncate_response``), cut at the start
    (``truncate_prompt_left``) or dropped (``drop``), and counted; an example left with no trained
    token is dropped and counted.
    """

    def __init__(
        self,
        seq_len: int,
        max_open_rows: int = 8,
        pad_id: int = 0,
        truncation: str = "truncate_response",
    ):
        if truncation not in TRUNCATION:
            raise ValueError(f"data.truncation={truncation!r}; expected one of {TRUNCATION}")
        self.seq_len = seq_len
        self.max_open_rows = max_open_rows
        self.pad_id = pad_id
        self.truncation = truncation
        self.stats = PackingStats()
        self._open: list[list[dict[str, np.ndarray]]] = []
        self._fill: list[int] = []

    def add(self, example: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Adds one next-token example; returns the rows it completed (possibly none)."""
        self.stats.examples += 1
        n = len(example["inputs"])
        self.stats.longest = max(self.stats.longest, n)
        if n == 0:
            self.stats.dropped["empty"] += 1
            return []
        if n > self.seq_len:
            if self.truncation == "drop":
                self.stats.dropped["longer than seq_len"] += 1
                return []
            # truncate_response keeps the start (cutting the end of the last answer);
            # truncate_prompt_left keeps the end (cutting the start of the prompt).
            keep = (
                slice(None, self.seq_len)
                if self.truncation == "truncate_response"
                else (slice(n - self.seq_len, None))
            )
            example = {k: v[keep] for k, v in example.items()}
            n = self.seq_len
            self.stats.truncated += 1
        if not example["loss_mask"].any():
            self.stats.dropped["no trained token"] += 1
            return []
        self.stats.packed += 1
        for i, fill in enumerate(self._fill):
            if fill + n <= self.seq_len:
                self._open[i].append(example)
                self._fill[i] += n
                return []
        emitted = []
        if len(self._open) >= self.max_open_rows:
            fullest = int(np.argmax(self._fill))
            emitted.append(self._emit(fullest))
        self._open.append([example])
        self._fill.append(n)
        return emitted

    def state(self) -> dict:
        """The open rows and counters (part of a checkpoint; arrays are shared, not copied)."""
        return {
            "open": [list(row) for row in self._open],
            # Not dataclasses.asdict, which rebuilds a Counter from (key, count) pairs as keys.
            "stats": {
                f.name: dict(v) if isinstance(v := getattr(self.stats, f.name), dict) else v
                for f in dataclasses.fields(self.stats)
            },
        }

    def restore(self, state: dict) -> None:
        """Continues from a `state` taken earlier, possibly in another process."""
        self._open = [
            [{k: np.asarray(v, np.int32) for k, v in ex.items()} for ex in row]
            for row in state["open"]
        ]
        self._fill = [sum(len(ex["inputs"]) for ex in row) for row in self._open]
        stats = dict(state["stats"])
        for key in ("dropped", "sources"):
            stats[key] = collections.Counter(stats.get(key, {}))
        self.stats.__dict__.update(stats)

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Emits every open row (at the end of a finite stream)."""
        return [self._emit(0) for _ in range(len(self._open))]

    def _emit(self, i: int) -> dict[str, np.ndarray]:
        examples = self._open.pop(i)
        self._fill.pop(i)
        row = {
            k: np.full(self.seq_len, self.pad_id if k in ("inputs", "targets") else 0, np.int32)
            for k in ROW_FIELDS
        }
        start = 0
        for segment, ex in enumerate(examples, start=1):
            end = start + len(ex["inputs"])
            for k in ("inputs", "targets", "loss_mask", "source_ids"):
                if k in ex:
                    row[k][start:end] = ex[k]
            row["segment_ids"][start:end] = segment
            row["positions"][start:end] = np.arange(end - start)
            start = end
        self.stats.rows += 1
        self.stats.tokens += start
        self.stats.trained_tokens += int(row["loss_mask"].sum())
        return row


def pack(
    examples: Iterable[dict[str, np.ndarray]], packer: Packer, flush: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """Streams packed rows from next-token examples."""
    for example in examples:
        yield from packer.add(example)
    if flush:
        yield from packer.flush()
