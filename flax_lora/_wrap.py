"""`lora.wrap`: the function transform that runs a model with its adapters."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flax_lora._adapters._extras import substitute
from flax_lora._adapters._tables import split, stacked_table
from flax_lora._adapters._weights import is_lora, is_stacked
from flax_lora._factored._trace import RoutingFallback, Tracer, call_factored, call_routed
from flax_lora._merge import merge
from flax_lora._multi._stack import check_ids, num_stacked, select
from flax_lora._quant._formats import has_quantized
from flax_lora._quant._tree import dequantize
from flax_lora._typing import MODES, Mode, PyTree


def wrap(apply_fn: Callable[..., Any], mode: Mode = "auto") -> Callable[..., Any]:
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
    ``jit``, remat regions (re-wrapped with their checkpoint policy) and ``scan`` loops over
    layer-stacked kernels (``nn.scan``/``nnx.scan``: run as a ``scan`` over per-layer slices of
    ``W0``, ``a`` and ``b``) are seen through. The
    trace is cached per input structure, shapes and static arguments, as ``jax.jit`` caches
    its traces (so, as with ``jax.jit``, arrays that ``apply_fn`` closes over are captured
    once).

    DoRA adapters (``LoraConfig(dora=True)``) are factored too: the layer output is scaled per
    output unit by ``m / ||W0 + scale * a @ b||``, the norm computed from ``W0``'s column norms
    and low-rank terms (detached from the gradient, as PEFT), never from a formed kernel.

    Trained copies (``LoraConfig(modules_to_save=..., bias=...)``, `TrainedCopy`) and token
    deltas (``trainable_token_indices``, `TokenDelta`) are applied to the params first, in every
    mode: a copy replaces its base leaf, a token delta gives the table
    ``W0.at[indices].add(delta)`` (a scatter of a few rows, so an Embed lookup and a tied
    ``attend`` both see it); the factored machinery then runs on those params. With
    ``lora_ids``, a stacked tree holding them runs each example as a batch of one (below), with
    its own adapter's copies (the base leaves for ``-1``).

    Sharp edge: the factored Dense branch has a hand-written backward pass (a
    ``jax.custom_vjp``), so forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``,
    ``jax.hessian``) of the factored modes raises; use ``mode="merged"`` for those.

    Example:
      >>> fn = jax.jit(lora.wrap(model.apply))
      >>> y = fn(params, adapters, x)
      >>> grads = jax.grad(lambda ad: loss(fn(params, ad, x)))(adapters)
      >>> y = fn(params, adapters, x, lora_rng=jax.random.key(0))  # with LoRA dropout
      >>> stacked = lora.stack([adapters_a, adapters_b])
      >>> y = fn(params, stacked, x, lora_ids=jnp.array([0, 1, -1, 1]))  # per-example routing
      >>> y = fn(lora.quantize(params, dtype="nf4"), adapters, x)  # QLoRA: a quantized base

    Args:
      apply_fn: any function whose first argument is the params pytree: a Linen
        ``model.apply``, ``lambda state, x: nnx.merge(graphdef, state)(x)``, or plain JAX.
        Array leaves of the other arguments are traced; any other leaf (Python numbers,
        strings, flags) is treated as static.
      mode: ``"auto"`` (default) factors every use it can and merges the other kernels
        (``W0 + scale * a @ b`` inside the trace), silently; ``"factored"`` never materialises
        an adapted kernel and raises ``ValueError`` naming the kernel path and the operation
        for a use it cannot factor (``cond``, a kernel carried through a ``scan`` loop, custom
        derivatives, arithmetic on the kernel itself, ...); ``"merged"`` always forms
        ``W0 + scale * a @ b`` (as `merge`).

    Returns:
      ``fn(params, adapters, *args, lora_rng=None, lora_ids=None, **kwargs)``.

      ``params`` may hold `QuantizedKernel` nodes (`lora.quantize`, QLoRA): only the codes
      live between steps. In modes ``"auto"`` and ``"factored"`` each is dequantized at its
      use, not before the model runs: a base product dequantizes the kernel and its backward
      pass dequantizes it again (its residuals are the codes, not the float kernel); a kernel
      stacked by a scan and quantized per layer (``lora.quantize(..., probe=...)``) is sliced
      by the scan and dequantized in the body, one layer's float kernels at a time (with
      remat on the body, again in that layer's backward step). Mode ``"merged"`` on a
      quantized base forms each adapted kernel at its use from the dequantized base (inside
      a scan, one layer at a time); ``lora_ids`` and ``adapters=None`` dequantize the whole
      tree first.

      ``lora_rng``, a PRNG key, turns on dropout on the LoRA branch inputs at each adapter's
      ``dropout`` rate (PEFT's ``lora_dropout``; inverted dropout, none for Embed lookups, as
      PEFT); without it, or in mode ``"merged"``, no dropout is applied.

      ``lora_ids``, integers of shape ``(B,)``, routes example ``j`` of the batch through
      adapter ``lora_ids[j]`` of a stacked tree (`lora.stack`) passed as ``adapters``; ``-1``
      runs the base model for that example. One compilation serves any ids. In modes
      ``"auto"`` and ``"factored"`` the model runs once on the whole batch, and at each adapted
      kernel axis 0 of the activation (the batch axis of the model's inputs) is matched with
      the per-example factors: the base op stays one op over the batch, only the low-rank
      branch is per example, and everything else (batch statistics, masks passed as keywords)
      sees the whole batch, as without routing. A model whose activations do not keep the
      batch on axis 0 at an adapted kernel, or that uses a kernel otherwise (``cond``,
      arithmetic on it, ...), is run per example instead in mode ``"auto"`` (and refused in
      mode ``"factored"``); mode ``"merged"`` always runs per example: every positional input
      is split along axis 0 and each example runs as a batch of one with its own merged
      kernels (layers that mix examples then see one example; keyword arguments are passed to
      every example unchanged, and every output leaf must have the batch on axis 0). Concrete
      ids outside ``[-1, N)`` raise ``ValueError``; traced ids cannot be checked, and an
      out-of-range traced id runs the base model.

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

    def run(params: PyTree, adapters: PyTree, args: Any, kwargs: Any, rng: Any) -> Any:
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
        *args: Any,
        lora_rng: Any = None,
        lora_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
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


def _leading_sizes(args: tuple[Any, ...]) -> set[int | None]:
    """The sizes of axis 0 of the positional inputs' leaves (``None`` for a scalar)."""
    return {int(np.shape(x)[0]) if np.ndim(x) else None for x in jax.tree.leaves(args)}


def _routed(
    run: Callable[..., Any],
    params: PyTree,
    stacked: PyTree,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rng: Any,
    ids: Any,
) -> Any:
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
    ids = check_ids(ids, n, batch)
    keys = None if rng is None else jax.random.split(rng, batch)

    def one(index: jax.Array, key: Any, example: tuple[Any, ...]) -> Any:
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
