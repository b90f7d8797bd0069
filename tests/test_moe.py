"""The mixture-of-experts layer: grouped products, routing, auxiliary losses, LoRA on experts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itune.model import lora, moe
from itune.model.decoder import Decoder
from tests.util import jitted_train_step, optim_config, packed_batch, tiny_model_config


def moe_config(**overrides):
    values = dict(num_experts=6, experts_per_token=2, mlp_dim=16, moe_matmul="tiled")
    values.update(overrides)
    return tiny_model_config(**values)


@pytest.mark.parametrize("sizes", [(5, 0, 70, 1, 3), (0, 0, 0, 0, 20), (64, 64, 0, 0, 0)])
def test_tiled_matmul_is_each_group_times_its_own_weight(sizes):
    rng = np.random.default_rng(0)
    rows, groups = 80, len(sizes)
    x = rng.normal(size=(rows, 8)).astype(np.float32)
    w = rng.normal(size=(groups, 8, 5)).astype(np.float32)
    expected = np.zeros((rows, 5), np.float32)
    start = 0
    for g, n in enumerate(sizes):  # Rows past the groups' total stay zero.
        expected[start : start + n] = x[start : start + n] @ w[g]
        start += n
    group_sizes = jnp.asarray(sizes, jnp.int32)
    for tile in (4, 64):
        out = jax.jit(moe.tiled_matmul, static_argnums=3)(x, w, group_sizes, tile)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _run(cfg, seed=0):
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    batch = packed_batch(1, batch=2, length=16, vocab=cfg.vocab_size, segment_lengths=(9, 5))
    inputs = tuple(jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids"))

    def loss(params):
        m = nnx.merge(nnx.graphdef(model), params)
        hidden, weight, stats = m.features(*inputs)
        logits = m.logits_from(hidden, weight)
        aux = moe.router_losses(cfg, stats)
        return jnp.mean(logits**2) + aux["router_aux_loss"] + aux["router_z_loss"], (
            logits,
            aux,
        )

    (_, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(nnx.state(model))
    return logits, aux, dict(nnx.to_flat_state(grads))


def test_grouped_products_compute_what_every_expert_on_every_token_does():
    """Tiled and ragged grouped products against the dense loop over all experts: the same
    logits, router losses and gradients, the router's included."""
    dense_logits, dense_aux, dense_grads = _run(moe_config(moe_matmul="dense"))
    for matmul in ("tiled", "ragged"):
        logits, aux, grads = _run(moe_config(moe_matmul=matmul))
        np.testing.assert_allclose(logits, dense_logits, rtol=1e-5, atol=1e-5)
        for name in aux:
            np.testing.assert_allclose(aux[name], dense_aux[name], rtol=1e-5)
        for path, g in dense_grads.items():
            np.testing.assert_allclose(
                grads[path].get_value(),
                g.get_value(),
                rtol=1e-4,
                atol=1e-6,
                err_msg=str(path),
            )
    router = dense_grads[("blocks", "moe", "router")].get_value()
    assert np.abs(router).max() > 1e-4  # The router learns.


def test_router_statistics_give_transformers_load_balancing_loss():
    """`router_losses` of the summed statistics equals transformers' ``load_balancing_loss_func``
    over the concatenated router logits of all layers, padding left out by the attention mask;
    the z-loss is the mean squared log-sum-exp."""
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    # d_model = experts and an identity router: the router's logits are its inputs.
    cfg = moe_config(num_experts=5, experts_per_token=2, num_layers=3, d_model=5)
    router = moe.MoE(cfg, rngs=nnx.Rngs(0))
    router.router[...] = jnp.eye(cfg.num_experts, dtype=jnp.float32)
    rng = np.random.default_rng(2)
    layer_logits = rng.normal(size=(cfg.num_layers, 2 * 7, cfg.num_experts)).astype(np.float32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 0]], np.int32)
    total = moe.RouterStats.zeros(cfg)
    for logits in layer_logits:
        _, _, stats = router.route(jnp.asarray(logits), jnp.asarray(segment_ids))
        total = jax.tree.map(jnp.add, total, stats)
    ours = moe.router_losses(cfg, total)
    theirs = load_balancing_loss_func(
        tuple(torch.tensor(x) for x in layer_logits),
        cfg.num_experts,
        cfg.experts_per_token,
        torch.tensor(segment_ids != 0, dtype=torch.long),
    )
    np.testing.assert_allclose(ours["router_aux_loss"], float(theirs), rtol=1e-5)
    real = np.broadcast_to((segment_ids != 0).reshape(-1), layer_logits.shape[:2])
    lse = np.log(np.exp(layer_logits).sum(-1))
    np.testing.assert_allclose(ours["router_z_loss"], (lse**2)[real].mean(), rtol=1e-5)


def test_training_step_adds_the_router_losses_and_reports_them():
    batch = packed_batch(4, batch=4, length=16, vocab=128, segment_lengths=(16,))
    results = {}
    for coef in (0.0, 0.5):
        cfg = moe_config(router_aux_loss_coef=coef, router_z_loss_coef=coef / 10)
        _, state, run = jitted_train_step(cfg, optim_config(), microbatches=2)
        _, metrics = run(state, batch)
        results[coef] = jax.tree.map(float, metrics)
    plain, weighted = results[0.0], results[0.5]
    assert plain["router_aux_loss"] > 0.9  # 1 when perfectly balanced.
    np.testing.assert_allclose(weighted["router_aux_loss"], plain["router_aux_loss"], rtol=1e-5)
    penalty = 0.5 * plain["router_aux_loss"] + 0.05 * plain["router_z_loss"]
    np.testing.assert_allclose(weighted["loss"], plain["loss"] + penalty, rtol=1e-5)


def test_lora_on_experts_merges_into_the_same_model():
    cfg = moe_config(lora_rank=4, lora_targets="q,gate,up,down")
    model = Decoder(cfg, rngs=nnx.Rngs(5))
    params = nnx.state(model)
    # Non-zero B, so that the adapters change the output.
    params = jax.tree.map(
        lambda v: v + 0.05 if v.ndim and v.shape[-1] == cfg.mlp_dim else v, params
    )
    flat = dict(nnx.to_flat_state(params))
    assert flat[("blocks", "moe", "gate_lora_a")].get_value().shape == (2, 6, 32, 4)
    assert flat[("blocks", "moe", "down_lora_b")].get_value().shape == (2, 6, 4, 32)
    assert lora.num_params(cfg) == sum(
        v.get_value().size for p, v in flat.items() if lora.is_lora(p)
    )
    batch = packed_batch(6, batch=2, length=12, vocab=128, segment_lengths=(12,))
    inputs = tuple(jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids"))
    adapted = nnx.merge(nnx.graphdef(model), params)(*inputs)
    plain_cfg, merged = lora.merge(cfg, params)
    plain_model = nnx.merge(nnx.graphdef(Decoder(plain_cfg, rngs=nnx.Rngs(0))), merged)
    np.testing.assert_allclose(plain_model(*inputs), adapted, rtol=1e-4, atol=1e-5)
    base = nnx.merge(
        nnx.graphdef(Decoder(plain_cfg, rngs=nnx.Rngs(0))),
        lora.split_trainable(params)[1],
    )
    assert not np.allclose(base(*inputs), adapted, atol=1e-3)


def test_dense_experts_refuse_expert_adapters():
    with pytest.raises(ValueError, match="moe_matmul='dense'"):
        moe_config(moe_matmul="dense", lora_rank=2, lora_targets="up")
    with pytest.raises(ValueError, match="experts_per_token"):
        moe_config(experts_per_token=7)


def test_flops_count_the_chosen_experts_only():
    cfg = moe_config(num_experts=8, experts_per_token=2)
    dense = dataclasses.replace(cfg, num_experts=0)
    # Beyond the router, a token computes through 2 experts: twice a dense MLP's products.
    extra = cfg.flops_per_token(16) - dense.flops_per_token(16)
    expert_mlp = 6 * 3 * cfg.d_model * cfg.mlp_dim
    router = 6 * cfg.d_model * cfg.num_experts
    assert extra == cfg.num_layers * (expert_mlp + router)
    assert cfg.num_params() - dense.num_params() == cfg.num_layers * (
        7 * 3 * cfg.d_model * cfg.mlp_dim + cfg.d_model * cfg.num_experts
    )


def test_peft_adapters_of_experts_are_refused_with_the_way_out(tmp_path):
    from itune.convert import peft

    cfg = moe_config(lora_rank=2, lora_targets="q,up")
    params = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"expert projections \['up'\].*--to=hf"):
        peft.save_adapters(str(tmp_path / "adapters"), cfg, params)
    assert not (tmp_path / "adapters").exists()


EP_CASES = {
    # Experts over fsdp, which also splits the tokens (gathered, then scattered back); hidden
    # units over tensor (partial outputs summed).
    "experts_fsdp_mlp_tensor": ((2, 2, 2), (("expert", "fsdp"), ("mlp", "tensor"))),
    # Experts over tensor, which does not split the tokens: each device runs its experts on the
    # same tokens and the outputs are summed.
    "experts_tensor": ((2, 2, 2), (("expert", "tensor"),)),
    # Experts over two axes at once, one of them splitting the tokens.
    "experts_fsdp_and_tensor": ((1, 4, 2), (("expert", ("fsdp", "tensor")),)),
}


@pytest.mark.parametrize("case", list(EP_CASES))
def test_expert_parallel_layer_equals_one_device(case):
    """The layer under ``jax.shard_map`` (whole experts per device, LoRA on every expert
    projection, uneven routing) gives the output and gradients of the unsharded layer."""
    from itune import sharding

    mesh_shape, expert_rules = EP_CASES[case]
    rules = expert_rules + tuple(r for r in sharding.DEFAULT_RULES if r[0] not in ("expert", "mlp"))
    cfg = moe_config(num_experts=8, experts_per_token=3, lora_rank=2, lora_targets="gate,up,down")
    layer = moe.MoE(cfg, rngs=nnx.Rngs(3))
    lora.add_adapters(layer, cfg, lora.MLP_TARGETS, nnx.Rngs(4))
    params = jax.tree.map(lambda v: v + 0.05, nnx.state(layer))  # Non-zero B: adapters count.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, cfg.d_model)), jnp.float32)
    segment_ids = jnp.asarray(np.repeat([[1] * 12 + [0] * 4], 4, axis=0), jnp.int32)

    def loss_and_grads(graphdef):
        def loss(params, x):
            out, stats = nnx.merge(graphdef, params)(x, segment_ids)
            return jnp.sum(jnp.sin(out)) + stats.z, out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (ref_loss, ref_out), ref_grads = loss_and_grads(nnx.graphdef(layer))(params, x)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    sharded = moe.MoE(cfg, rules, rngs=nnx.Rngs(3))
    lora.add_adapters(sharded, cfg, lora.MLP_TARGETS, nnx.Rngs(4))
    with jax.set_mesh(mesh):
        shardings = sharding.state_shardings(nnx.state(sharded), mesh, rules)
        placed = jax.device_put(params, shardings)
        expert_axes = moe.expert_layout(
            cfg, rules, 4, 16, {"gate": nnx.state(sharded)["gate"]}
        ).expert_axes
        (out_loss, out), grads = loss_and_grads(nnx.graphdef(sharded))(placed, x)
    wanted = dict(expert_rules)["expert"]
    assert expert_axes == ((wanted,) if isinstance(wanted, str) else wanted)
    assert placed["gate"].get_value().addressable_shards[0].data.shape[0] < cfg.num_experts
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-5)
    for (path, g), (_, ref) in zip(
        nnx.to_flat_state(grads[0]), nnx.to_flat_state(ref_grads[0]), strict=True
    ):
        np.testing.assert_allclose(
            g.get_value(), ref.get_value(), rtol=1e-4, atol=1e-6, err_msg=str(path)
        )
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
