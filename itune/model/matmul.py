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

import jax
import jax.numpy as jnp


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def matmul(equation: str, x: jax.Array, w: jax.Array, dtype, out_dtype=None) -> jax.Array:
    """``einsum(equation, x, w)`` with inputs in ``dtype``, float32 accumulation and the result
    in ``out_dtype`` (default ``dtype``; float32 for logits), and a backward in ``dtype`` with
    float32 accumulation (module docstring)."""
    _transposed_equations(equation)  # Rejects an equation the backward could not transpose.
    return _einsum(equation, x, w, dtype).astype(out_dtype or dtype)


def _forward(equation, x, w, dtype, out_dtype):
    return matmul(equation, x, w, dtype, out_dtype), (x, w)


def _backward(equation, dtype, out_dtype, residuals, g):
    x, w = residuals
    dx_equation, dw_equation = _transposed_equations(equation)
    dx = _einsum(dx_equation, g, w, dtype).astype(x.dtype)
    dw = _einsum(dw_equation, x, g, dtype).astype(w.dtype)
    return dx, dw


matmul.defvjp(_forward, _backward)
