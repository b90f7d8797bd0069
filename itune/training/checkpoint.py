"""Orbax checkpoints of the train state under ``<workdir>/checkpoints``.

Saves run in the background; a save that fails there (a full disk, a folder turned read-only)
surfaces as a `CheckpointError` at the next `check`, `save` or `finish`, and leaves the previous
checkpoints as they were (Orbax renames a step's folder into place only once it is complete).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from itune import atomic
from itune.errors import ConfigError, UserError
from itune.training.state import TrainState


class CheckpointError(UserError):
    """A checkpoint could not be written; the message names the folder and the OS's reason."""


def _handlers() -> dict:
    # Named handlers (not only item names) let a manager read a checkpoint's tree metadata
    # before restoring it.
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def manager(workdir: str, checkpoint_config: Any) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.max_to_keep,
        # Every K-th step is kept as well as the last N (0: none).
        keep_period=checkpoint_config.get("keep_every_steps") or None,
        create=True,
        # Saves are asynchronous: training goes on while the files are written.
        enable_async_checkpointing=True,
        # The step's folder is made before the save returns, so that a folder that cannot be
        # made (read-only, full) fails the save at once rather than leaving Orbax's writer
        # threads waiting (minutes) for it.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    return ocp.CheckpointManager(
        f"{workdir}/checkpoints", options=options, item_handlers=_handlers()
    )


def saved_steps(workdir: str) -> list[int]:
    """The complete checkpoints' steps in ``workdir``, oldest first; reads, never writes."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    # A step's folder gets its plain name only once its save has completed.
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def saved_meta(workdir: str, step: int) -> dict:
    """The metadata saved with the checkpoint at ``step`` (the run's config, the input
    pipeline's state); reads, never writes."""
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(directory, options=options, item_handlers=_handlers()) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)


def _failed(mngr: ocp.CheckpointManager, error: Exception) -> CheckpointError:
    last = mngr.latest_step()
    kept = f"step {last}" if last is not None else "none yet"
    reason = atomic.write_failure(error) or (str(error).splitlines() or [repr(error)])[0][:200]
    return CheckpointError(
        f"writing a checkpoint in {mngr.directory} failed: {reason}; the last complete "
        f"checkpoint is {kept}: make room (or make the folder writable) and run the same "
        "command to resume from it"
    )


def check(mngr: ocp.CheckpointManager) -> None:
    """Raises `CheckpointError` if a save that ran in the background has failed (cheap: it never
    waits for a save still in progress)."""
    if not mngr.is_saving_in_progress():
        finish(mngr)


def finish(mngr: ocp.CheckpointManager) -> None:
    """Waits for the save in progress; `CheckpointError` if it, or an earlier one, failed."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _failed(mngr, e) from e


def close(mngr: ocp.CheckpointManager) -> None:
    """`finish`, then ends the manager's threads (also when the save failed)."""
    try:
        finish(mngr)
    finally:
        mngr.close()


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
    try:
        # Orbax first waits for the previous save, raising its error if it failed.
        return mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
    except Exception as e:
        raise _failed(mngr, e) from e


def restore_latest(
    mngr: ocp.CheckpointManager, target: TrainState
) -> tuple[TrainState, dict] | None:
    """The newest checkpoint placed onto ``target``'s shardings (any mesh), or None if there is
    none; a `ConfigError` naming the arrays when its shapes are not ``target``'s."""
    step = mngr.latest_step()
    if step is None:
        return None
    _check_shapes(mngr, step, target)
    logging.info("Restoring checkpoint at step %d from %s", step, mngr.directory)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, dict(restored.meta)


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    """Shapes by path, the path's names joined by dots: ``params.blocks.attn.q``."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [n for n in re.findall(r"\w+", jax.tree_util.keystr(path)) if n != "value"]
        shapes[".".join(names)] = tuple(leaf.shape)
    return shapes


def _check_shapes(mngr: ocp.CheckpointManager, step: int, target: TrainState) -> None:
    """Refuses, before reading any array, a checkpoint whose arrays do not fit ``target``."""
    metadata = mngr.item_metadata(step)
    stored = metadata["state"] if metadata is not None else None
    if stored is None:
        return
    saved, wanted = _leaf_shapes(stored), _leaf_shapes(target)
    if saved == wanted:
        return
    differences = [
        f"{name} {saved[name]} there, {wanted[name]} now"
        for name in sorted(saved.keys() & wanted.keys())
        if saved[name] != wanted[name]
    ]
    differences += [f"{name} only there" for name in sorted(saved.keys() - wanted.keys())]
    differences += [f"{name} only now" for name in sorted(wanted.keys() - saved.keys())]
    more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
    raise ConfigError(
        f"the checkpoint at step {step} in {mngr.directory} does not fit this config's model and "
        f"optimizer: {'; '.join(differences[:3])}{more}; resume with the run's own config, or "
        "pass a new --workdir"
    )
