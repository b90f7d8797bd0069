"""Matmuls in a compute dtype, accumulated in float32, with a mixed-precision backward.

``matmul("btd,dm->btm", x, w, "bfloat16")`` is ``einsum`` of ``x`` and ``w`` cast to bfloat16
with a float32 accumulator, returned in bfloat16. Under plain autodiff its backward would run in
float32: the float32 accumulator makes the cotangent float32, and a float32 cotangent times a
bfloat16 operand promotes both to float32. Here the backward is written out instead, as mixed
precision trains (PyTorch's autocast does the same): the cotangent is cast to the compute dtype,
and both gradients are einsums of compute-dtype inputs accumulated in float32,

    dx = einsum("btm,dm->btd", g, w)     dw = einsum("btd,btm->dm", x, g)

each returned in its operand's own dtype (float32 gradients for float32 parameters). On CPU
this keeps the step's matmuls on XLA's bfloat16 library path (`bench/train_step.py` prints
its peak beside float32's); on TPU and GPU the backward reads bfloat16 cotangents. In float32
it is the same computation as autodiff.

Each index of the equation must appear in at least two of its three terms (contracted, kept or
batched; never summed inside one operand), as in every projection of a transformer.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def _transposed_equations(equation: str) -> tuple[str, str]:
    """The equations of ``dx`` and ``dw`` for ``equation`` = ``"x,w->y"``."""
    operands, out = equation.replace(" ", "").split("->")
    x, w = operands.split(",")
    for index in set(x + w + out):
        if (index in x) + (index in w) + (index in out) < 2:
            raise ValueError(
                f"matmul equation {equation!r}: index {index!r} appears in one term only; "
                "each index must be contracted, kept or batched"
            )
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


def _einsum(equation, a, b, dtype):
    return jnp.einsum(
        equation, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32
    )


# The name of each projection's float32 result, for remat policies (`jax.ad_checkpoint`).
PROJECTION = "projection"


def matmul(equation: str, x: jax.Array, w: jax.Array, dtype, out_dtype=None) -> jax.Array:
    """``einsum(equation, x, w)`` with inputs in ``dtype``, float32 accumulation and the result
    in ``out_dtype`` (default ``dtype``; float32 for logits), and a backward in ``dtype`` with
    float32 accumulation (module docstring). The float32 result is named `PROJECTION`, so that
    a remat policy can keep it: the product itself is a custom-gradient call, which
    `jax.checkpoint_policies.checkpoint_dots` does not see as a dot."""
    _transposed_equations(equation)  # Rejects an equation the backward could not transpose.
    y = checkpoint_name(_accumulated(equation, x, w, dtype), PROJECTION)
    return y.astype(out_dtype or dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _accumulated(equation: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    return _einsum(equation, x, w, dtype)


def _forward(equation, x, w, dtype):
    return _accumulated(equation, x, w, dtype), (x, w)


def written_out(x: jax.Array) -> jax.Array:
    """``x`` as an array of its own in memory, in its logical row-major order.

    XLA folds a transpose into the product that reads it, as a transposed operand or result,
    and XLA:CPU's bfloat16 library path takes neither: it runs such a product in float32 on a
    slower path. A flat array has a single layout, so a barrier around the flattened value makes
    XLA write the transpose out."""
    return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def _weight_gradient(dw_equation: str, x, g, dtype):
    """``einsum(dw_equation, x, g)`` in ``dtype`` with float32 accumulation.

    When the weight's indices come first from ``g`` (``"btd,btv->vd"``, the tied logits) XLA
    transposes ``g`` to compute it, which for the logits is the whole ``[tokens, vocabulary]``
    cotangent. On CPU the product is computed the other way round instead, with the far smaller
    ``x`` transposed and the result transposed after it."""
    operands, w_terms = dw_equation.split("->")
    x_terms, g_terms = operands.split(",")
    x_free = "".join(i for i in w_terms if i in x_terms)
    g_free = "".join(i for i in w_terms if i not in x_terms)
    contracted = "".join(i for i in x_terms if i not in w_terms)

    def plain(x, g):
        return _einsum(dw_equation, x, g, dtype)

    sizes = dict(zip(x_terms, x.shape)) | dict(zip(g_terms, g.shape))
    w_size = math.prod(sizes[i] for i in w_terms)
    if w_terms == x_free + g_free or g.size <= x.size + w_size:
        return plain(x, g)  # XLA transposes x, or nothing: already the cheaper way.

    def small_operand_transposed(x, g):
        x_t = written_out(jnp.einsum(f"{x_terms}->{x_free}{contracted}", x.astype(dtype)))
        w_t = _einsum(f"{x_free}{contracted},{g_terms}->{x_free}{g_free}", x_t, g, dtype)
        return jnp.einsum(f"{x_free}{g_free}->{w_terms}", written_out(w_t))

    return jax.lax.platform_dependent(x, g, cpu=small_operand_transposed, default=plain)


def _backward(equation, dtype, residuals, g):
    x, w = residuals
    dx_equation, dw_equation = _transposed_equations(equation)
    dx = _einsum(dx_equation, g, w, dtype).astype(x.dtype)
    dw = _weight_gradient(dw_equation, x, g, dtype).astype(w.dtype)
    return dx, dw


_accumulated.defvjp(_forward, _backward)
