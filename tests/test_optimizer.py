"""Learning-rate schedules, the weight-decay mask, each optimizer, and its state's shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from itune import configlib, sharding
from itune.model.decoder import Decoder
from itune.training import optimizer, state as state_lib
from tests.util import jitted_train_step, optim_config, packed_batch, tiny_model_config


def test_schedule_warms_up_from_the_first_step_then_decays_to_the_floor():
    config = optim_config(learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.1)
    schedule = optimizer.learning_rate_schedule(config, num_steps=100)
    assert np.isclose(schedule(0), 1e-4) and np.isclose(schedule(10), 1e-3)
    assert schedule(50) < schedule(10) and np.isclose(schedule(100), 1e-4)


def test_linear_and_constant_schedules_share_the_warmup():
    values = dict(learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.1)
    linear = optimizer.learning_rate_schedule(optim_config(schedule="linear", **values), 100)
    constant = optimizer.learning_rate_schedule(optim_config(schedule="constant", **values), 100)
    for schedule in (linear, constant):
        assert np.isclose(schedule(0), 1e-4) and np.isclose(schedule(5), 5.5e-4)
        assert np.isclose(schedule(10), 1e-3)
    # Linear: halfway through the decay, halfway to the floor; the floor at the end.
    assert np.isclose(linear(55), 0.55e-3) and np.isclose(linear(100), 1e-4)
    assert np.isclose(constant(55), 1e-3) and np.isclose(constant(100), 1e-3)
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        optimizer.learning_rate_schedule(optim_config(schedule="step"), 100)


def _model_params(**overrides):
    return nnx.state(Decoder(tiny_model_config(**overrides), rngs=nnx.Rngs(0)))


def test_weight_decay_skips_norms_biases_and_embeddings():
    params = _model_params(qkv_bias=True, tie_embeddings=False)
    mask = nnx.to_pure_dict(optimizer.weight_decay_mask(params))
    assert mask["embed"] is False and mask["final_norm"]["scale"] is False
    assert mask["blocks"]["attn_norm"]["scale"] is False
    # Stacked layers give biases 3 dimensions: the name decides, not the shape.
    assert (
        params["blocks"]["attn"]["q_bias"].ndim == 3 and mask["blocks"]["attn"]["q_bias"] is False
    )
    assert mask["blocks"]["mlp"]["gate"] is True and mask["blocks"]["attn"]["q"] is True
    assert mask["lm_head"] is True
    # LoRA adapters are matrices.
    lora = {"blocks": {"attn": {"q_lora_a": np.zeros((2, 3)), "q_lora_b": np.zeros((3, 2))}}}
    assert optimizer.weight_decay_mask(lora) == {
        "blocks": {"attn": {"q_lora_a": True, "q_lora_b": True}}
    }
    everything = nnx.to_pure_dict(
        optimizer.weight_decay_mask(
            params, decay_norms=True, decay_biases=True, decay_embeddings=True
        )
    )
    assert all(jax.tree.leaves(everything))


@pytest.mark.parametrize("name", optimizer.OPTIMIZERS)
def test_each_optimizer_decays_weights_by_lr_times_decay_outside_the_mask(name):
    """With zero gradients, every optimizer's update is the decoupled decay alone:
    ``p <- p * (1 - lr * weight_decay)`` for matrices; norms, biases and embeddings stay."""
    params = _model_params(qkv_bias=True)
    config = optim_config(name=name, learning_rate=0.1, weight_decay=0.5, warmup_steps=1)
    tx = optimizer.make_optimizer(config, num_steps=10)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = nnx.to_pure_dict(optax.apply_updates(params, updates))
    old = nnx.to_pure_dict(params)
    np.testing.assert_allclose(
        new["blocks"]["mlp"]["gate"], old["blocks"]["mlp"]["gate"] * 0.95, rtol=1e-6
    )
    for path in (("embed",), ("final_norm", "scale"), ("blocks", "attn", "q_bias")):
        np.testing.assert_array_equal(_get(new, path), _get(old, path))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_configs_without_the_new_fields_get_adamw_and_unknown_names_fail():
    config = optim_config()  # Only the fields of the first release.
    assert "name" not in config and "schedule" not in config
    state = optimizer.make_optimizer(config, 10).init({"w": jnp.ones((2, 2))})
    assert any(
        isinstance(s, optax.ScaleByAdamState)
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
    )
    with pytest.raises(ValueError, match="optim.name='adam'; expected one of"):
        optimizer.make_optimizer(optim_config(name="adam"), 10)


def test_derived_sharding_drops_reduced_dimensions():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    param = NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor", None))
    shape = (2, 32, 4, 8)

    def spec(leaf_shape):
        return tuple(state_lib.derived_sharding(leaf_shape, shape, param).spec)

    assert state_lib.derived_sharding(shape, shape, param) is param
    assert spec((2, 4, 8)) == (None, "tensor", None)  # Reduced over dimension 1.
    assert spec((2, 32, 4)) == (None, "fsdp", "tensor")  # Reduced over dimension 3.
    assert spec((2, 1, 4, 1)) == (None, None, "tensor", None)  # Reduced, dimensions kept.
    assert spec((1,)) == () and spec(()) == ()  # Unrelated: replicated.


# Small enough to compile quickly; 4 heads so that the tensor axis shards them.
MODEL = tiny_model_config(
    vocab_size=64, d_model=16, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=4, mlp_dim=32
)


@pytest.mark.parametrize("name", optimizer.OPTIMIZERS)
def test_optimizer_state_is_sharded_and_a_step_on_a_mesh_matches_one_device(name):
    # Factor Adafactor's second moments from dimensions of 8 up, so that the tiny model's are.
    # SGD's steps are the clipped gradient's size: a larger rate makes them as visible.
    learning_rate = 0.5 if name == "sgd" else 1e-2
    config = optim_config(name=name, adafactor_min_dim_to_factor=8, learning_rate=learning_rate)
    batch = packed_batch(0, batch=8, length=16, vocab=MODEL.vocab_size)
    results = []
    for mesh_shape in ((1, 1, 1), (1, 2, 4)):
        layout, state, run = jitted_train_step(MODEL, config, mesh_shape)
        init = jax.device_get(state.params)
        new_state, metrics = run(state, batch)
        results.append((jax.device_get(new_state), jax.device_get(metrics)))
    (ref, ref_metrics), (got, metrics) = results
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    ref_leaves, leaves = jax.tree.leaves(ref), jax.tree.leaves(got)
    assert len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    gate = nnx.to_pure_dict(got.params)["blocks"]["mlp"]["gate"]
    change = np.abs(gate - nnx.to_pure_dict(init)["blocks"]["mlp"]["gate"]).max()
    assert change > 1e-3
    # Every optimizer-state array lives on the whole mesh, in shards where its parameter is.
    opt = new_state.opt_state
    for leaf in jax.tree.leaves(opt):
        assert len(leaf.sharding.device_set) == 8
    states = jax.tree.leaves(opt, is_leaf=lambda x: isinstance(x, nnx.State))
    moments = [s["blocks"]["mlp"]["gate"].get_value() for s in states if isinstance(s, nnx.State)]
    moments = [m for m in moments if m.size > 1]  # Adafactor keeps (1,) placeholders.
    assert moments and all(m.addressable_shards[0].data.size < m.size for m in moments)
    if name == "adafactor":
        # Factored: a row and a column moment for the (1, 16, 32) parameter.
        assert sorted(m.shape for m in moments) == [(1, 16), (1, 32)]


class _Reads:
    """An ``optim`` section that records which fields are read."""

    def __init__(self, values):
        self.values, self.read = values, set()

    def __getattr__(self, name):
        self.read.add(name)
        return self.values[name]

    def get(self, name, default=None):
        self.read.add(name)
        return self.values.get(name, default)


def test_optimizer_defaults_are_the_config_section_and_every_field_is_read():
    # One list of fields and defaults: the base config's section is built from it.
    assert configlib.base_config().optim.to_dict() == optimizer.DEFAULTS
    # The optimizers read exactly those fields: none without a default, no default unused.
    read = set()
    for name in optimizer.OPTIMIZERS:
        for schedule in optimizer.SCHEDULES:
            section = _Reads(dict(optimizer.DEFAULTS, name=name, schedule=schedule))
            optimizer.make_optimizer(section, num_steps=10)
            read |= section.read
    assert read == set(optimizer.DEFAULTS)
