"""Instruction-tune Llama 3 8B on the GSM8K and chat mixture of ``../shared``, 4096-token rows.

  itune-plan --config=configs/llama3_8b_sft.py --devices=64

Shaped for a TPU pod slice (fsdp over every chip, bfloat16 computation, layers rematerialised).
The weights come from a Hugging Face checkpoint (``itune-convert``); ``:runlocal`` shrinks the
model to the ``tiny`` preset for a few CPU steps.
"""

from itune import configlib

sft_mix = configlib.sibling(__file__, "sft_mix")

NEEDS_SHARED = True  # The data mixture of sft_mix.


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False)
    c = sft_mix.get_config("runlocal" if arg.runlocal else None)
    with c.unlocked():
        if arg.runlocal:
            c.model = configlib.model_section("tiny")
        else:
            c.model = configlib.model_section("llama3-8b", dtype="bfloat16", remat="save_dots")
            c.data.seq_len = 4096
            c.data.global_batch_size = 64
            c.data.chat_format = "llama3"
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.lock()
    return c
