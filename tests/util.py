"""Small builders shared by the tests."""

import functools
import logging

import ml_collections
import numpy as np

from itune.model.decoder import ModelConfig

# XLA options for the tests' programs. They are tiny, so compiling is nearly all of their time,
# and half of that is LLVM optimising the machine code: they compile without it. XLA's own passes
# (fusion, SPMD partitioning) run as in training; sums may round differently in the last bit.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def quick_jit(fun, **jit_kwargs):
    """`jax.jit` of a test's program, with `QUICK_COMPILE`."""
    import jax

    return jax.jit(fun, compiler_options=QUICK_COMPILE, **jit_kwargs)


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=128,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        rope_theta=10_000.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def optim_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        learning_rate=1e-2,
        warmup_steps=1,
        min_learning_rate_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def packed_batch(
    seed: int, batch: int, length: int, vocab: int, segment_lengths=(5, 7, 3)
) -> dict[str, np.ndarray]:
    """Random rows, each packed with segments of the given lengths and padding after them."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    start = 0
    for seg, n in enumerate(segment_lengths, start=1):
        segment_ids[:, start : start + n] = seg
        positions[:, start : start + n] = np.arange(n)
        start += n
    inputs = rng.integers(1, vocab, (batch, length), dtype=np.int32) * (segment_ids > 0)
    targets = rng.integers(1, vocab, (batch, length), dtype=np.int32) * (segment_ids > 0)
    loss_mask = (segment_ids > 0).astype(np.int32) * rng.integers(0, 2, (batch, length))
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss_mask.astype(np.int32),
        "segment_ids": segment_ids,
        "positions": positions,
    }


def jitted_train_step(
    model_config, optim, mesh_shape=(1, 1, 1), num_steps=10, params=None, **step_kwargs
):
    """``(layout, state, run)`` built as the trainer builds them, on a ``(data, fsdp, tensor)``
    mesh of the first devices: ``run(state, host_batch) -> (state, metrics)`` is the jitted,
    donating `train_step` with ``step_kwargs`` (`itune.training.program.jit_step`). With
    ``params`` (an imported model's, say), the state starts from them rather than from a random
    initialisation."""
    import jax

    from itune import sharding
    from itune.training import optimizer, program, state as state_lib

    rules = sharding.DEFAULT_RULES
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    tx = optimizer.make_optimizer(optim, num_steps)
    schedule = optimizer.learning_rate_schedule(optim, num_steps)
    layout = state_lib.state_layout(model_config, tx, mesh, rules)
    if params is None:
        state = state_lib.init_train_state(layout, model_config, tx, mesh, rules)
    else:
        import jax.numpy as jnp

        state = state_lib.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
        )
        state = jax.device_put(state, layout.shardings)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_step = program.jit_step(
        layout, tx, schedule, mesh, rules, compiler_options=QUICK_COMPILE, **step_kwargs
    )

    def run(state, batch):
        with jax.set_mesh(mesh):
            return train_step(
                state, {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
            )

    return layout, state, run


# ----------------------------------------------------------------------------------------------
# Parity with transformers (torch and transformers are imported by the tests that use these).


def max_relative_error(actual, expected) -> float:
    """``max |actual - expected| / max |expected|``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def hf_logits(model, tokens) -> np.ndarray:
    """A transformers model's float32 logits of ``tokens [batch, length]``."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def itune_logits(graphdef, params, tokens, mesh=None, positions=None, segment_ids=None):
    """itune's logits of ``tokens [batch, length]`` (one unpacked sequence a row unless
    ``positions`` and ``segment_ids`` say otherwise), jitted, on ``mesh`` if given."""
    import jax

    tokens = np.asarray(tokens, np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = np.ones(tokens.shape, np.int32)
    if mesh is None:
        return np.asarray(_forward()(graphdef, params, tokens, positions, segment_ids))
    with jax.set_mesh(mesh):
        return np.asarray(_forward()(graphdef, params, tokens, positions, segment_ids))


@functools.cache
def _forward():
    """A model's logits under one `jax.jit` for all tests, the graph static: a graph (a config)
    and shapes seen before run their compiled program again."""
    from flax import nnx

    def forward(graphdef, params, *inputs):
        return nnx.merge(graphdef, params)(*inputs)

    return quick_jit(forward, static_argnums=0)


class WarningLog(logging.Handler):
    """Records transformers' warnings (its load report lists missing and unexpected weights)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def from_pretrained_cleanly(path, **kwargs):
    """transformers' model of ``path``, failing on any missing, unexpected or misshapen weight
    and on any warning while loading."""
    import transformers

    log = WarningLog()
    logger = logging.getLogger("transformers")
    logger.addHandler(log)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, attn_implementation="eager", **kwargs
        )
    finally:
        logger.removeHandler(log)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info[key]}"
    assert not log.messages, log.messages
    return model.eval()


def flat(params) -> dict[str, np.ndarray]:
    """``{"blocks/attn/q": array, ...}`` of a parameter state, on the host."""
    from itune.convert import weights

    return dict(weights.host_params(params))
