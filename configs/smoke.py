"""The main job: instruction-tune a small model from scratch on the built-in task mixture, on CPU.

  itune-train --config=configs/smoke.py --workdir=/tmp/itune_smoke

``--config=configs/smoke.py:runlocal`` shrinks it to a few steps of a tiny model (tests, CI).
Any field can be overridden, e.g. ``--config.optim.learning_rate=3e-3``.
"""

from itune import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False)
    c = configlib.base_config()
    c.data.seq_len = 128
    c.data.global_batch_size = 32
    c.data.builtin.system_prompt_rate = 0.15
    c.model.d_model = 192
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 48
    c.model.mlp_dim = 576
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 30
    c.train.num_steps = 600
    c.checkpoint.every_steps = 300
    c.eval.prompts_per_family = 32
    if arg.runlocal:
        c.data.global_batch_size = 8
        c.data.tokenizer.vocab_size = 256
        c.data.tokenizer.num_corpus_examples = 2000
        c.model.d_model = 64
        c.model.num_layers = 2
        c.model.head_dim = 16
        c.model.mlp_dim = 128
        c.optim.warmup_steps = 1
        c.train.num_steps = 3
        c.train.log_every = 1
        c.eval.num_loss_examples = 16
        c.eval.prompts_per_family = 1
        c.eval.max_new_tokens = 8
        c.checkpoint.every_steps = 2
    c.lock()
    return c
