"""A kernel view scaled by a scalar: ``w * c`` and ``w / c`` (``mul`` / ``div``).

Gemma 3n / 4 scale a kernel before its use (``w * w_scale``, ``w_scale`` a Python or NumPy
constant, or a scalar array computed in the model). JAX binds such a product with the scalar
as a shape-``()`` operand of ``mul``. A scalar commutes with every layout op and with the
product of the factors, so

    c * (W0 + scale * a @ b) == c * W0 + scale * a @ (c * b)

and the view stays factored (a value of size 1 that JAX broadcasts, shape ``(1, 1)``, is a
scalar too): its base becomes ``c * W0`` (the equation bound as the model binds
it), its ``b`` (and ``root_b``, with ``root`` scaled likewise, for `materialize`) ``c * b``.
Gradients reach ``a`` and ``b`` through the scaled ``b``. Not factored: a multiplier that is
not a scalar (a per-element or per-axis array), a kernel divided *into* something (``c / w``),
a product of two kernels, and a DoRA view (its normalised kernel does not scale with ``W0``).
A quantized ``W0`` (QLoRA) is dequantized at the product, which the model computes anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from flax_lora import _jaxpr as jx
from flax_lora._factored._contract import Evaluator, InterpValue, Result, Unfactored, no_rule
from flax_lora._factored._quant_base import as_array, is_quant_base
from flax_lora._factored._view import KernelView
from flax_lora._typing import Key

SCALINGS: dict[str, Callable[[ArrayLike, ArrayLike], jax.Array]] = {
    "mul": jnp.multiply,
    "div": jnp.divide,
}
"""The primitives of a kernel scaled by a scalar, and the same operation on a factor."""


def scale_rule(interp: Evaluator, eqn: jx.Eqn, invals: list[InterpValue], key: Key) -> Result:
    """``mul`` / ``div`` of a kernel view by a scalar: the view with ``W0`` and ``b`` scaled."""
    del interp, key
    name = eqn.primitive.name
    at = [k for k, x in enumerate(invals) if isinstance(x, KernelView)]
    if len(at) != 1 or any(is_quant_base(x) for x in invals):
        return no_rule(invals)  # two kernels, or a quantized kernel without adapter
    v, c = invals[at[0]], invals[1 - at[0]]
    if v.meta.why is not None:
        return no_rule(invals)
    if name == "div" and at[0] != 0:
        return Unfactored("the kernel is the divisor")
    if jnp.size(c) != 1 or jx.shape(eqn.outvars[0]) != v.shape:
        return Unfactored(
            f"the kernel is scaled by an array of shape {tuple(jnp.shape(c))}, not by a scalar"
        )
    c = jnp.reshape(c, ())  # a size-1 value JAX broadcasts (``w * np.array([c])``)
    if v.g is not None:
        return Unfactored("a DoRA kernel scaled by a constant")
    ins = list(invals)
    ins[at[0]] = as_array(v.base)  # a quantized W0 is dequantized at this use
    base = jx.bind(eqn, ins)[0]  # c * W0, as the model computes it
    op = SCALINGS[name]
    of = lambda x: op(x, jnp.asarray(c, x.dtype)) if x is not None else None
    # the kernel the view stands for, scaled
    root = base if v.root is v.base else of(as_array(v.root))
    return [dataclasses.replace(v, base=base, b=of(v.b), root_b=of(v.root_b), root=root)]
