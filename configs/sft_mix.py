"""Instruction-tune on a mixture of real chat data from ``../shared`` (or ``$ITUNE_SHARED``).

  itune-inspect --config=configs/sft_mix.py --workdir=/tmp/itune_mix
  itune-train --config=configs/sft_mix.py --workdir=/tmp/itune_mix

GSM8K (rephrased by a FLAN-style template bank, a third of it 2-shot), Alpaca-GPT4 demo data,
multi-turn ShareGPT conversations and tool-calling chats, tokenized with SmolLM2's byte-level BPE
and packed into rows of 2048 tokens. ``:runlocal`` shrinks it to a few steps of a tiny model.
"""

import os

from itune import configlib

NEEDS_SHARED = True


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False)
    data = os.path.join(configlib.shared_dir(), "data")
    c = configlib.base_config()
    c.data.sources = {
        "gsm8k": {
            "path": f"{data}/gsm8k/train.jsonl",
            "format": "alpaca",
            "field_map": {"instruction": "question", "output": "answer"},
            "templates": {"bank": "gsm8k", "few_shot": 2, "few_shot_rate": 0.33},
        },
        "alpaca": {"path": f"{data}/llamafactory/alpaca_en_demo.json", "format": "alpaca"},
        "chats": {"path": f"{data}/fastchat/dummy_conversation.json", "format": "sharegpt"},
        "tools": {"path": f"{data}/llamafactory/glaive_toolcall_en_demo.json"},
    }
    c.data.mixture = "examples"
    c.data.mixture_cap = 2000  # GSM8K would otherwise be over half of the mixture.
    c.data.chat_format = "chatml"
    c.data.tokenizer.path = os.path.join(configlib.shared_dir(), "tokenizers", "smollm2_bpe")
    c.data.seq_len = 2048
    c.data.global_batch_size = 8
    c.data.pack_open_rows = 32
    c.model.d_model = 256
    c.model.num_layers = 4
    c.model.head_dim = 64
    c.model.mlp_dim = 768
    c.train.num_steps = 200
    c.checkpoint.every_steps = 100
    c.eval.num_loss_examples = 32
    if arg.runlocal:
        c.data.seq_len = 256
        c.data.global_batch_size = 8
        c.data.pack_open_rows = 8
        c.data.eval_examples_per_source = 4
        c.model.d_model = 64
        c.model.num_layers = 2
        c.model.head_dim = 16
        c.model.mlp_dim = 128
        c.train.num_steps = 3
        c.train.log_every = 1
        c.checkpoint.every_steps = 2
        c.eval.num_loss_examples = 4
    c.lock()
    return c
