"""Process set-up shared by the command-line entry points."""

import logging
import os
import warnings


def initialize() -> None:
  """Quiet TensorFlow's start-up banner and start JAX's multi-host runtime when launched for it.

  On Cloud TPU and SLURM, `jax.distributed.initialize` discovers the other processes itself; on
  other clusters it reads ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  warnings.filterwarnings("ignore", message=".*os.fork.*")
  import jax

  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("ITUNE_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  logging.getLogger().setLevel(logging.INFO)
  # Library chatter (orbax's per-save lines, jax's backend probing) stays at warnings.
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
