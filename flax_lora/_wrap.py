"""`lora.wrap`: the function transform that runs a model with its adapters."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.typing import ArrayLike

from flax_lora._adapters._substitute import substitute
from flax_lora._adapters._tables import split, stacked_table
from flax_lora._adapters._weights import is_lora, is_stacked
from flax_lora._factored._contract import RoutingFallback
from flax_lora._factored._trace import Tracer, call_factored, call_routed
from flax_lora._merge import merge
from flax_lora._multi._stack import check_ids, num_stacked, select
from flax_lora._quant._formats import has_quantized
from flax_lora._quant._tree import dequantize
from flax_lora._typing import MODES, Key, Mode, PyTree


def wrap(apply_fn: Callable[..., PyTree], mode: Mode = "auto") -> Callable[..., PyTree]:
    """Transforms ``apply_fn(params, *args)`` into ``fn(params, adapters, *args)``.

    The wrapped function computes ``apply_fn(lora.merge(params, adapters), *args, **kwargs)``
    to float32 rounding and composes with ``jax.jit``, ``jax.grad``, ``jax.vmap`` and
    ``jax.checkpoint``; ``params`` is never rewritten and ``adapters=None`` runs the base. The
    factored modes trace ``apply_fn`` once per input structure, shapes and statics (as
    ``jax.jit``: arrays it closes over are captured once) and compute each use of an adapted
    kernel as ``op(x, W0) + scale * op(op(x, a), b)``, forming no kernel-sized weight gradient.
    Trained copies and token deltas are applied to ``params`` first; quantized kernels are
    dequantized at their uses. Guide: `docs/guides/wrap.md`.

    Forward- and reverse-mode differentiation work in every mode (``jax.grad``, ``jax.jvp``,
    ``jax.jacfwd``, ``jax.hessian``), except forward mode through a quantized kernel (QLoRA) in
    the factored modes: use ``mode="merged"`` there.

    Examples:
      >>> model, x = nn.Dense(4), jnp.ones((2, 3))
      >>> params = model.init(jax.random.key(0), x)
      >>> adapters = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2, dropout=0.1))
      >>> fn = jax.jit(lora.wrap(model.apply))  # fn(params, adapters, x)
      >>> fn(params, adapters, x).shape
      (2, 4)
      >>> grads = jax.grad(lambda ad: fn(params, ad, x).sum())(adapters)  # the adapters only
      >>> grads["params"]["kernel"].a.shape, grads["params"]["kernel"].b.shape
      ((3, 2), (2, 4))
      >>> y = fn(params, adapters, x, lora_rng=jax.random.key(2))  # with LoRA dropout

    Args:
      apply_fn: any function whose first argument is the params pytree (a Linen
        ``model.apply``, ``lambda state, x: nnx.merge(graphdef, state)(x)``, plain JAX). Array
        leaves of the other arguments are traced; other leaves are static.
      mode: ``"auto"`` factors every use it can and merges the others, silently;
        ``"factored"`` never forms an adapted kernel and raises for a use it cannot factor;
        ``"merged"`` always forms ``W0 + scale * a @ b`` (as `merge`).

    Returns:
      ``fn(params, adapters, *args, lora_rng=None, lora_ids=None, **kwargs)``. ``lora_rng``, a
      PRNG key, turns on LoRA dropout at each adapter's rate (none in mode ``"merged"``).
      ``lora_ids``, integers of shape ``(B,)``, runs example ``j`` through adapter
      ``lora_ids[j]`` of a `lora.stack` tree (``-1``: the base), one compilation for any ids;
      see `docs/guides/multi_adapter.md`.

    Raises:
      ValueError: an unknown ``mode``; in mode ``"factored"``, a use of an adapted kernel that
        cannot be factored (naming the kernel path and the operation); adapters for paths that
        are not kernels of ``params`` or of the wrong shape (naming the path); with
        ``lora_ids``, ids out of range, a batch size that differs between inputs or from the
        ids, a per-example keyword input or an output without a batch axis.
      TypeError: ``lora_ids`` not integers, or a plain (unstacked) adapter tree with ``lora_ids``.
    """
    if mode not in MODES:
        raise ValueError(f"lora.wrap: mode must be one of {MODES}; got {mode!r}.")
    tracer = Tracer(apply_fn)

    def run(
        params: PyTree,
        adapters: PyTree,
        args: tuple[PyTree, ...],
        kwargs: dict[str, PyTree],
        rng: Key,
    ) -> PyTree:
        # trained copies and token deltas replace / change base leaves before anything runs
        adapters, extras = split(adapters, is_lora)
        params = substitute(params, extras)
        if adapters is None:
            return apply_fn(dequantize(params), *args, **kwargs)
        if mode == "merged":
            if has_quantized(params):  # merged at each use: per layer inside a scan
                return call_factored(tracer, mode, params, adapters, args, kwargs, None)
            return apply_fn(merge(params, adapters), *args, **kwargs)
        # quantized kernels are dequantized at their uses (`flax_lora._factored._quant`)
        return call_factored(tracer, mode, params, adapters, args, kwargs, rng)

    @functools.wraps(apply_fn)
    def wrapped(
        params: PyTree,
        adapters: PyTree,
        *args: PyTree,
        lora_rng: jax.Array | None = None,
        lora_ids: ArrayLike | Sequence[int] | None = None,
        **kwargs: PyTree,
    ) -> PyTree:
        if mode == "merged" and lora_rng is not None:
            warnings.warn(
                "lora.wrap(mode='merged') applies no LoRA dropout, so lora_rng is ignored; use "
                "mode='auto' or 'factored' for dropout on the LoRA branch (PEFT's lora_dropout).",
                stacklevel=2,
            )
        if lora_ids is None:
            return run(params, adapters, args, kwargs, lora_rng)
        params = dequantize(params)
        if mode != "merged" and not split(adapters, is_stacked)[1]:
            table = stacked_table(adapters)
            sizes = _leading_sizes(args)  # the batch, when the positional inputs agree on one
            batch = next(iter(sizes)) if len(sizes) == 1 else None
            ids = check_ids(lora_ids, next(iter(table.values())).num_adapters, batch)
            out = call_routed(tracer, mode, params, adapters, ids, args, kwargs, lora_rng)
            if not isinstance(out, RoutingFallback):
                return out
            if mode == "factored":
                raise ValueError(
                    f"lora.wrap(mode='factored') with lora_ids: {out.reason}, so the batch cannot "
                    "be routed kernel by kernel. Use mode='auto' (it then runs each example as a "
                    "batch of one) or mode='merged'."
                )
        return _routed(run, params, adapters, args, kwargs, lora_rng, lora_ids)

    del wrapped.__wrapped__  # so that inspect.signature / help() show the wrapped signature
    return wrapped


def _leading_sizes(args: tuple[PyTree, ...]) -> set[int | None]:
    """The sizes of axis 0 of the positional inputs' leaves (``None`` for a scalar)."""
    return {int(np.shape(x)[0]) if np.ndim(x) else None for x in jax.tree.leaves(args)}


def _routed(
    run: Callable[[PyTree, PyTree, tuple[PyTree, ...], dict[str, PyTree], Key], PyTree],
    params: PyTree,
    stacked: PyTree,
    args: tuple[PyTree, ...],
    kwargs: dict[str, PyTree],
    rng: Key,
    ids: ArrayLike | Sequence[int],
) -> PyTree:
    """Example ``j`` of the batch through adapter ``ids[j]``: a `jax.vmap` over the examples.

    Inside the map each example runs as a batch of one with its own factors, gathered from the
    stack (`select`); the base kernels are not mapped, so JAX batches each base op back into one
    op over the whole batch, and only the low-rank branches (and, for uses that cannot be
    factored, the merged kernels) are per example.
    """
    n = num_stacked(stacked)
    sizes = _leading_sizes(args)
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "lora_ids routes along axis 0 of every positional input, so each needs the same "
            f"leading (batch) size; got leading sizes {sorted(str(b) for b in sizes)}. Pass "
            "inputs that are not per-example as keyword arguments."
        )
    batch = sizes.pop()
    assert batch is not None  # checked above: one size, not None
    ids = check_ids(ids, n, batch)
    keys = None if rng is None else jax.random.split(rng, batch)

    def one(index: jax.Array, key: Key, example: tuple[PyTree, ...]) -> PyTree:
        single = jax.tree.map(lambda x: x[None], example)
        out = run(params, select(stacked, index, params), single, kwargs, key)
        flat, _ = jax.tree_util.tree_flatten_with_path(out)
        bad = [(jax.tree_util.keystr(kp), np.shape(y)) for kp, y in flat if np.shape(y)[:1] != (1,)]
        if bad:  # e.g. a per-example keyword input broadcast against the batch of one
            raise ValueError(
                "lora_ids runs each example as a batch of one and takes row 0 of every output, "
                "but for one example the model returned outputs whose leading size is not 1: "
                + ", ".join(f"output{k or ''} of shape {s}" for k, s in bad[:5])
                + ". Inputs given per example (a per-example mask, positions, ...) must be "
                "positional arguments (split along axis 0); keyword arguments are passed whole "
                "to every example. Outputs without a batch axis (scalars, mutable collections) "
                "cannot be routed."
            )
        return jax.tree.map(lambda y: y[0], out)

    return jax.vmap(one)(ids, keys, args)
