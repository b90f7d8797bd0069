"""The decoder: packed segments are independent, positions restart per segment."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itune import configlib
from itune.model.decoder import Decoder
from tests.util import QUICK_COMPILE, packed_batch, tiny_model_config


quick_jit = functools.partial(jax.jit, compiler_options=QUICK_COMPILE)


def _logits(model, batch):
    graphdef, state = nnx.split(model)
    return np.asarray(
        _jitted_logits(graphdef, state, batch["inputs"], batch["positions"], batch["segment_ids"])
    )


@functools.partial(quick_jit, static_argnums=0)
def _jitted_logits(graphdef, state, *inputs):
    return nnx.merge(graphdef, state)(*inputs)


def test_packed_segments_never_attend_to_each_other():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    batch = packed_batch(0, batch=2, length=16, vocab=128, segment_lengths=(5, 6, 3))
    before = _logits(model, batch)
    changed = dict(batch)
    changed["inputs"] = batch["inputs"].copy()
    changed["inputs"][:, 5:11] = (batch["inputs"][:, 5:11] + 17) % 127 + 1  # Segment 2 only.
    after = _logits(model, changed)
    seg = batch["segment_ids"][0]
    for s in (1, 3):
        np.testing.assert_array_equal(before[:, seg == s], after[:, seg == s])
    assert not np.allclose(before[:, seg == 2], after[:, seg == 2])


def test_a_packed_segment_gives_the_same_logits_as_the_example_alone():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(1))
    batch = packed_batch(1, batch=1, length=16, vocab=128, segment_lengths=(5, 6))
    packed = _logits(model, batch)
    alone = {k: v[:, 5:11] for k, v in batch.items()}
    alone["segment_ids"] = np.ones_like(alone["segment_ids"])
    np.testing.assert_allclose(packed[:, 5:11], _logits(model, alone), rtol=1e-5, atol=1e-5)


def test_model_is_causal():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(2))
    batch = packed_batch(2, batch=1, length=12, vocab=128, segment_lengths=(12,))
    before = _logits(model, batch)
    batch["inputs"][:, 8] = (batch["inputs"][:, 8] % 100) + 5
    after = _logits(model, batch)
    np.testing.assert_array_equal(before[:, :8], after[:, :8])
    assert not np.allclose(before[:, 8:], after[:, 8:])


def test_scan_over_layers_matches_running_them_one_by_one():
    cfg = tiny_model_config(num_layers=3)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    batch = packed_batch(3, batch=2, length=10, vocab=128, segment_lengths=(10,))
    tokens, pos, seg = (jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids"))
    x = jnp.take(model.embed[...], tokens, axis=0)
    graphdef, stacked = nnx.split(model.blocks)
    for i in range(cfg.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
        x, router_stats = block(x, pos, seg)
        assert router_stats is None  # A dense MLP.
    expected = model.logits(model.final_norm(x))
    np.testing.assert_allclose(_logits(model, batch), np.asarray(expected), rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, batch):
    graphdef, params = nnx.split(model)
    return _jitted_loss_and_grads(graphdef, params, batch)


@functools.partial(quick_jit, static_argnums=0)
def _jitted_loss_and_grads(graphdef, params, batch):
    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(
            batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()

    return jax.value_and_grad(loss_fn)(params)


def _same_params(cfg_a, cfg_b, seed=0):
    """Two models of the two configs with the same parameters."""
    a = Decoder(cfg_a, rngs=nnx.Rngs(seed))
    b = Decoder(cfg_b, rngs=nnx.Rngs(seed))
    nnx.update(b, nnx.state(a))
    return a, b


@pytest.mark.parametrize("implementation", ["jax", "splash"])
def test_attention_implementations_match_the_xla_reference(implementation):
    # Splash runs in Pallas's interpreter off TPU; its rows must be a multiple of 128.
    cfg = tiny_model_config(head_dim=32, d_model=64)
    ref, model = _same_params(cfg, dataclasses.replace(cfg, attention=implementation))
    batch = packed_batch(4, batch=2, length=128, vocab=128, segment_lengths=(50, 40, 20))
    np.testing.assert_allclose(_logits(model, batch), _logits(ref, batch), rtol=1e-5, atol=1e-5)
    (ref_loss, ref_grads), (loss, grads) = (
        _loss_and_grads(ref, batch),
        _loss_and_grads(model, batch),
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "jax", "splash"])
def test_sliding_window_attends_to_the_last_tokens_only(implementation):
    cfg = tiny_model_config(head_dim=32, d_model=64, sliding_window=16, attention=implementation)
    model = Decoder(cfg, rngs=nnx.Rngs(5))
    batch = packed_batch(5, batch=1, length=128, vocab=128, segment_lengths=(128,))
    before = _logits(model, batch)
    batch["inputs"][:, 10] = (batch["inputs"][:, 10] % 100) + 5
    after = _logits(model, batch)
    # Two layers see 2 * 15 tokens back at most.
    np.testing.assert_array_equal(before[:, 10 + 2 * 15 + 1 :], after[:, 10 + 2 * 15 + 1 :])
    assert not np.allclose(before[:, 10:26], after[:, 10:26])


@pytest.mark.parametrize(
    "change",
    [dict(scan_layers=False), dict(remat="full"), dict(remat="save_dots")],
    ids=["unrolled", "remat_full", "remat_save_dots"],
)
def test_unrolled_layers_and_remat_give_the_same_loss_and_gradients(change):
    cfg = tiny_model_config(num_layers=3)
    ref, model = _same_params(cfg, dataclasses.replace(cfg, **change))
    assert jax.tree.structure(nnx.state(ref)) == jax.tree.structure(nnx.state(model))
    batch = packed_batch(6, batch=2, length=16, vocab=128, segment_lengths=(9, 7))
    (ref_loss, ref_grads), (loss, grads) = (
        _loss_and_grads(ref, batch),
        _loss_and_grads(model, batch),
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_parameters_and_computation_stay_close_to_float32():
    cfg = tiny_model_config()
    ref = Decoder(cfg, rngs=nnx.Rngs(7))
    low = Decoder(
        dataclasses.replace(cfg, param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(7)
    )
    assert low.blocks.attn.q[...].dtype == jnp.bfloat16
    nnx.update(low, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(ref)))
    batch = packed_batch(7, batch=2, length=16, vocab=128, segment_lengths=(16,))
    out, expected = _logits(low, batch), _logits(ref, batch)
    assert out.dtype == np.float32
    assert np.abs(out - expected).max() < 0.05 * np.abs(expected).max()


def test_feature_switches_change_the_numbers_they_should():
    base = tiny_model_config()
    batch = packed_batch(8, batch=1, length=16, vocab=128, segment_lengths=(16,))
    ref = _logits(Decoder(base, rngs=nnx.Rngs(8)), batch)
    for change in (
        dict(mlp_activation="gelu_tanh"),
        dict(embed_scale=True),
        dict(rope_theta=500_000.0),
        dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=4),
        dict(tie_embeddings=False),
    ):
        out = _logits(Decoder(dataclasses.replace(base, **change), rngs=nnx.Rngs(8)), batch)
        assert not np.allclose(out, ref), change
    # Gemma's norm stores w and scales by 1 + w: initialised at zero it is the identity too.
    gemma = Decoder(dataclasses.replace(base, norm_plus_one=True), rngs=nnx.Rngs(8))
    assert float(jnp.abs(gemma.final_norm.scale[...]).max()) == 0.0
    np.testing.assert_allclose(_logits(gemma, batch), ref, rtol=1e-6)
    with_bias = Decoder(dataclasses.replace(base, qkv_bias=True), rngs=nnx.Rngs(8))
    with_bias.blocks.attn.k_bias[...] = jnp.ones_like(with_bias.blocks.attn.k_bias[...])
    assert not np.allclose(_logits(with_bias, batch), ref)


def test_llama3_frequency_scaling_matches_its_definition():
    from itune.model import attention

    cfg = tiny_model_config(
        head_dim=128,
        rope_theta=500_000.0,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=8192,
    )
    scaled = attention.rope_frequencies(cfg)
    plain = attention.rope_frequencies(dataclasses.replace(cfg, rope_scaling="none"))
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-6)
    between = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert between.any()
    assert np.all(scaled[between] <= plain[between]) and np.all(
        scaled[between] >= plain[between] / 8
    )


def test_presets_have_the_published_sizes():
    from itune.model.decoder import ModelConfig

    sizes = {
        "smollm2-135m": 134_515_008,
        "llama3-8b": 8_030_261_248,
        "llama3-70b": 70_553_706_496,
        "mistral-7b": 7_248_023_552,
        "qwen2.5-0.5b": 494_032_768,
        "gemma-2b": 2_506_172_416,
    }
    for name, size in sizes.items():
        assert ModelConfig.from_config(configlib.model_section(name)).num_params() == size, name
    tiny = ModelConfig.from_config(configlib.model_section("tiny"), vocab_size=300)
    assert tiny.vocab_size == 300 and tiny.num_params() < 1_000_000
    overridden = ModelConfig.from_config(configlib.model_section("llama3-8b", num_layers=2))
    assert overridden.num_layers == 2 and overridden.d_model == 4096
    with pytest.raises(ValueError, match="known presets"):
        ModelConfig.from_config(configlib.model_section("llama9"))


@pytest.mark.parametrize("sliding_window", [0, 5])
def test_attention_in_query_blocks_equals_one_block(sliding_window):
    """Causal self-attention over 32 positions in 4 query blocks of 8, each against the keys up
    to its end, against the whole score matrix at once and against autodiff of JAX's own
    attention with the same mask; output and gradients."""
    from itune.model import attention

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 32, 6, 8))
    k, v = jax.random.normal(kk, (2, 32, 2, 8)), jax.random.normal(kv, (2, 32, 2, 8))
    segments = np.array([[1] * 10 + [2] * 17 + [0] * 5, [1] * 32])
    mask = attention.attention_mask(jnp.asarray(segments), sliding_window)[:, None]

    def run(block):
        def f(q, k, v):
            if block:
                out = attention.dot_product_attention(q, k, v, segments, sliding_window, block)
            else:
                out = jax.nn.dot_product_attention(q, k, v, mask=mask)
            return jnp.sum(jnp.sin(out)), out

        return quick_jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (grads, out), (one_block_grads, one_block_out) = run(8), run(32)
    np.testing.assert_allclose(out, one_block_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, one_block_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The written-out backward against autodiff of JAX's attention.
    reference_grads, reference_out = run(0)
    np.testing.assert_allclose(out, reference_out, atol=1e-5)
    for got, want in zip(grads, reference_grads):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_soft_capped_scaled_attention_and_its_backward_against_autodiff():
    """Scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped (Gemma 2), in query blocks
    with the written-out backward, against autodiff of the plain formula; the decoding path
    (`cached_attention`) computes the same."""
    from itune.model import attention

    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = 3 * jax.random.normal(kq, (2, 32, 4, 8))
    k, v = jax.random.normal(kk, (2, 32, 2, 8)), jax.random.normal(kv, (2, 32, 2, 8))
    segments = np.array([[1] * 32, [1] * 32])
    scale, cap, window = 0.2, 2.0, 6
    mask = attention.attention_mask(jnp.asarray(segments), window)

    def reference(q, k, v):
        kr, vr = (jnp.repeat(x, 2, axis=2) for x in (k, v))
        scores = jnp.einsum("bthd,bshd->bhts", q, kr) * scale
        scores = cap * jnp.tanh(scores / cap)
        scores = jnp.where(mask[:, None], scores, -1e30)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), vr)

    def blocked(q, k, v):
        return attention.dot_product_attention(
            q, k, v, segments, window, block=8, scale=scale, softcap=cap
        )

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a)))

    np.testing.assert_allclose(quick_jit(blocked)(q, k, v), reference(q, k, v), atol=1e-5)
    assert np.abs(jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, 2)) * scale).max() > 2 * cap
    for got, want in zip(
        quick_jit(jax.grad(loss(blocked), (0, 1, 2)))(q, k, v),
        quick_jit(jax.grad(loss(reference), (0, 1, 2)))(q, k, v),
    ):
        np.testing.assert_allclose(got, want, atol=2e-5)
    positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
    cached = attention.cached_attention(q, k, v, positions, jnp.asarray(window), scale, cap)
    np.testing.assert_allclose(cached, reference(q, k, v), atol=1e-5)


def _gemma3_like(**overrides):
    values = dict(
        num_layers=5,
        sliding_window=3,
        global_layer_every=2,
        rope_local_theta=100.0,
        rope_scaling="linear",
        rope_scaling_factor=4.0,
        qk_norm=True,
        post_norms=True,
        norm_plus_one=True,
        embed_scale=True,
        query_pre_attn_scalar=12.0,
        attn_logit_softcap=5.0,
        final_logit_softcap=3.0,
    )
    values.update(overrides)
    return tiny_model_config(**values)


def test_local_and_global_layers_scanned_equal_them_unrolled():
    """A model whose layers differ (sliding and global, each with its RoPE) under one scan over
    one stacked parameter tree computes what the unrolled layers do, forward and backward; and
    the scanned program does not grow with depth."""
    cfg = _gemma3_like()
    assert cfg.layer_is_sliding() == (True, False, True, False, True)
    model = Decoder(cfg, rngs=nnx.Rngs(4))
    params = jax.tree.map(
        lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), nnx.state(model)
    )
    batch = packed_batch(5, batch=2, length=12, vocab=128, segment_lengths=(7, 5))
    unrolled = Decoder(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(4))
    scanned_loss, scanned_grads = _loss_and_grads(nnx.merge(nnx.graphdef(model), params), batch)
    unrolled_loss, unrolled_grads = _loss_and_grads(
        nnx.merge(nnx.graphdef(unrolled), params), batch
    )
    np.testing.assert_allclose(scanned_loss, unrolled_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(unrolled_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Changing one global layer's RoPE scaling changes the output (the layers really differ).
    unscaled = nnx.merge(
        nnx.graphdef(Decoder(dataclasses.replace(cfg, rope_scaling="none"), rngs=nnx.Rngs(4))),
        params,
    )
    assert not np.allclose(
        _logits(unscaled, batch), _logits(nnx.merge(nnx.graphdef(model), params), batch)
    )

    def program_lines(num_layers):
        deep = nnx.eval_shape(
            lambda: Decoder(_gemma3_like(num_layers=num_layers), rngs=nnx.Rngs(0))
        )
        tokens = jnp.zeros((1, 8), jnp.int32)
        lowered = jax.jit(lambda m: m(tokens, tokens, tokens + 1)).lower(deep)
        return len(lowered.as_text().splitlines())

    assert program_lines(12) == program_lines(6)


def test_bfloat16_attention_backward_runs_in_bfloat16():
    """Every product of attention's bfloat16 forward and backward takes bfloat16 operands (XLA's
    CPU library path), and the gradients stay close to float32 attention's."""
    from itune.model import attention

    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 32, 6, 8))
    k, v = jax.random.normal(kk, (2, 32, 2, 8)), jax.random.normal(kv, (2, 32, 2, 8))
    segments = np.array([[1] * 20 + [2] * 12, [1] * 32])

    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, segments, 0, 8)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    low = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    dots = [
        eqn for eqn in jax.make_jaxpr(grad)(*low).jaxpr.eqns if eqn.primitive.name == "dot_general"
    ]
    assert len(dots) == 4 * 2 + 4 * 5  # Per block, 2 products forward and 5 backward.
    assert all(x.aval.dtype == jnp.bfloat16 for eqn in dots for x in eqn.invars)
    for got, want in zip(grad(*low), grad(q, k, v)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want, atol=0.05 * np.abs(want).max()
        )


def _dots(jaxpr, batched: bool) -> int:
    """dot_generals with (``batched``) or without batch dimensions in ``jaxpr`` and the jaxprs
    nested in it: attention's products, or the projections."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += bool(eqn.params["dimension_numbers"][1][0]) == batched
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _dots(sub.jaxpr, batched)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _dots(sub, batched)
    return count


def test_save_dots_keeps_projections_and_attention_residuals_instead_of_recomputing_them():
    """Under ``remat="save_dots"`` the backward reuses the projections' saved results and
    attention's saved output and log-sum-exp: the gradient has as many products of each kind
    as without remat; ``full`` recomputes the forward's."""
    from itune.model.decoder import ModelConfig

    attention_products, projections = {}, {}
    for remat in ("none", "save_dots", "full"):
        section = configlib.model_section("tiny", remat=remat, max_seq_len=64)
        model = Decoder(ModelConfig.from_config(section, vocab_size=64), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        tokens = jnp.zeros((2, 64), jnp.int32)
        positions = jnp.tile(jnp.arange(64), (2, 1))

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))
            return jnp.sum(logits)

        jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
        attention_products[remat] = _dots(jaxpr, batched=True)
        projections[remat] = _dots(jaxpr, batched=False)
    # The layer scan's body: 2 forward, 5 back.
    assert attention_products["save_dots"] == attention_products["none"] == 7
    assert attention_products["full"] == attention_products["none"] + 2
    # 7 projections per layer, 3 products each (the forward and two gradients), and the logits'.
    assert projections["save_dots"] == projections["none"] == 7 * 3 + 3
    # full recomputes all but the MLP's output projection, whose result no backward reads.
    assert projections["full"] == projections["none"] + 6


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """The operand types of every dot in compiled HLO text (operands are named in the same
    computation, usually a fusion's parameters)."""
    found = []
    for computation in re.split(r"\n(?=\S)", hlo):
        for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", computation):
            types = []
            for name in (lhs, rhs):
                match = re.search(rf"%{re.escape(name)} = (\w+)\[", computation)
                types.append(match.group(1) if match else "?")
            found.append(tuple(types))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled program")
def test_compiled_bfloat16_step_keeps_xla_cpu_on_its_fast_paths():
    """The bfloat16 gradient of a scanned, ``save_dots`` model as XLA:CPU compiles it: every
    product takes bfloat16 operands (none was moved to float32 for a transposed operand), and
    no stack of per-layer residuals goes through float32 (XLA:CPU updates a layer's slice of a
    bfloat16 stack by converting the whole stack, at every layer)."""
    cfg = tiny_model_config(
        vocab_size=256,
        d_model=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        dtype="bfloat16",
        remat="save_dots",
        max_seq_len=256,
    )
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = packed_batch(0, 2, 256, cfg.vocab_size, segment_lengths=(100, 60, 96))

    def loss(params):
        logits = nnx.merge(graphdef, params)(
            batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        return jnp.mean(logits)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    operand_types = _dot_operand_types(hlo)
    assert len(operand_types) >= 7 * 3  # Projections forward and backward, attention, logits.
    assert all(types == ("bf16", "bf16") for types in operand_types), operand_types
    stacked = rf"f32\[{cfg.num_layers},[\d,]+\]\S* convert\(\S+\)"
    converted_stacks = [
        line
        for line in hlo.splitlines()
        if re.search(stacked, line)
        and re.search(r"convert\(%[\w.\-]+\)", line)
        and _operand_is_bfloat16(hlo, line)
    ]
    assert not converted_stacks, converted_stacks


def _operand_is_bfloat16(hlo: str, line: str) -> bool:
    name = re.search(r"convert\(%([\w.\-]+)\)", line).group(1)
    return bool(re.search(rf"%{re.escape(name)} = bf16\[", hlo))


def test_gemma3_trains_in_bfloat16_without_non_finite_steps():
    """A Gemma 3 shape (q/k norm, four norms, local and global layers, embedding scale) with
    bfloat16 parameters and computation trains for a few steps at a high learning rate: every
    step finite, the loss falling (scores, soft-caps, norms and the loss run in float32)."""
    from tests.util import jitted_train_step, optim_config

    cfg = _gemma3_like(
        attn_logit_softcap=0.0,
        final_logit_softcap=0.0,
        dtype="bfloat16",
        param_dtype="bfloat16",
        mlp_activation="gelu_tanh",
    )
    # Rows of two attention blocks (XLA:CPU runs bfloat16 products of one block of 128 or
    # fewer queries through a kernel without bfloat16).
    batch = packed_batch(7, batch=2, length=256, vocab=cfg.vocab_size, segment_lengths=(256,))
    batch["loss_mask"][:] = 1
    _, state, run = jitted_train_step(cfg, optim_config(learning_rate=3e-2), num_steps=8)
    losses = []
    for _ in range(8):
        state, metrics = run(state, batch)
        assert float(metrics["nonfinite"]) == 0.0
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
