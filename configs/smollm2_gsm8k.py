"""Fine-tune the pretrained SmolLM2-135M-Instruct on GSM8K, and measure it on held-out problems.

  itune-train --config=configs/smollm2_gsm8k.py --workdir=/tmp/smollm2_gsm8k
  itune-train --config=configs/smollm2_gsm8k.py:lora --workdir=/tmp/smollm2_gsm8k_lora
  itune-eval --config=configs/smollm2_gsm8k.py --checkpoint=<the GGUF>   # the model before
  itune-eval --config=configs/smollm2_gsm8k.py --checkpoint=/tmp/smollm2_gsm8k   # after

The model (weights, tokenizer) comes from ``../shared/models`` (or ``$ITUNE_SHARED``).
``data.eval_examples_per_source`` problems of ``gsm8k/train.jsonl`` (a fixed random subset) are
held out: never trained on, they are the eval loss and the generative task, scored by exact match of the number after
``####`` and by the share of answers in that form. ``:lora`` trains rank-16 adapters on every
projection instead of all weights; ``:runlocal`` is a two-step smoke run.
"""

import os

from itune import configlib

NEEDS_SHARED = True
MODEL = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False, lora=False, steps=40)
    c = configlib.base_config()
    c.init_from = os.path.join(configlib.shared_dir(), MODEL)
    c.data.sources = {
        "gsm8k": {
            "path": os.path.join(configlib.shared_dir(), "data", "gsm8k", "train.jsonl"),
            "format": "alpaca",
            "field_map": {"instruction": "question", "output": "answer"},
        },
    }
    c.data.chat_format = "chatml"  # SmolLM2-Instruct's.
    c.data.seq_len = 512
    c.data.global_batch_size = 8
    c.data.pack_open_rows = 16
    c.data.eval_examples_per_source = 100
    c.train.num_steps = arg.steps
    c.train.log_every = 5
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.0
    c.checkpoint.every_steps = 20
    c.eval.num_loss_examples = 100
    c.eval.exact_match_sources = ("gsm8k",)
    c.eval.prompts_per_task = 100
    c.eval.max_new_tokens = 256
    c.eval.batch_size = 50
    c.eval.prompts_per_source = 0  # The task's transcripts are written in <workdir>/eval.
    if arg.lora:
        c.model.lora_rank = 16
        c.model.lora_alpha = 32.0
        c.model.lora_targets = "q,k,v,o,gate,up,down"
        c.optim.learning_rate = 1e-3
    if arg.runlocal:
        c.data.seq_len = 256
        c.data.global_batch_size = 8  # Divisible by the test suite's 8 devices.
        c.data.eval_examples_per_source = 4
        c.train.num_steps = 2
        c.train.log_every = 1
        c.eval.num_loss_examples = 4
        c.eval.prompts_per_task = 2
        c.eval.max_new_tokens = 8
    c.lock()
    return c
