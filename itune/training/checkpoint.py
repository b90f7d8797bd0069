"""Orbax checkpoints of the train state under ``<workdir>/checkpoints``."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from itune.training.state import TrainState


def manager(workdir: str, checkpoint_config: Any) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.max_to_keep,
        # Every K-th step is kept as well as the last N (0: none).
        keep_period=checkpoint_config.get("keep_every_steps") or None,
        create=True,
        # Saves are asynchronous: training goes on while the files are written.
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        f"{workdir}/checkpoints", options=options, item_names=("state", "meta")
    )


@jax.jit
def _finite_leaves(tree) -> dict[str, jax.Array]:
    """Whether each floating-point leaf is all finite, by its path."""
    return {
        jax.tree_util.keystr(path): jnp.isfinite(leaf).all()
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    }


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: dict, force: bool = False) -> bool:
    """Saves asynchronously; refuses (ValueError) a state with a non-finite value."""
    step = int(state.step)
    finite = jax.device_get(_finite_leaves((state.params, state.opt_state)))
    if not all(finite.values()):
        bad = [name for name, ok in finite.items() if not ok]
        raise ValueError(f"refusing to checkpoint step {step}: non-finite values in {bad[:5]}")
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
