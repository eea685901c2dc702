"""`lora.wrap`: the function transform that runs a model with its adapters."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flax_lora._factored import Tracer, call_factored
from flax_lora._merge import merge

PyTree = Any
MODES = ("auto", "merged", "factored")


def wrap(apply_fn: Callable[..., Any], mode: str = "auto") -> Callable[..., Any]:
    """Transforms ``apply_fn(params, *args)`` into ``fn(params, adapters, *args)``.

    The wrapped function computes ``apply_fn(lora.merge(params, adapters), *args, **kwargs)``
    (to float32 rounding) and composes with ``jax.jit``, ``jax.grad``, ``jax.vmap`` and
    ``jax.checkpoint``; the base params are never rewritten outside the traced computation.
    ``adapters=None`` runs the base.

    In the factored modes ``apply_fn`` is traced to a jaxpr (once per input shapes, at trace
    time) and re-evaluated with each use of an adapted kernel replaced by
    ``op(x, W0) + scale * op(op(x, a), b)``: ``dot_general`` (Dense, DenseGeneral, Einsum, and
    ``Embed.attend``, which contracts the table on its output axis), ``gather`` (Embed lookup:
    rows of ``a`` times ``b``) and ``conv_general_dilated`` (``conv(x, a)`` then ``b``; not for
    grouped convolutions). The backward pass then computes no full weight gradient, which is
    where LoRA's training speed comes from. Dtype promotion, transposes, reshapes, nested
    ``jit`` and remat regions (re-wrapped with their checkpoint policy) are seen through. The
    trace is cached per input structure, shapes and static arguments, as ``jax.jit`` caches
    its traces (so, as with ``jax.jit``, arrays that ``apply_fn`` closes over are captured
    once).

    Sharp edge: the factored Dense branch has a hand-written backward pass (a
    ``jax.custom_vjp``), so forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``,
    ``jax.hessian``) of the factored modes raises; use ``mode="merged"`` for those.

    Example:
      >>> fn = jax.jit(lora.wrap(model.apply))
      >>> y = fn(params, adapters, x)
      >>> grads = jax.grad(lambda ad: loss(fn(params, ad, x)))(adapters)
      >>> y = fn(params, adapters, x, lora_rng=jax.random.key(0))  # with LoRA dropout

    Args:
      apply_fn: any function whose first argument is the params pytree: a Linen
        ``model.apply``, ``lambda state, x: nnx.merge(graphdef, state)(x)``, or plain JAX.
        Array leaves of the other arguments are traced; any other leaf (Python numbers,
        strings, flags) is treated as static.
      mode: ``"auto"`` (default) factors every use it can and merges the other kernels
        (``W0 + scale * a @ b`` inside the trace), silently; ``"factored"`` never materialises
        an adapted kernel and raises ``ValueError`` naming the kernel path and the operation
        for a use it cannot factor (``scan``, ``cond``, custom derivatives, arithmetic on the
        kernel itself, ...); ``"merged"`` always forms ``W0 + scale * a @ b`` (as `merge`).

    Returns:
      ``fn(params, adapters, *args, lora_rng=None, **kwargs)``. ``lora_rng``, a PRNG key,
      turns on dropout on the LoRA branch inputs at each adapter's ``dropout`` rate (PEFT's
      ``lora_dropout``; inverted dropout, none for Embed lookups, as PEFT); without it, or in
      mode ``"merged"``, no dropout is applied.
    """
    if mode not in MODES:
        raise ValueError(f"lora.wrap: mode must be one of {MODES}; got {mode!r}.")
    tracer = Tracer(apply_fn)

    @functools.wraps(apply_fn)
    def wrapped(
        params: PyTree, adapters: PyTree, *args: Any, lora_rng: Any = None, **kwargs: Any
    ) -> Any:
        if adapters is None:
            return apply_fn(params, *args, **kwargs)
        if mode == "merged":
            return apply_fn(merge(params, adapters), *args, **kwargs)
        return call_factored(tracer, mode, params, adapters, args, kwargs, lora_rng)

    return wrapped
