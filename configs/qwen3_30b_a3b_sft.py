"""Instruction-tune Qwen3-30B-A3B (128 experts, 8 per token: 30.5B parameters, 3.3B active) on
the GSM8K and chat mixture of ``../shared``: 64 rows of 4096 tokens per step on a TPU v5p-32
slice (16 chips, 4 hosts), the smallest v5p slice it fits (76 GiB of 95 per chip).

  itune-preflight --config=configs/qwen3_30b_a3b_sft.py               # compile for v5p-32 here
  launch/tpu.sh create --name=itune-qwen3moe --zone=us-east5-a --accelerator=v5p-32
  launch/tpu.sh setup --name=itune-qwen3moe --zone=us-east5-a --accelerator=v5p-32 \\
      --with=../shared --with=/data/Qwen3-30B-A3B
  launch/tpu.sh run --name=itune-qwen3moe --zone=us-east5-a --accelerator=v5p-32 -- \\
      --config=configs/qwen3_30b_a3b_sft.py --workdir=gs://BUCKET/qwen3_30b_a3b_sft \\
      --config.init_from=../Qwen3-30B-A3B

Float32 parameters and AdamW state sharded over all 16 chips (fsdp, each expert's matrices
split along ``d_model`` like every other weight), bfloat16 computation with each layer
rematerialised whole, the batch in microbatches of one row per chip, and Qwen3's load-balancing
loss (``router_aux_loss_coef`` 0.001) beside the token loss. Whole experts per chip
(``--config.mesh.strategy=ep``: 8 experts of each layer on each chip, which runs the tokens
routed to them) need 75 GiB per chip here, but each chip's grouped products span the tokens of
all 16 chips, the worst case of routing (``docs/scale.md``). ``:runlocal`` is a few CPU steps of
a tiny model of 4 experts, 2 per token.
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
                "tiny", qk_norm=True, num_experts=4, experts_per_token=2,
                router_aux_loss_coef=0.001,
            )
        else:
            c.model = configlib.model_section("qwen3-30b-a3b", dtype="bfloat16", remat="full")
            c.data.chat_format = "chatml"
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
