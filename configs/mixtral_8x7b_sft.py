"""Instruction-tune Mixtral 8x7B (8 experts, 2 per token: 46.7B parameters, 12.9B active) on the
GSM8K and chat mixture of ``../shared``: 64 rows of 4096 tokens per step on a TPU v5p-32 slice
(16 chips, 4 hosts), the smallest v5p slice it fits (78.6 GiB of 95 per chip).

  itune-preflight --config=configs/mixtral_8x7b_sft.py                # compile for v5p-32 here
  launch/tpu.sh create --name=itune-mixtral --zone=us-east5-a --accelerator=v5p-32
  launch/tpu.sh setup --name=itune-mixtral --zone=us-east5-a --accelerator=v5p-32 \\
      --with=../shared --with=/data/Mixtral-8x7B-Instruct-v0.1
  launch/tpu.sh run --name=itune-mixtral --zone=us-east5-a --accelerator=v5p-32 -- \\
      --config=configs/mixtral_8x7b_sft.py --workdir=gs://BUCKET/mixtral_8x7b_sft \\
      --config.init_from=../Mixtral-8x7B-Instruct-v0.1

Expert parallel (``mesh.strategy='ep'``) with tensor parallelism: the 8 experts of each layer
split 2 ways (fsdp, whole experts) and each expert's hidden units 8 ways (tensor), as are the
heads and the vocabulary; a chip runs the tokens routed to its experts, gathered from its fsdp
peer. Float32 parameters and AdamW state, bfloat16 computation with each layer rematerialised
whole, the batch in 32 microbatches of 2 rows, one per fsdp shard; Mixtral's load-balancing
loss (``router_aux_loss_coef`` 0.02) beside the token loss. ``--config.mesh.strategy=fsdp_tp``
splits the experts along ``d_model`` instead and needs 94.3 GiB per chip here; with more
headroom, on a v5p-64: ``--topology=v5p-64 --config.mesh.tensor=4
--config.train.microbatches=8`` (and ``--accelerator=v5p-64``); figures in ``docs/scale.md``.
``:runlocal`` is a few CPU steps of a tiny model of 4 experts, 2 per token.
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
                "tiny", num_experts=4, experts_per_token=2, router_aux_loss_coef=0.02
            )
        else:
            c.model = configlib.model_section("mixtral-8x7b", dtype="bfloat16", remat="full")
            c.data.chat_format = "mistral"
            c.data.tokenizer.path = ""  # The pretrained model's (init_from).
            c.data.seq_len = 4096
            c.data.global_batch_size = 64
            c.train.microbatches = 32
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 8
            c.optim.learning_rate = 1e-5
            c.optim.warmup_steps = 20
        c.mesh.strategy = "ep"
        c.preflight.topology = "v5p-32"
    c.lock()
    return c
