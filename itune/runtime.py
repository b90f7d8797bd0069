"""Process set-up shared by the command-line entry points."""

import logging
import os
import sys
import warnings


def initialize() -> None:
    """Quiets library logs and starts JAX's multi-host runtime when the process was launched for it.

    With ``JAX_COORDINATOR_ADDRESS`` set, the process joins ``JAX_NUM_PROCESSES`` processes as
    ``JAX_PROCESS_ID`` (see ``launch/local.sh``). With ``ITUNE_DISTRIBUTED=1``,
    `jax.distributed.initialize` discovers the processes itself (Cloud TPU, SLURM, ...).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message=".*os.fork.*")
    # The training loop shares the interpreter with the input pipeline's threads: hand the GIL
    # over more often (default 5 ms) so that it never waits long for a batch that is ready.
    sys.setswitchinterval(0.001)
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("ITUNE_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    logging.getLogger().setLevel(logging.INFO)
    # Library chatter (orbax's per-save lines, jax's backend probing) stays at warnings.
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
