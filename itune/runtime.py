"""Process set-up shared by the command-line entry points."""

import json
import logging
import os
import sys
import warnings
from typing import Any

import numpy as np


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


def _json_default(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def gather_json(value: Any) -> list:
    """Every process's ``value`` (JSON-serializable, numpy arrays allowed), in process order."""
    import jax
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value, default=_json_default).encode(), np.uint8)
    if jax.process_count() == 1:
        return [json.loads(data.tobytes())]
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)]))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths)]
