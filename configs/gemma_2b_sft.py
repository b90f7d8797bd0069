"""Instruction-tune Gemma 2B on the GSM8K and chat mixture of ``../shared``: 32 rows of 4096
tokens per step on a TPU v5e-16 slice (16 chips of 16 GiB, 4 hosts).

  itune-preflight --config=configs/gemma_2b_sft.py                    # compile for v5e-16 here
  launch/tpu.sh create --name=itune-gemma --zone=us-west4-a --accelerator=v5e-16
  launch/tpu.sh setup --name=itune-gemma --zone=us-west4-a --accelerator=v5e-16 \\
      --with=../shared --with=/data/gemma-2b-it
  launch/tpu.sh run --name=itune-gemma --zone=us-west4-a --accelerator=v5e-16 -- \\
      --config=configs/gemma_2b_sft.py --workdir=gs://BUCKET/gemma_2b_sft \\
      --config.init_from=../gemma-2b-it

Float32 parameters and AdamW state sharded over all 16 chips, bfloat16 computation. Gemma's
256,000-token vocabulary makes the float32 logits the largest activation (4 GiB per row of 4096
tokens): each layer is rematerialised whole and the batch goes through in microbatches of one
row per chip. ``:runlocal`` is a few CPU steps of the ``tiny`` preset.
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
            # The logits at once: computed a vocabulary slice at a time, the step needed 13.65
            # instead of 11.62 GiB per chip here (`itune-preflight`).
            c.model = configlib.model_section(
                "gemma-2b", dtype="bfloat16", remat="full", loss_vocab_chunk=0
            )
            c.data.chat_format = "gemma"
            c.data.tokenizer.path = ""  # The pretrained model's (init_from).
            c.data.seq_len = 4096
            c.data.global_batch_size = 32
            c.train.microbatches = 2
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
            c.optim.learning_rate = 2e-5
            c.optim.warmup_steps = 20
        c.preflight.topology = "v5e-16"
    c.lock()
    return c
