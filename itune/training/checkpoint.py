"""Orbax checkpoints of the train state under ``<workdir>/checkpoints``."""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from itune.training.step import TrainState


def manager(workdir: str, checkpoint_config: Any) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.max_to_keep,
        create=True,
        # Saves are asynchronous: training goes on while the files are written.
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        f"{workdir}/checkpoints", options=options, item_names=("state", "meta")
    )


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: dict, force: bool = False) -> bool:
    step = int(state.step)
    if step in mngr.all_steps():
        return False
    return mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )


def restore_latest(
    mngr: ocp.CheckpointManager, target: TrainState
) -> tuple[TrainState, dict] | None:
    """The newest checkpoint placed onto ``target``'s shardings (any mesh), or None if there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    logging.info("Restoring checkpoint at step %d from %s", step, mngr.directory)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, dict(restored.meta)


def _json_default(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def gather_json(value: Any) -> list:
    """Every process's ``value`` (JSON-serializable, numpy arrays allowed), in process order.

    Each process has its own input pipeline state; the checkpoint keeps all of them.
    """
    data = np.frombuffer(json.dumps(value, default=_json_default).encode(), np.uint8)
    if jax.process_count() == 1:
        return [json.loads(data.tobytes())]
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)]))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths)]
