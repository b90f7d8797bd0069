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
# # Train a small model, plot its metrics, sample from it
#
# Instruction-tunes a tiny decoder from scratch on the built-in task mixture
# (`configs/smoke.py:runlocal`, lengthened to 120 steps) with the same
# `train_and_evaluate(config, workdir)` that `itune-train` calls; plots loss and token accuracy
# from the run's `metrics.jsonl`; then loads the last checkpoint and answers prompts, greedily and
# by sampling. Needs no download and nothing from `../shared`; about half a minute on a laptop
# CPU. `RUNLOCAL = False` trains the full smoke config instead (600 steps, about five minutes).
#
# This file is a jupytext percent-format notebook. Open it in Jupyter with the jupytext
# extension, or make an `.ipynb` with `jupytext --to notebook notebooks/02_train_and_sample.py`.

# %%
import json
import pathlib
import sys
import tempfile

from itune.cli import common as cli

cli.quiet_tensorflow()

import matplotlib.pyplot as plt

# The repository root (for `configs/`), from wherever the notebook runs inside it.
REPO = next(
    p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "configs").is_dir()
)
sys.path.insert(0, str(REPO))

from configs import smoke
from itune.convert import model_dir
from itune.data import chat
from itune.evaluation import sampler
from itune.evaluation.responder import Responder
from itune.training.trainer import train_and_evaluate

RUNLOCAL = True
workdir = pathlib.Path(tempfile.mkdtemp(prefix="itune_train_"))
config = smoke.get_config("runlocal" if RUNLOCAL else None)
if RUNLOCAL:
    # Long enough for the curves to mean something, with an evaluation halfway.
    config.train.num_steps = 120
    config.train.log_every = 5
    config.eval.every_steps = 60
    config.optim.warmup_steps = 10
    config.optim.learning_rate = 1e-2
    config.checkpoint.every_steps = 0
print(f"workdir: {workdir}")
print(
    f"model: {config.model.d_model=}, {config.model.num_layers=}; "
    f"data: {config.data.global_batch_size} rows x {config.data.seq_len} tokens"
)

# %% [markdown]
# ## Train
#
# The run trains a SentencePiece vocabulary on the task corpus (cached in
# `<workdir>/tokenizer`), trains, evaluates (eval loss, and exact match of greedy answers per
# task family on trained and held-out instruction templates) and saves a checkpoint.

# %%
results = train_and_evaluate(config, str(workdir))
print(
    json.dumps(
        {
            group: results[group]["exact_match"]
            for group in ("trained_templates", "held_out_templates")
        },
        indent=2,
    )
)
print(sorted(p.name for p in workdir.iterdir()))

# %% [markdown]
# ## Loss and accuracy from `metrics.jsonl`
#
# One JSON line per log step: `{"step", "train": {...}}` with the interval's mean loss, token
# accuracy, learning rate, gradient norm, throughput...; and one per evaluation,
# `{"step", "eval": {...}}`.

# %%
lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
train = [(m["step"], m["train"]) for m in lines if "train" in m]
evals = [(m["step"], m["eval"]) for m in lines if "eval" in m]
print(f"{len(train)} train lines, {len(evals)} eval lines; train keys: {sorted(train[0][1])}")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for ax, key, title in zip(axes, ("loss", "accuracy"), ("loss", "token accuracy")):
    ax.plot([s for s, _ in train], [m[key] for _, m in train], label="train")
    ax.plot([s for s, _ in evals], [m[key] for _, m in evals], "o", label="eval")
    ax.set(xlabel="step", title=title)
    ax.legend()
axes[2].plot([s for s, _ in train], [m["learning_rate"] for _, m in train])
axes[2].set(xlabel="step", title="learning rate (warmup, cosine)")
fig.tight_layout()
fig.savefig(workdir / "training_curves.png")
plt.show()

first, last = train[0][1], train[-1][1]
print(
    f"loss {first['loss']:.3f} -> {last['loss']:.3f}, "
    f"accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}"
)
assert last["loss"] < 0.8 * first["loss"], "the loss should fall"
assert last["accuracy"] > first["accuracy"], "the token accuracy should rise"
assert evals[-1][0] == config.train.num_steps

# %% [markdown]
# ## Sample
#
# `load_model` reads the workdir's newest checkpoint with the run's tokenizer and chat format
# (it also reads itune model folders, Hugging Face folders and GGUF files). A `Responder` turns
# chats into answers through the jitted sampler (prefill, then decoding over a key/value cache),
# stopping at the format's end-of-turn token.

# %%
loaded = model_dir.load_model(str(workdir))
fmt = chat.get_format(loaded.chat_format)
print(
    f"{loaded.config.num_params():,} parameters, {fmt.name} format, "
    f"vocabulary {loaded.tokenizer.vocab_size}"
)
# Instructions in the phrasings of the task families (a tiny model after 120 steps gets few
# right; the full smoke run's table is in the README).
prompts = [
    "What is 3 + 4?",
    "Reverse the list: cat dog sun",
    "Sort in ascending order: 5 2 9 1",
    "Convert to uppercase: red fox",
]
chats = [[{"role": "user", "content": p}] for p in prompts]
greedy = Responder(
    loaded.graphdef, loaded.params, loaded.tokenizer, fmt, sampler.SamplingConfig(max_new_tokens=24)
)
for prompt, answer in zip(prompts, greedy(chats)):
    print(f"{prompt!r} -> {answer!r}")

# %% [markdown]
# Sampling instead of greedy decoding: temperature, top-k and nucleus (top-p). Each prompt draws
# from its own key (seed and prompt index), so a prompt's answer does not depend on what else is
# in the batch, and the same seed gives the same answers.

# %%
sampling = sampler.SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, seed=1)
sampled = Responder(loaded.graphdef, loaded.params, loaded.tokenizer, fmt, sampling)
first_draw = sampled(chats[:1] * 4)
for answer in first_draw:
    print(f"{prompts[0]!r} -> {answer!r}")
assert sampled(chats[:1] * 4) == first_draw, "the same seed draws the same answers"
