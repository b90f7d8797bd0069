# %% [markdown]
# # itune quickstart
#
# Instruction-tune a tiny model on the built-in task mixture, look at a packed batch and at the
# model's answers. Percent-format notebook: open it with Jupyter (jupytext) or run it as a script.
# `RUNLOCAL = True` keeps it to a few seconds; set it to False for the full smoke run.

# %%
import json
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from configs import smoke
from itune.data import pipeline
from itune.training.trainer import train_and_evaluate

RUNLOCAL = True
workdir = pathlib.Path(tempfile.mkdtemp(prefix="itune_quickstart_"))
config = smoke.get_config("runlocal" if RUNLOCAL else None)

# %% [markdown]
# ## A packed batch
# Each row holds several chats; `segment_ids` tell them apart and `loss_mask` marks the assistant
# tokens that are trained on.

# %%
spec = pipeline.make_spec(config.data, str(workdir))
dataset, stats = pipeline.train_dataset(config.data, spec)
batches = pipeline.BatchIterator(dataset)
batch = next(batches)
batches.close()
row = 0
for segment in np.unique(batch["segment_ids"][row]):
    if segment == 0:
        continue
    where = batch["segment_ids"][row] == segment
    trained = batch["targets"][row][where & (batch["loss_mask"][row] == 1)]
    print(f"segment {segment}: {where.sum()} tokens, trains on {spec.tokenizer.decode(trained)!r}")
print(stats.summary(config.data.seq_len))

# %% [markdown]
# ## Train and evaluate

# %%
results = train_and_evaluate(config, str(workdir))
print(
    json.dumps(
        {k: results[k]["exact_match"] for k in ("trained_templates", "held_out_templates")},
        indent=2,
    )
)
