"""Checkpoint save then restore gives identical parameters and optimizer state."""

import jax
import numpy as np
import ml_collections

from itune import sharding
from itune.training import checkpoint, optimizer, state as state_lib
from tests.util import optim_config, tiny_model_config


def _layout(mesh_shape):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    cfg = tiny_model_config(num_kv_heads=4)
    tx = optimizer.make_optimizer(optim_config(), 10)
    layout = state_lib.state_layout(cfg, tx, mesh, sharding.DEFAULT_RULES)
    return cfg, tx, mesh, layout


def test_save_then_restore_is_identical_even_on_another_mesh(tmp_path):
    cfg, tx, mesh, layout = _layout((1, 2, 4))
    state = state_lib.init_train_state(layout, cfg, tx, mesh, sharding.DEFAULT_RULES, seed=3)
    # Give the optimizer state non-trivial values.
    mu = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x + 2, state.opt_state)
    state = state.replace(opt_state=mu, step=state.step + 7)
    ckpt_config = ml_collections.ConfigDict({"max_to_keep": 2})
    mngr = checkpoint.manager(str(tmp_path), ckpt_config)
    assert checkpoint.save(mngr, state, {"note": "x"})
    mngr.wait_until_finished()

    for mesh_shape in [(1, 2, 4), (1, 4, 2)]:
        _, _, _, target_layout = _layout(mesh_shape)
        restored, meta = checkpoint.restore_latest(
            checkpoint.manager(str(tmp_path), ckpt_config),
            state_lib.abstract_with_shardings(target_layout),
        )
        assert meta == {"note": "x"} and int(restored.step) == 7
        a, b = jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        q = restored.params["blocks"]["attn"]["q"].get_value()
        assert (
            q.sharding.spec
            == target_layout.shardings.params["blocks"]["attn"]["q"].get_value().spec
        )


def test_no_checkpoint_gives_none(tmp_path):
    _, _, _, layout = _layout((1, 8, 1))
    mngr = checkpoint.manager(str(tmp_path), ml_collections.ConfigDict({"max_to_keep": 1}))
    assert checkpoint.restore_latest(mngr, state_lib.abstract_with_shardings(layout)) is None


def test_keeps_the_last_n_and_every_kth_and_refuses_non_finite_values(tmp_path):
    import pytest

    cfg, tx, mesh, layout = _layout((1, 2, 4))
    state = state_lib.init_train_state(layout, cfg, tx, mesh, sharding.DEFAULT_RULES, seed=0)
    config = ml_collections.ConfigDict({"max_to_keep": 1, "keep_every_steps": 2})
    mngr = checkpoint.manager(str(tmp_path), config)
    for step in range(1, 6):
        assert checkpoint.save(mngr, state.replace(step=state.step * 0 + step), {})
        mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [2, 4, 5]
    poisoned = jax.tree.map(lambda x: x * np.nan, state.params)
    with pytest.raises(ValueError, match="refusing to checkpoint step 6: non-finite values"):
        checkpoint.save(mngr, state.replace(step=state.step * 0 + 6, params=poisoned), {})
    assert 6 not in mngr.all_steps()
