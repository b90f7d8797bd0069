"""Instruction-tune Llama 3 70B on the GSM8K and chat mixture of ``../shared``: 128 rows of 4096
tokens per step on a TPU v5p-256 slice (128 chips, 32 hosts).

  itune-preflight --config=configs/llama3_70b_sft.py                  # compile for v5p-256 here
  launch/tpu.sh create --name=itune-70b --zone=us-east5-a --accelerator=v5p-256 --queued --spot
  launch/tpu.sh setup --name=itune-70b --zone=us-east5-a --accelerator=v5p-256 \\
      --with=../shared --with=/data/Meta-Llama-3-70B-Instruct
  launch/tpu.sh run --name=itune-70b --zone=us-east5-a --accelerator=v5p-256 -- \\
      --config=configs/llama3_70b_sft.py --workdir=gs://BUCKET/llama3_70b_sft \\
      --config.init_from=../Meta-Llama-3-70B-Instruct

As `llama3_8b_sft` (float32 parameters and AdamW state sharded over every chip, bfloat16
computation), with each layer rematerialised whole (``remat="full"``): a layer's saved matmul
outputs, 80 layers deep, would not fit. ``:runlocal`` is a few CPU steps of the ``tiny`` preset.
"""

from itune import configlib

llama3_8b_sft = configlib.sibling(__file__, "llama3_8b_sft")

NEEDS_SHARED = True  # The data mixture of sft_mix.


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False)
    c = llama3_8b_sft.get_config("runlocal" if arg.runlocal else None)
    with c.unlocked():
        if not arg.runlocal:
            c.model = configlib.model_section("llama3-70b", dtype="bfloat16", remat="full")
            c.data.global_batch_size = 128
        c.preflight.topology = "v5p-256"
    c.lock()
    return c
