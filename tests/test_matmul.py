"""Weight matmuls: the written-out backward equals autodiff in float32, and in bfloat16 every
matmul of the backward takes bfloat16 inputs with float32 accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from itune.model.matmul import matmul

# The decoder's projections: q/k/v, attention output, MLP in and out, tied and separate logits.
SHAPES = {
    "btd,dhk->bthk": ((2, 5, 8), (8, 3, 4)),
    "bthk,hkd->btd": ((2, 5, 3, 4), (3, 4, 8)),
    "btd,dm->btm": ((2, 5, 8), (8, 12)),
    "btm,md->btd": ((2, 5, 12), (12, 8)),
    "btd,vd->btv": ((2, 5, 8), (20, 8)),
    "btd,dv->btv": ((2, 5, 8), (8, 20)),
}


def _operands(equation, seed=0):
    x_shape, w_shape = SHAPES[equation]
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    out_shape = jnp.einsum(equation, x, w).shape
    return x, w, jax.random.normal(kg, out_shape, jnp.float32)


@pytest.mark.parametrize("equation", list(SHAPES))
def test_float32_matches_autodiff_of_einsum(equation):
    x, w, g = _operands(equation)
    out, vjp = jax.vjp(lambda x, w: matmul(equation, x, w, jnp.float32), x, w)
    ref_out, ref_vjp = jax.vjp(lambda x, w: jnp.einsum(equation, x, w), x, w)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation", list(SHAPES))
def test_bfloat16_gradients_are_close_and_in_the_operands_dtypes(equation):
    x, w, g = _operands(equation, seed=1)
    x16 = x.astype(jnp.bfloat16)  # Activations in the compute dtype, parameters in float32.
    out, vjp = jax.vjp(lambda x, w: matmul(equation, x, w, jnp.bfloat16), x16, w)
    dx, dw = vjp(g.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    _, ref_vjp = jax.vjp(lambda x, w: jnp.einsum(equation, x, w), x16.astype(jnp.float32), w)
    ref_dx, ref_dw = ref_vjp(g.astype(jnp.bfloat16).astype(jnp.float32))
    scale = float(jnp.abs(ref_dw).max())
    np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx, atol=0.02 * scale)
    np.testing.assert_allclose(dw, ref_dw, atol=0.02 * scale)


def _dot_input_dtypes(fn, *args):
    """The input dtypes of every dot_general in ``fn``'s jaxpr, nested jaxprs included."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr's Jaxpr.
                    if hasattr(sub, "eqns"):
                        visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_the_bfloat16_backward_runs_every_matmul_in_bfloat16():
    equation = "btd,dv->btv"  # Logits: a float32 result, hence a float32 cotangent.
    x, w, _ = _operands(equation)
    x16 = x.astype(jnp.bfloat16)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    ours = jax.grad(loss(lambda x, w: matmul(equation, x, w, jnp.bfloat16, jnp.float32)), (0, 1))
    dots = _dot_input_dtypes(ours, x16, w)
    assert len(dots) == 3 and all(d == ("bfloat16", "bfloat16") for d in dots), dots
    # Plain autodiff of the same forward would promote the backward to float32.
    plain = jax.grad(
        loss(
            lambda x, w: jnp.einsum(
                equation, x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32
            )
        ),
        (0, 1),
    )
    assert any("float32" in dtypes for dtypes in _dot_input_dtypes(plain, x16, w))


def test_an_equation_it_cannot_transpose_is_named():
    # 't' is summed inside x alone: its gradient is not an einsum of the other two terms.
    with pytest.raises(ValueError, match=r"'btd,dm->bm'.*index 't'"):
        matmul("btd,dm->bm", jnp.ones((1, 2, 3)), jnp.ones((3, 4)), jnp.float32)


def test_tied_logits_weight_gradient_transposes_the_small_operand_on_cpu():
    """``dw`` of the tied logits (``"btd,vd->btv"``) equals autodiff's; on CPU it is computed as
    ``[d, v]`` from the transposed hidden states, never by transposing the vocabulary-wide
    cotangent."""
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (4, 32, 16), jnp.float32)
    w = jax.random.normal(kw, (512, 16), jnp.float32)
    g = jax.random.normal(kg, (4, 32, 512), jnp.float32)
    equation = "btd,vd->btv"
    _, vjp = jax.vjp(lambda x, w: matmul(equation, x, w, jnp.float32), x, w)
    _, ref_vjp = jax.vjp(lambda x, w: jnp.einsum(equation, x, w), x, w)
    for got, want in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    def weight_gradient(x, w, g):
        return jax.vjp(lambda w: matmul(equation, x, w, jnp.bfloat16, jnp.float32), w)[1](g)[0]

    hlo = jax.jit(weight_gradient).lower(x.astype(jnp.bfloat16), w, g).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    if jax.default_backend() == "cpu":
        assert any(" f32[16,512]" in line for line in dots), dots
        assert not any(" f32[512,16]" in line for line in dots), dots
