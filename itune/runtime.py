"""Process set-up shared by the command-line entry points."""

import ctypes
import ctypes.util
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
    logging.getLogger("absl").addFilter(_background_errors_in_one_line)
    # The training loop shares the interpreter with the input pipeline's threads: hand the GIL
    # over more often (default 5 ms) so that it never waits long for a batch that is ready.
    sys.setswitchinterval(0.001)
    # Before JAX starts its threads: a thread keeps the malloc arena it first allocated from.
    keep_freed_host_memory()
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("ITUNE_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    if jax.default_backend() != "cpu":  # The step's memory is the accelerator's.
        keep_freed_host_memory(False)
    logging.getLogger().setLevel(logging.INFO)
    # Library chatter (orbax's per-save lines, jax's backend probing) stays at warnings.
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


# glibc's mallopt parameters (malloc.h), each with the setting that keeps freed memory and its
# default (for arenas, 8 per core on 64-bit hosts).
_MALLOPT_SETTINGS = {
    "arena_max": (-8, 1, 8 * (os.cpu_count() or 1)),
    "mmap_max": (-4, 0, 65536),
    "trim_threshold": (-1, -1, 128 * 1024),
}


def _background_errors_in_one_line(record: logging.LogRecord) -> bool:
    """Orbax logs an error of its background writers with a traceback from each thread it
    passes through; the error then surfaces again where the program waits for the write, which
    tells it in one line (`itune.training.checkpoint.CheckpointError`). Its logs keep their
    first line."""
    if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
        first = (record.getMessage().splitlines() or [""])[0]
        record.msg = first if len(first) <= 200 else first[:197] + "..."
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def keep_freed_host_memory(keep: bool = True) -> bool:
    """Makes glibc's malloc keep the memory a process frees, for the next step to reuse.

    On the CPU backend a train step's buffers are host memory: XLA allocates its temporaries
    (gigabytes for a real model) with malloc on every step. By default glibc serves allocations
    that large with fresh mmaps and hands them back on free, so every step faults its whole
    working set in again, page by page, and the kernel's time on those faults was about a
    fifth of a bfloat16 step here (`bench/train_step.py`). One arena without mmap and without
    trimming keeps the freed pages mapped; the process's resident memory then stays at its
    peak. ``keep=False`` restores glibc's defaults. Returns False where the C library has no
    mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    settings = [(option, kept if keep else default) for option, kept, default in
                _MALLOPT_SETTINGS.values()]
    return all(mallopt(option, value) == 1 for option, value in settings)


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
