"""Context parallelism: rows split over the 'context' mesh axis train as on one device."""

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from itune import sharding
from itune.evaluation import sampler
from itune.model import attention, context
from itune.model.decoder import Decoder
from itune.training import optimizer, state as state_lib, step
from tests.util import optim_config, tiny_model_config

# A sliding layer then a global one (each layer's window traced under scan), one key/value head
# for four query heads (repeated where the tensor axis splits the query heads).
MODEL = tiny_model_config(
    num_heads=4, num_kv_heads=1, sliding_window=12, global_layer_every=2, vocab_size=96
)
LENGTH = 64  # Chunks of 4 tokens at context 8.
CP_RULES = sharding.STRATEGIES["cp"]


def _packed_rows(seed: int, batch: int) -> dict[str, np.ndarray]:
    """Rows packed with segments of random lengths (most of them crossing a shard's edge, at any
    context size), padding at the end of some."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch, LENGTH), np.int32)
    positions = np.zeros((batch, LENGTH), np.int32)
    for row in range(batch):
        start, seg = 0, 1
        end = LENGTH - rng.integers(0, 6)
        while start < end:
            n = min(int(rng.integers(3, 23)), end - start)
            segment_ids[row, start : start + n] = seg
            positions[row, start : start + n] = np.arange(n)
            start, seg = start + n, seg + 1
    real = segment_ids > 0
    vocab = MODEL.vocab_size
    return {
        "inputs": rng.integers(1, vocab, (batch, LENGTH), dtype=np.int32) * real,
        "targets": rng.integers(1, vocab, (batch, LENGTH), dtype=np.int32) * real,
        "loss_mask": (real * rng.integers(0, 2, (batch, LENGTH))).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": positions,
    }


BATCH = _packed_rows(0, batch=4)


def _step(mesh_shape, rules):
    """Loss, gradients, the updated state and the live (sharded) state of one AdamW step."""
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    # Adam's first update is g / (|g| + eps): with the default eps, a gradient of 1e-8 that
    # differs in its last bits moves a parameter by a different share of the learning rate.
    # This eps bounds an update's change by lr / eps times the gradient's.
    tx = optimizer.make_optimizer(optim_config(eps=1e-3), num_steps=10)
    layout = state_lib.state_layout(MODEL, tx, mesh, rules, seed=0)
    state = state_lib.init_train_state(layout, MODEL, tx, mesh, rules, seed=0)

    def loss_grads_and_step(state, batch):
        # `train_step`'s update, written out so that the gradients come back too.
        loss, _, grads = step.accumulated_gradients(state.params, layout.graphdef, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return loss, grads, state_lib.TrainState(state.step + 1, params, opt_state)

    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    run = jax.jit(
        loss_grads_and_step,
        in_shardings=(layout.shardings, batch_sharding),
        out_shardings=(replicated, layout.shardings.params, layout.shardings),
    )
    with jax.set_mesh(mesh):
        batch = {k: jax.device_put(v, batch_sharding) for k, v in BATCH.items()}
        loss, grads, new_state = run(state, batch)
    return jax.device_get((loss, grads, new_state)), new_state


@pytest.fixture(scope="module")
def one_device():
    return _step((1, 1, 1), sharding.DEFAULT_RULES)[0]


def _largest_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
    "mesh_shape",
    [(1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 2, 2)],
    ids=["context8", "data2x_context4", "fsdp2x_tensor2x_context2"],
)
def test_context_parallel_step_matches_one_device(one_device, mesh_shape):
    ref_loss, ref_grads, ref_state = one_device
    (loss, grads, new_state), live = _step(mesh_shape, CP_RULES)
    # The parameters are split over fsdp and context together along 'embed'.
    q = live.params["blocks"]["attn"]["q"].get_value()
    assert q.sharding.spec[1] == (("fsdp", "context") if mesh_shape[1] > 1 else "context")
    assert len(q.sharding.device_set) == 8
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grad_diff = _largest_difference(grads, ref_grads)
    state_diff = _largest_difference(new_state, ref_state)
    print(
        f"{mesh_shape}: loss {abs(loss - ref_loss):.2e} grads {grad_diff:.2e} state {state_diff:.2e}"
    )
    assert grad_diff < 1e-5 and state_diff < 1e-5
    # The gradients reach the embedding through every layer (so equal states mean equal updates).
    assert np.abs(ref_grads["embed"]).max() > 1e-3


@pytest.mark.parametrize("implementation", ["xla", "jax"])
def test_context_parallel_attention_equals_the_reference(implementation):
    """The attention alone, forward, on context 4: a fixed window, rows in zig-zag order."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, LENGTH, heads, 8)).astype(np.float32) for heads in (4, 2, 2))
    segment_ids = BATCH["segment_ids"][:2]
    expected = attention.attend(q, k, v, segment_ids, "xla", sliding_window=12)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "context": 4})

    @jax.jit
    def parallel(q, k, v, segment_ids):
        inputs = [context.balance(x, 4) for x in (q, k, v, segment_ids)]
        out = context.attend(*inputs, CP_RULES, implementation, sliding_window=12)
        return context.unbalance(out, 4)

    with jax.set_mesh(mesh):
        out = parallel(q, k, v, segment_ids)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_zig_zag_layout_gives_each_device_two_mirrored_chunks():
    row = np.arange(16)[None]
    balanced = np.asarray(context.balance(row, 4))
    np.testing.assert_array_equal(
        balanced.reshape(4, 4), [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    )
    np.testing.assert_array_equal(context.unbalance(balanced, 4), row)
    # Each device's share of the causal (query, earlier key) pairs is the same.
    work = [sum(int(t) + 1 for t in shard) for shard in balanced.reshape(4, 4)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        context.balance(np.zeros((1, 12)), 4)


def test_decoding_on_a_context_parallel_mesh_matches_one_device():
    model = tiny_model_config(vocab_size=96)
    graphdef, params = nnx.split(Decoder(model, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 96, n)) for n in (5, 16, 9, 2)]
    config = sampler.SamplingConfig(max_new_tokens=6)
    single, single_logits = sampler.generate(
        graphdef, params, prompts, config, pad_id=0, return_logits=True
    )
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=1, context=4)))
    sharded_graphdef, _ = nnx.split(Decoder(model, CP_RULES, rngs=nnx.Rngs(1)))
    placed = jax.device_put(params, sharding.state_shardings(params, mesh, CP_RULES))
    sharded, sharded_logits = sampler.generate(
        sharded_graphdef,
        placed,
        prompts,
        config,
        pad_id=0,
        mesh=mesh,
        rules=CP_RULES,
        return_logits=True,
    )
    assert sharded == single
    np.testing.assert_allclose(sharded_logits, single_logits, atol=2e-5, rtol=2e-5)


def test_meshes_of_three_axes_keep_working():
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == (2, 4, 1, 1)
    assert dict(sharding.abstract_mesh((1, 4, 2)).shape)["context"] == 1
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1, "context": 4})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1, "context": 4}
    with pytest.raises(ValueError, match="expected one of"):
        sharding.rules_from_config({"strategy": "ring"})
