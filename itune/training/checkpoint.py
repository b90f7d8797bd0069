"""Orbax checkpoints of the train state under ``<workdir>/checkpoints``."""

from __future__ import annotations

import logging
from typing import Any

import orbax.checkpoint as ocp

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
