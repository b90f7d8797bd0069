# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The data pipeline: from a chat file to packed, loss-masked batches
#
# What itune trains on, step by step, with real data from `../shared` (or `$ITUNE_SHARED`):
#
# 1. read multi-turn ShareGPT conversations from `data/fastchat/dummy_conversation.json`;
# 2. render one conversation in two chat formats (ChatML with SmolLM2's byte-level BPE, the
#    Mistral `[INST]` template with a SentencePiece BPE) and tokenize it with its loss mask;
# 3. pack the four-source mixture of `configs/sft_mix.py:runlocal` into rows and look at a
#    batch: segments, positions, trained tokens;
# 4. the pipeline's statistics over a few batches, and the lengths of the packed examples.
#
# This file is a jupytext percent-format notebook. Open it in Jupyter with the jupytext
# extension, or make an `.ipynb` with `jupytext --to notebook notebooks/01_data_pipeline.py`.
# The test suite runs it as a notebook (`tests/test_notebooks.py`) in about ten seconds.

# %%
import itertools
import os
import pathlib
import sys
import tempfile
import threading

from itune.cli import common as cli

cli.quiet_tensorflow()

import matplotlib.pyplot as plt
from matplotlib.patches import Patch
import numpy as np

# The repository root (for `configs/`), from wherever the notebook runs inside it.
REPO = next(
    p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "configs").is_dir()
)
sys.path.insert(0, str(REPO))
NEEDS_SHARED = True
SHARED = pathlib.Path(os.environ.get("ITUNE_SHARED", REPO.parent / "shared"))
assert SHARED.is_dir(), f"this notebook reads real data from {SHARED} (set ITUNE_SHARED)"

from configs import sft_mix
from itune.data import chat, inspection, packing, pipeline, sources
from itune.data import spec as data_spec
from itune.data.hf_tokenizer import load_tokenizer_path
from itune.training import feed

pipeline.configure_tensorflow()
workdir = pathlib.Path(tempfile.mkdtemp(prefix="itune_data_"))
print(f"workdir: {workdir}")

# %% [markdown]
# ## 1. A real file
#
# `sources.read_source` reads JSON or JSONL records in Alpaca, chat, ShareGPT or
# prompt/completion form and yields each as `{"messages": [{role, content}, ...]}`, with where
# it came from (`origin`: file and record).

# %%
fastchat = sources.SourceSpec(
    name="chats", path=str(SHARED / "data/fastchat/dummy_conversation.json"), format="sharegpt"
)
examples = list(itertools.islice(sources.read_source(fastchat), 50))
turns = np.bincount([len(e["messages"]) for e in examples])
print(
    f"{len(examples)} conversations; by number of messages: "
    f"{ {n: int(c) for n, c in enumerate(turns) if c} }"
)
example = next(e for e in examples if len(e["messages"]) == 4)
print(example["origin"])
for message in example["messages"]:
    print(f"  {message['role']:>9}: {message['content']}")

# %% [markdown]
# ## 2. One chat, two formats
#
# `chat.render` turns the conversation into pieces of text, each marked as trained or not;
# `chat.tokenize` encodes them and reads the 0/1 loss mask off the trained spans. By default
# (`data.train_on="all_assistant"`) the model learns every assistant answer and its end-of-turn
# token, and nothing else. Below, trained tokens are shown in `[brackets]`.

# %%
formats = {
    "chatml": (
        chat.get_format("chatml"),
        load_tokenizer_path(str(SHARED / "tokenizers/smollm2_bpe")),
    ),
    "mistral": (
        chat.get_format("mistral"),
        load_tokenizer_path(str(SHARED / "tokenizers/bpe_32000_mistral_v1.model")),
    ),
}
answers = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
for name, (fmt, tokenizer) in formats.items():
    pieces = chat.render(example["messages"], fmt)
    ids, mask = chat.tokenize(pieces, tokenizer, fmt)
    print(f"=== {name} ({tokenizer.name}, vocabulary {tokenizer.vocab_size:,}) ===")
    print(f"rendered text: {chat.to_text(pieces)!r}")
    print(f"{len(ids)} tokens, {int(mask.sum())} trained:")
    print(
        "".join(
            f"[{tokenizer.token_text(i)}]" if m else tokenizer.token_text(i)
            for i, m in zip(ids, mask)
        )
    )
    print()
    # Each run of trained tokens is exactly one assistant answer followed by the end of turn.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    runs = [
        "".join(tokenizer.token_text(i) for i in ids[a:b]) for a, b in zip(edges[::2], edges[1::2])
    ]
    assert runs == [answer + fmt.end_of_turn for answer in answers], runs

# %% [markdown]
# ## 3. A packed batch
#
# `configs/sft_mix.py` mixes GSM8K (rephrased by a template bank, some of it 2-shot), Alpaca
# demo data, multi-turn ShareGPT chats and tool-calling chats, tokenized with SmolLM2's BPE;
# `:runlocal` packs them into rows of 256 tokens. Each chat becomes next-token `inputs`,
# `targets` and `loss_mask`; the first-fit packer puts several into a row, told apart by
# `segment_ids` (0 is padding) with `positions` restarting at each. `train_dataset` is the
# endless `tf.data` stream of batches, read ahead by a `BatchIterator` thread; the shared `stop`
# lets `close` end the stream before the reader goes.

# %%
config = sft_mix.get_config("runlocal")
spec = data_spec.make_spec(config.data, str(workdir))
stop = threading.Event()
dataset, _ = pipeline.train_dataset(config.data, spec, stop=stop)
batches = feed.BatchIterator(dataset, stop=stop)
batch = next(batches)
batches.close()
print({k: v.shape for k, v in batch.items()})
print(f"sources: {spec.source_names}, chat format {spec.chat_format.name}, seq_len {spec.seq_len}")

segments, mask, positions = batch["segment_ids"], batch["loss_mask"], batch["positions"]
assert not mask[segments == 0].any(), "padding is never trained on"
assert (positions[segments == 0] == 0).all()
starts = np.diff(segments, axis=1, prepend=0) != 0
assert (positions[starts & (segments > 0)] == 0).all(), "positions restart at each segment"
same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
assert (batch["targets"][:, :-1][same] == batch["inputs"][:, 1:][same]).all(), "next-token pairs"
for row in range(2):
    print(
        f"--- row {row}: {segments[row].max()} segments, {int(mask[row].sum())} trained tokens ---"
    )
    print(inspection.format_row(spec.tokenizer, {k: v[row] for k, v in batch.items()}, color=False))

# %% [markdown]
# The whole batch at a glance: the source of each token, packed examples separated by white
# lines (padding left white), and the tokens trained on.

# %%
names = spec.source_names
colours = plt.get_cmap("tab10", len(names))
fig, (ax_sources, ax_mask) = plt.subplots(2, 1, figsize=(11, 4.5), sharex=True)
ax_sources.imshow(
    np.ma.masked_where(segments == 0, batch["source_ids"]),
    aspect="auto",
    cmap=colours,
    vmin=-0.5,
    vmax=len(names) - 0.5,
    interpolation="nearest",
)
for row, column in zip(*np.nonzero(starts & (segments > 0))):
    ax_sources.plot([column - 0.5] * 2, [row - 0.5, row + 0.5], color="white", linewidth=2)
ax_sources.legend(
    handles=[Patch(color=colours(i), label=name) for i, name in enumerate(names)],
    loc="upper left",
    bbox_to_anchor=(1.0, 1.0),
)
ax_sources.set(title="source of each token, one box per packed example", ylabel="row")
ax_mask.imshow(mask, aspect="auto", cmap="Greens", interpolation="nearest")
ax_mask.set(title="loss_mask (trained tokens)", xlabel="position", ylabel="row")
fig.tight_layout()
fig.savefig(workdir / "packed_batch.png")
plt.show()

# %% [markdown]
# ## 4. Statistics
#
# The same stream as a row iterator (`train_rows`, what `itune-inspect` reads), over four
# batches: examples read, packed, truncated to `seq_len` and dropped (an example whose answers
# were all cut off has no trained token left), tokens, the trained share and packing efficiency.

# %%
stats = packing.PackingStats()
rows = list(
    itertools.islice(pipeline.train_rows(config.data, spec, stats), 4 * spec.global_batch_size)
)
print(inspection.statistics(stats, spec.seq_len, dict(stats.sources)))
assert stats.rows == len(rows) and stats.packed <= stats.examples
assert stats.trained_tokens == sum(int(r["loss_mask"].sum()) for r in rows)

# %% [markdown]
# Lengths of the packed examples by source. At this toy `seq_len` of 256 many examples are cut
# (those at the right edge); the full config packs rows of 2048 tokens.

# %%
lengths = {name: [] for name in spec.source_names}
for row in rows:
    for segment in range(1, row["segment_ids"].max() + 1):
        where = row["segment_ids"] == segment
        lengths[spec.source_names[row["source_ids"][where][0]]].append(int(where.sum()))
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.hist(list(lengths.values()), bins=16, range=(0, spec.seq_len), stacked=True, label=list(lengths))
ax.set(xlabel="tokens per packed example", ylabel="examples", title="Example lengths by source")
ax.legend()
fig.tight_layout()
fig.savefig(workdir / "example_lengths.png")
plt.show()
for name, values in lengths.items():
    print(f"{name:>7}: {len(values)} examples, median {np.median(values):.0f} tokens")
