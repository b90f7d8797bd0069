"""Sharded runs equal the 1-device run; the logical-name rules."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from itune import sharding
from itune.training import optimizer, state as state_lib, step
from tests.util import optim_config, packed_batch, tiny_model_config

MODEL = tiny_model_config(num_heads=4, num_kv_heads=4, d_model=32, mlp_dim=64, vocab_size=128)


def _one_step(mesh_shape, batch, rules=sharding.DEFAULT_RULES, model=MODEL):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    tx = optimizer.make_optimizer(optim_config(), num_steps=10)
    schedule = optimizer.learning_rate_schedule(optim_config(), 10)
    layout = state_lib.state_layout(model, tx, mesh, rules, seed=0)
    state = state_lib.init_train_state(layout, model, tx, mesh, rules, seed=0)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_step = jax.jit(
        functools.partial(step.train_step, graphdef=layout.graphdef, tx=tx, schedule=schedule),
        in_shardings=(layout.shardings, batch_sharding),
        out_shardings=(layout.shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh):
        global_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        init_params = jax.device_get(state.params)
        state, metrics = train_step(state, global_batch)
    return init_params, jax.device_get(state), jax.device_get(metrics), state


@pytest.mark.parametrize(
    "mesh_shape",
    [(1, 2, 4), (1, 4, 2), (2, 4, 1), (4, 1, 2)],
    ids=["fsdp2x_tensor4", "fsdp4x_tensor2", "data2x_fsdp4", "data4x_tensor2"],
)
def test_train_step_on_a_mesh_matches_one_device(mesh_shape):
    _check_against_one_device(mesh_shape, sharding.DEFAULT_RULES, params_sharded=True)


@pytest.mark.parametrize(
    "strategy, mesh_shape, params_sharded",
    [
        ("dp", (2, 2, 2), False),
        ("fsdp", (1, 8, 1), True),
        ("tp", (2, 1, 4), True),
        ("fsdp_tp", (2, 2, 2), True),
    ],
)
def test_each_strategy_is_a_rules_table_and_matches_one_device(
    strategy, mesh_shape, params_sharded
):
    rules = sharding.rules_from_config({"strategy": strategy, "rules": ()})
    assert rules == sharding.STRATEGIES[strategy]
    live_state = _check_against_one_device(mesh_shape, rules, params_sharded)
    q = live_state.params["blocks"]["attn"]["q"].get_value()
    spec = q.sharding.spec
    if strategy == "dp":
        assert all(axes is None for axes in spec)
    elif strategy == "fsdp":
        assert tuple(spec) == (None, "fsdp", None, None)
    elif strategy == "tp":
        assert tuple(spec) == (None, None, "tensor", None)
    else:
        assert tuple(spec) == (None, "fsdp", "tensor", None)


def _check_against_one_device(mesh_shape, rules, params_sharded):
    batch = packed_batch(0, batch=8, length=16, vocab=MODEL.vocab_size)
    ref_init, ref_state, ref_metrics, _ = _one_step((1, 1, 1), batch)
    init, new_state, metrics, live_state = _one_step(mesh_shape, batch, rules)
    # Parameters are really sharded on the mesh (or, data parallel, replicated on all of it).
    q = live_state.params["blocks"]["attn"]["q"].get_value()
    assert len(q.sharding.device_set) == 8
    assert (q.addressable_shards[0].data.size < q.size) == params_sharded
    for a, b in zip(jax.tree.leaves(ref_init), jax.tree.leaves(init)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    leaves, ref_leaves = jax.tree.leaves(new_state), jax.tree.leaves(ref_state)
    assert len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The step really changed the parameters.
    assert not np.allclose(jax.tree.leaves(ref_init)[0], jax.tree.leaves(ref_state.params)[0])
    return live_state


@pytest.mark.parametrize(
    "mesh_shape", [(2, 4, 1), (1, 2, 2)], ids=["data2x_fsdp4", "fsdp2x_tensor2"]
)
def test_expert_parallel_moe_step_matches_one_device(mesh_shape):
    """Mixture of experts under the 'ep' strategy: each device holds a share of the experts
    (whole ones), and the step equals the 1-device step."""
    model = tiny_model_config(
        num_experts=4, experts_per_token=2, mlp_dim=16, router_aux_loss_coef=0.01
    )
    rules = sharding.rules_from_config({"strategy": "ep"})
    batch = packed_batch(0, batch=8, length=16, vocab=model.vocab_size)
    _, ref_state, ref_metrics, _ = _one_step((1, 1, 1), batch, model=model)
    _, new_state, metrics, live_state = _one_step(mesh_shape, batch, rules, model)
    gate = live_state.params["blocks"]["moe"]["gate"].get_value()
    assert gate.sharding.spec[1] == "fsdp"  # [layers, expert, embed, mlp]
    assert gate.addressable_shards[0].data.shape[1] == 4 // mesh_shape[1]
    for name in ("loss", "grad_norm", "router_aux_loss"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rules_map_logical_names_and_replicate_indivisible_dimensions():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), rules, (32, 64), mesh) == PartitionSpec(
        "fsdp", "tensor"
    )
    # 6 kv heads do not divide over 4 tensor devices: replicated instead of failing.
    assert sharding.logical_to_spec(
        ("embed", "kv_heads", None), rules, (32, 6, 8), mesh
    ) == PartitionSpec("fsdp", None, None)
    assert sharding.logical_to_spec(("batch", None), rules, None, mesh) == PartitionSpec(
        "fsdp", None
    )


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 3})
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    assert dict(sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1}).shape) == {
        "data": 2,
        "fsdp": 4,
        "tensor": 1,
        "context": 1,
    }


def test_plan_of_llama3_8b_on_a_2x2x2_mesh_needs_no_devices():
    from configs import llama3_8b_sft
    from itune.cli import plan

    config = llama3_8b_sft.get_config()
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    text = plan.format_plan(config, num_devices=8)  # This host has 8 CPU devices, not a pod.
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "8,030.3M parameters" in text and "mesh (data 2, fsdp 2, tensor 2)" in text
    gate = lines["blocks/mlp/gate"]
    assert "(32, 4096, 14336)" in gate and "(layers, embed, mlp)" in gate
    assert "(-, fsdp, tensor)" in gate and "1.75 GiB" in gate  # 32 * 4096 * 14336 * 4 B / 4.
    assert "(-, fsdp, tensor, -)" in lines["blocks/attn/k"]
    # 8.03e9 parameters * 4 B over 4 shards (fsdp x tensor; data holds replicas).
    # AdamW's two float32 moments per parameter, sharded like it.
    assert "parameters 7.48 GiB, adamw state 14.96 GiB" in text
    with config.unlocked():
        config.optim.name = "sgd"  # One momentum buffer per parameter.
    assert "parameters 7.48 GiB, sgd state 7.48 GiB" in plan.format_plan(config, 8)
    with config.unlocked():
        config.optim.name = "adafactor"  # Factored second moments only: rows plus columns.
    factored = plan.format_plan(config, 8).splitlines()[-1]
    assert "adafactor state" in factored and "MiB" in factored, factored
