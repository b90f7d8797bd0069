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
# # Evaluation: generative tasks, scored and plotted
#
# Runs itune's evaluation harness on the pretrained SmolLM2-135M-Instruct (the GGUF file in
# `../shared/models`, or `$ITUNE_SHARED`) over three kinds of task:
#
# - **IFEval** (`ifeval_sample`, shipped with itune): verifiable instructions such as "under 60
#   words" or "no commas", checked strictly and loosely, per prompt and per instruction;
# - **GSM8K exact match**: held-out problems of `configs/smollm2_gsm8k.py`'s data source, scored
#   on the number after `####`, the form its training data teaches;
# - **ROUGE-L**: a prompt set written here from Alpaca demo records, `{"prompt", "reference"}`.
#
# Then a table of the report and a plot of every task's metrics. The same harness is behind
# `itune-eval` and the evaluations inside training. A few prompts per task and short answers
# keep it to under a minute on a laptop CPU; raise `PROMPTS` and `MAX_NEW_TOKENS` for real
# figures.
#
# This file is a jupytext percent-format notebook. Open it in Jupyter with the jupytext
# extension, or make an `.ipynb` with `jupytext --to notebook notebooks/04_evaluation.py`.

# %%
import json
import os
import pathlib
import sys
import tempfile
import time

from itune.cli import common as cli

cli.quiet_tensorflow()

import matplotlib.pyplot as plt
import numpy as np

# The repository root (for `configs/`), from wherever the notebook runs inside it.
REPO = next(
    p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "configs").is_dir()
)
sys.path.insert(0, str(REPO))
NEEDS_SHARED = True
SHARED = pathlib.Path(os.environ.get("ITUNE_SHARED", REPO.parent / "shared"))
assert SHARED.is_dir(), f"this notebook reads a model and data from {SHARED} (set ITUNE_SHARED)"

from configs import smollm2_gsm8k
from itune.convert import model_dir
from itune.data import chat
from itune.evaluation import harness, sampler, tasks
from itune.evaluation.responder import Responder

PROMPTS = 4  # Per task.
MAX_NEW_TOKENS = 96
workdir = pathlib.Path(tempfile.mkdtemp(prefix="itune_eval_"))
print(f"workdir: {workdir}")

# %% [markdown]
# ## The prompt sets
#
# A prompt set is a JSONL file whose records' fields tell its kind; every line is checked when
# it is loaded, and a bad one is reported with its file, line and field. A config's `eval`
# section names prompt sets and the data sources whose held-out slices are scored
# (`tasks.prompt_sets`).

# %%
config = smollm2_gsm8k.get_config("runlocal")
config.eval.prompts_per_task = PROMPTS
config.eval.prompt_sets = ("ifeval_sample",)

alpaca = json.loads((SHARED / "data/llamafactory/alpaca_en_demo.json").read_text())
rouge_path = workdir / "alpaca_rouge.jsonl"
with open(rouge_path, "w", encoding="utf-8") as f:
    short = [r for r in alpaca if not r["input"] and len(r["output"]) < 300][:PROMPTS]
    for record in short:
        f.write(json.dumps({"prompt": record["instruction"], "reference": record["output"]}) + "\n")

prompt_sets = tasks.prompt_sets(config) + [harness.load_prompt_set(str(rouge_path))]
for prompt_set in prompt_sets:
    first = prompt_set.chats()[0][-1]["content"]
    print(
        f"{prompt_set.name} ({prompt_set.kind}, {len(prompt_set.records)} prompts): {first[:90]!r}..."
    )
assert [s.kind for s in prompt_sets] == ["ifeval", "exact_match", "rouge"]

# %% [markdown]
# ## Answer and score
#
# `harness.evaluate` calls the generation function once per prompt set with all its chats; here
# a `Responder` over the imported model, greedy. Each task kind has its own answer length (IFEval
# 1,280 tokens, as published); `max_new_tokens` cuts them all short for this quick run.

# %%
loaded = model_dir.load_model(str(config.init_from))
respond = Responder(
    loaded.graphdef,
    loaded.params,
    loaded.tokenizer,
    chat.get_format(loaded.chat_format),
    sampler.SamplingConfig(max_new_tokens=MAX_NEW_TOKENS),
)
start = time.perf_counter()
report = harness.evaluate(prompt_sets, respond, max_new_tokens=MAX_NEW_TOKENS)
print(
    f"{sum(t.n for t in report.tasks)} prompts answered and scored in "
    f"{time.perf_counter() - start:.1f} s\n"
)
print(report.markdown())
paths = report.write(str(workdir), "smollm2")
print(f"\n{json.dumps(paths, indent=2)}")

summary = json.loads(pathlib.Path(paths["json"]).read_text())
assert set(summary["tasks"]) == {s.name for s in prompt_sets}
assert all(0.0 <= v <= 1.0 for t in summary["tasks"].values() for v in t["metrics"].values())
assert summary["overall"] == np.mean([t.primary for t in report.tasks])

# %% [markdown]
# Every answer is kept with its scores (`<stem>_outputs.jsonl`): here one per task.

# %%
for task in report.tasks:
    example = task.examples[0]
    print(f"--- {task.name} #{example['index']} ---")
    print(f"prompt:   {example['prompt'][:200]!r}")
    print(f"response: {example['response'][:300]!r}")
    print(f"scores:   {example['scores']}")

# %% [markdown]
# ## Per-task results
#
# Each task's metrics, its primary one (the one `overall` averages) hatched. A 135M model
# follows some single instructions but rarely all of a prompt's, and its GSM8K answers need
# more tokens than this quick run gives them to reach a `#### <number>` line.

# %%
fig, axes = plt.subplots(1, len(report.tasks), figsize=(4 * len(report.tasks), 3.5), sharey=True)
for ax, task in zip(np.atleast_1d(axes), report.tasks):
    names = list(task.metrics)
    bars = ax.bar(names, [task.metrics[m] for m in names], color="tab:blue")
    bars[names.index(task.primary_metric)].set_hatch("//")
    ax.bar_label(bars, labels=[f"{task.metrics[m]:.0%}" for m in names])
    ax.set(title=f"{task.name} (n={task.n})", ylim=(0, 1))
    ax.tick_params(axis="x", rotation=30)
np.atleast_1d(axes)[0].set_ylabel("score")
fig.suptitle(f"SmolLM2-135M-Instruct, overall {report.overall:.1%}")
fig.tight_layout()
fig.savefig(workdir / "per_task.png")
plt.show()
