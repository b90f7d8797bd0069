"""Instruction-tune Gemma 3 27B (its text decoder) on the GSM8K and chat mixture of ``../shared``:
64 rows of 4096 tokens per step on a TPU v5p-32 slice (16 chips, 4 hosts), the smallest v5p
slice it fits (57 GiB of 95 per chip; on v5p-16 it needs 98).

  itune-preflight --config=configs/gemma3_27b_sft.py                  # compile for v5p-32 here
  launch/tpu.sh create --name=itune-gemma3 --zone=us-east5-a --accelerator=v5p-32
  launch/tpu.sh setup --name=itune-gemma3 --zone=us-east5-a --accelerator=v5p-32 \\
      --with=../shared --with=/data/gemma-3-27b-it
  launch/tpu.sh run --name=itune-gemma3 --zone=us-east5-a --accelerator=v5p-32 -- \\
      --config=configs/gemma3_27b_sft.py --workdir=gs://BUCKET/gemma3_27b_sft \\
      --config.init_from=../gemma-3-27b-it

Float32 parameters and AdamW state sharded over all 16 chips (fsdp), bfloat16 computation, each
layer rematerialised whole, the batch in microbatches of one row per chip. ``init_from`` is a
Hugging Face Gemma 3 folder (its text decoder) or an ``itune-convert`` output. ``:runlocal`` is
a few CPU steps of a tiny model with Gemma 3's block: sandwich norms, q/k norm, and a sliding
layer (with its own RoPE base) before a global one.
"""

from itune import configlib

sft_mix = configlib.sibling(__file__, "sft_mix")

NEEDS_SHARED = True  # The data mixture of sft_mix.


def get_config(arg=None):
    arg = configlib.parse_arg(arg, runlocal=False)
    c = sft_mix.get_config("runlocal" if arg.runlocal else None)
    with c.unlocked():
        if arg.runlocal:
            c.model = configlib.model_section(
                "tiny",
                norm_plus_one=True,
                embed_scale=True,
                post_norms=True,
                qk_norm=True,
                sliding_window=64,
                global_layer_every=2,
                rope_local_theta=10_000.0,
                mlp_activation="gelu_tanh",
            )
        else:
            c.model = configlib.model_section("gemma3-27b", dtype="bfloat16", remat="full")
            c.data.chat_format = "gemma"
            c.data.tokenizer.path = ""  # The pretrained model's (init_from).
            c.data.seq_len = 4096
            c.data.global_batch_size = 64
            c.train.microbatches = 4
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
            c.optim.learning_rate = 1e-5
            c.optim.warmup_steps = 20
        c.preflight.topology = "v5p-32"
    c.lock()
    return c
