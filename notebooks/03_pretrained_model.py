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
# # Bring a pretrained model: SmolLM2-135M-Instruct from GGUF
#
# Imports a real instruction-tuned model, `SmolLM2-135M-Instruct.Q4_1.gguf` from
# `../shared/models` (or `$ITUNE_SHARED`): its weights are dequantised into the itune decoder,
# and its tokenizer and chat template come from the file's metadata. Then a short scripted chat
# with it, and the sharding plan of its parameters on a device mesh, beside Llama 3 8B's, for
# each of itune's sharding strategies. About twenty seconds on a laptop CPU.
#
# This file is a jupytext percent-format notebook. Open it in Jupyter with the jupytext
# extension, or make an `.ipynb` with `jupytext --to notebook notebooks/03_pretrained_model.py`.

# %%
import os
import pathlib
import sys
import tempfile
import time

from itune.cli import common as cli

cli.quiet_tensorflow()

from flax import nnx
import matplotlib.pyplot as plt
import numpy as np

# The repository root (for `configs/`), from wherever the notebook runs inside it.
REPO = next(
    p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "configs").is_dir()
)
sys.path.insert(0, str(REPO))
NEEDS_SHARED = True
SHARED = pathlib.Path(os.environ.get("ITUNE_SHARED", REPO.parent / "shared"))
GGUF = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
assert GGUF.is_file(), f"this notebook reads {GGUF} (set ITUNE_SHARED)"

from itune import configlib, sharding
from itune.cli import chat as itune_chat, plan as plan_lib
from itune.convert import model_dir, weights
from itune.data import chat
from itune.evaluation import sampler
from itune.evaluation.responder import Responder
from itune.model import presets
from itune.model.decoder import ModelConfig

workdir = pathlib.Path(tempfile.mkdtemp(prefix="itune_pretrained_"))
print(f"workdir: {workdir}")

# %% [markdown]
# ## Import
#
# `load_model` tells a GGUF file, a Hugging Face folder, an itune model folder and a training
# workdir apart, and returns the model's config, its parameters (on a one-device mesh unless
# given another), its tokenizer and its chat format.

# %%
start = time.perf_counter()
loaded = model_dir.load_model(str(GGUF))
print(f"loaded in {time.perf_counter() - start:.1f} s")
config = loaded.config
print(
    f"{config.num_params() / 1e6:.1f}M parameters: {config.num_layers} layers, d_model "
    f"{config.d_model}, {config.num_heads} query / {config.num_kv_heads} key-value heads of "
    f"{config.head_dim}, MLP {config.mlp_dim}, vocabulary {config.vocab_size:,}, "
    f"RoPE theta {config.rope_theta:,.0f}, tied embeddings {config.tie_embeddings}"
)
print(
    f"chat format: {chat.get_format(loaded.chat_format).name}; tokenizer: {loaded.tokenizer.name}"
)
# The layers are stacked (scanned over), so each weight has a leading layer dimension.
for path, variable in nnx.to_flat_state(loaded.params):
    print(f"  {'/'.join(map(str, path)):<24} {str(variable.shape):<20} {variable.dtype}")
assert config.num_layers == 30 and config.d_model == 576 and config.vocab_size == 49_152
assert abs(config.num_params() - 134.5e6) < 0.1e6

# %% [markdown]
# The prompt the model sees, in its own chat template (the GGUF's: ChatML), ending with an open
# assistant turn:

# %%
fmt = chat.get_format(loaded.chat_format)
messages = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
prompt = chat.prompt_ids(messages, loaded.tokenizer, fmt)
print(f"{len(prompt)} tokens:\n{loaded.tokenizer.decode(prompt)}")

# %% [markdown]
# ## Chat
#
# `itune.cli.chat.converse` is the loop behind `itune-chat`: each line is a user turn, answered with
# the whole conversation so far as context. Here the lines are scripted; greedy decoding of at
# most 48 new tokens, stopping at `<|im_end|>`.

# %%
respond = Responder(
    loaded.graphdef, loaded.params, loaded.tokenizer, fmt, sampler.SamplingConfig(max_new_tokens=48)
)
lines = ["What is the capital of France?", "And of Italy?"]
conversation = itune_chat.converse(
    respond, lines, lambda text: print(f"assistant: {text}", end=""), system=messages[0]["content"]
)
assert [m["role"] for m in conversation] == ["system"] + ["user", "assistant"] * len(lines)
assert "Paris" in conversation[2]["content"], conversation[2]["content"]

# %% [markdown]
# ## The sharding plan
#
# Layers name their dimensions (`embed`, `mlp`, `heads`, `vocab`...); a rules table maps the
# names onto the mesh axes `data`, `fsdp` and `tensor`. `sharding.plan` lays an abstract
# parameter state onto a mesh, here an abstract mesh of 8 devices (fsdp 4 x tensor 2) that
# needs no devices at all: each parameter's logical axes, mesh axes and bytes per device. It is
# what `itune-plan` prints (`format_plan`):

# %%
plan_config = configlib.base_config()
plan_config.model.preset = "smollm2-135m"
plan_config.mesh.data, plan_config.mesh.fsdp, plan_config.mesh.tensor = 1, 4, 2
print(plan_lib.format_plan(plan_config, num_devices=8))

# %% [markdown]
# The same for the imported model through `sharding.plan` directly, under each strategy of
# `sharding.STRATEGIES` (`dp`: replicated, `fsdp`: split along `embed`, `tp`: split along heads,
# MLP and vocabulary, `fsdp_tp`: both), beside the Llama 3 8B preset. A dimension that a mesh
# axis does not divide stays whole (SmolLM2's 9 query heads over `tensor` 2, for instance).

# %%
mesh = sharding.abstract_mesh((1, 4, 2))
models = {
    "SmolLM2-135M (imported)": config,
    "Llama 3 8B (preset)": ModelConfig(**presets.preset("llama3-8b")),
}
per_device = {}
for name, model_config in models.items():
    for strategy, rules in sharding.STRATEGIES.items():
        _, abstract = weights.abstract_params(model_config, rules)
        rows = sharding.plan(abstract, mesh, rules)
        per_device[name, strategy] = sum(r["bytes_per_device"] for r in rows)
        total = sum(int(np.prod(r["shape"])) * np.dtype(r["dtype"]).itemsize for r in rows)
        if strategy == "dp":
            assert per_device[name, strategy] == total, "data parallel replicates everything"
    print(
        f"{name}: "
        + ", ".join(f"{s} {per_device[name, s] / 2**20:,.0f} MiB" for s in sharding.STRATEGIES)
        + " of parameters per device"
    )
    assert per_device[name, "fsdp_tp"] < per_device[name, "fsdp"] < per_device[name, "dp"]

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax, name in zip(axes, models):
    values = [per_device[name, s] / 2**20 for s in sharding.STRATEGIES]
    bars = ax.bar(list(sharding.STRATEGIES), values, color="tab:blue")
    ax.bar_label(bars, fmt="{:,.0f}")
    ax.set(title=f"{name}: parameters per device", ylabel="MiB (float32)", xlabel="strategy")
fig.suptitle("8 devices as fsdp 4 x tensor 2")
fig.tight_layout()
fig.savefig(workdir / "sharding_plan.png")
plt.show()
