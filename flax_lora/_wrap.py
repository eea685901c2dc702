"""`lora.wrap`: the function transform that runs a model with its adapters."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flax_lora._merge import merge

PyTree = Any
MODES = ("auto", "merged", "factored")


def wrap(apply_fn: Callable[..., Any], mode: str = "auto") -> Callable[..., Any]:
    """Transforms ``apply_fn(params, *args)`` into ``fn(params, adapters, *args)``.

    The wrapped function computes ``apply_fn(lora.merge(params, adapters), *args, **kwargs)``
    (to float32 rounding) and composes with ``jax.jit``, ``jax.grad`` and ``jax.vmap``; the base
    params are never rewritten outside the traced computation. ``adapters=None`` runs the base.

    Example:
      >>> fn = jax.jit(lora.wrap(model.apply))
      >>> y = fn(params, adapters, x)
      >>> grads = jax.grad(lambda ad: loss(fn(params, ad, x)))(adapters)

    Args:
      apply_fn: any function whose first argument is the params pytree: a Linen
        ``model.apply``, ``lambda state, x: nnx.merge(graphdef, state)(x)``, or plain JAX.
      mode: ``"merged"`` forms ``W0 + scale * a @ b`` inside the traced function (always
        works); ``"factored"`` never materialises an adapted kernel
        (``x @ W0 + scale * (x @ a) @ b``); ``"auto"`` factors where supported and merges
        elsewhere.

    Returns:
      ``fn(params, adapters, *args, lora_rng=None, **kwargs)``.
    """
    if mode not in MODES:
        raise ValueError(f"lora.wrap: mode must be one of {MODES}; got {mode!r}.")
    if mode == "factored":
        raise NotImplementedError(
            "lora.wrap(mode='factored') is not implemented yet; use mode='merged' or 'auto'."
        )

    @functools.wraps(apply_fn)
    def wrapped(
        params: PyTree, adapters: PyTree, *args: Any, lora_rng: Any = None, **kwargs: Any
    ) -> Any:
        del lora_rng  # dropout on the LoRA branch needs factored execution
        if adapters is None:
            return apply_fn(params, *args, **kwargs)
        return apply_fn(merge(params, adapters), *args, **kwargs)

    return wrapped
