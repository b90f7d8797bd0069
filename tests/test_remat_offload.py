"""``model.remat='offload_dots'``: save_dots' values kept in host memory."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itune.model import decoder
from itune.model.decoder import Decoder
from tests.util import packed_batch, quick_jit, tiny_model_config


def _loss(graphdef, params, batch):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()


@functools.partial(quick_jit, static_argnums=0)
def _loss_and_grads(graphdef, params, batch):
    return jax.value_and_grad(functools.partial(_loss, graphdef))(params, batch)


def test_offload_dots_gives_save_dots_loss_and_gradients():
    """On CPU the host memory is the device's: offloading computes the very same numbers."""
    cfg = tiny_model_config(num_layers=3, remat="save_dots")
    batch = packed_batch(6, batch=2, length=16, vocab=128, segment_lengths=(9, 7))
    results = {}
    for remat in ("save_dots", "offload_dots"):
        model = Decoder(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0))
        results[remat] = _loss_and_grads(*nnx.split(model), batch)
    (ref_loss, ref_grads), (loss, grads) = results["save_dots"], results["offload_dots"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _memory_kinds(jaxpr) -> set[str]:
    """The memory kinds that ``device_put``s in ``jaxpr`` (and its sub-jaxprs) move values to."""
    kinds = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "device_put":
            kinds.update(str(d) for d in eqn.params["devices"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    kinds |= _memory_kinds(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    kinds |= _memory_kinds(sub)
    return kinds


def test_offload_dots_moves_the_saved_values_to_host_memory_and_back():
    batch = packed_batch(6, batch=1, length=16, vocab=128, segment_lengths=(16,))
    kinds = {}
    for remat in ("save_dots", "offload_dots"):
        model = Decoder(tiny_model_config(remat=remat), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        grad = jax.grad(functools.partial(_loss, graphdef))
        kinds[remat] = _memory_kinds(jax.make_jaxpr(grad)(params, batch).jaxpr)
    assert kinds["save_dots"] == set()
    assert kinds["offload_dots"] == {"MemorySpace.Host", "MemorySpace.Device"}


def test_offloading_needs_a_host_memory_space():
    memory = types.SimpleNamespace
    no_host = types.SimpleNamespace(
        platform="gpu", addressable_memories=lambda: [memory(kind="device")]
    )
    with pytest.raises(ValueError, match="remat='offload_dots'.*'pinned_host'.*save_dots"):
        decoder.check_host_memory("offload_dots", no_host)
    decoder.check_host_memory("save_dots", no_host)  # Nothing to offload: nothing to check.
    decoder.check_host_memory("offload_dots")  # This host's CPU devices have a pinned_host.


def test_preflight_memory_counts_offloaded_bytes_on_the_host_not_the_device():
    from itune.training import aot

    analysis = types.SimpleNamespace(
        argument_size_in_bytes=100,
        output_size_in_bytes=60,
        alias_size_in_bytes=50,
        temp_size_in_bytes=0,
        peak_memory_in_bytes=400,
        generated_code_size_in_bytes=10,
        host_temp_size_in_bytes=1000,
        host_argument_size_in_bytes=0,
        host_output_size_in_bytes=0,
        host_alias_size_in_bytes=0,
    )
    memory = aot.Memory.of(types.SimpleNamespace(memory_analysis=lambda: analysis))
    assert (memory.temporaries, memory.host, memory.total) == (290, 1000, 410)
