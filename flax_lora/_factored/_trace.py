"""The entry point of factored execution: the trace cache and `call_factored`."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters import LoraWeights, adapter_table, check_fits
from flax_lora._factored._interpreter import Interpreter
from flax_lora._factored._quant import as_array, input_aval, quant_base
from flax_lora._factored._routing import make_routed_view
from flax_lora._factored._view import KernelView, make_view
from flax_lora._paths import describe, path_str
from flax_lora._quant import dequantize, is_quantized
from flax_lora._typing import PyTree

_CACHE_SIZE = 8


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


class Tracer:
    """Traces ``apply_fn`` to a jaxpr, caching one per input structure and abstract values."""

    def __init__(self, apply_fn: Callable[..., Any]) -> None:
        self.apply_fn = apply_fn
        self.cache: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()

    def __call__(self, leaves: list[Any], treedef: Any) -> tuple[Any, Any]:
        dynamic = [_is_array(x) or is_quantized(x) for x in leaves]
        avals = [input_aval(x) for x, d in zip(leaves, dynamic, strict=True) if d]
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]
        statics = tuple((type(x), x) for x, d in zip(leaves, dynamic, strict=True) if not d)
        key = (treedef, tuple((a.shape, a.dtype, a.weak_type) for a in avals), statics)
        try:
            hit = self.cache.get(key)
        except TypeError:  # an unhashable static leaf: no caching
            key, hit = None, None
        if hit is not None:
            self.cache.move_to_end(key)
            return hit

        def flat_fn(*vals: Any) -> Any:
            it = iter(vals)
            full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
            params, args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return self.apply_fn(params, *args, **kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
        found = (closed, jax.tree_util.tree_structure(out_shape))
        if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            self.cache[key] = found
            while len(self.cache) > _CACHE_SIZE:
                self.cache.popitem(last=False)
        return found


def call_factored(
    tracer: Tracer,
    mode: str,
    params: PyTree,
    adapters: PyTree,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    lora_rng: Any,
    ids: Any = None,
) -> Any:
    """``apply_fn(merge(params, adapters), *args, **kwargs)`` computed in factored form.

    With ``ids`` (routing), ``adapters`` is a stacked tree (`lora.stack`) and example ``j``
    of the batch (axis 0 of the activations at each adapted kernel) uses adapter ``ids[j]``.

    Raises:
      RoutingFallback: with ``ids``, a use of an adapted kernel that per-example rules on the
        whole batch cannot serve.
    """
    if ids is not None:
        from flax_lora._multi import stacked_table

        stacked = stacked_table(adapters)
        table = {
            p: LoraWeights(
                a=w.a[0],
                b=w.b[0],
                scale=1.0,
                in_axes=w.in_axes,
                kernel_shape=w.kernel_shape,
                layer_axes=w.layer_axes,
            )
            for p, w in stacked.items()
        }
    else:
        table = adapter_table(adapters)
    if not table or ids is not None:  # QLoRA under routing: dequantized up front
        params = dequantize(params)
    if not table:
        return tracer.apply_fn(params, *args, **kwargs)
    flat, treedef = jax.tree_util.tree_flatten_with_path((params, args, kwargs), is_quantized)
    leaves = [x for _, x in flat]
    n_params = len(jax.tree_util.tree_leaves(params, is_quantized))
    paths = [path_str(kp[1:]) for kp, _ in flat[:n_params]]
    _check(table, paths, leaves[:n_params])

    closed, out_def = tracer(leaves, treedef)
    where = dict(zip(paths, range(n_params), strict=True))
    # a quantized kernel (QLoRA) enters as a `QuantBase`, dequantized at its uses
    base = lambda x: quant_base(x) if is_quantized(x) else x
    if ids is None:
        views = {where[p]: make_view(p, base(leaves[where[p]]), w) for p, w in table.items()}
    else:
        views = {
            where[p]: make_routed_view(p, leaves[where[p]], w, ids) for p, w in stacked.items()
        }
    used = [i for i, x in enumerate(leaves) if _is_array(x) or is_quantized(x)]
    invals = [views.get(i, base(leaves[i])) for i in used]
    interp = Interpreter(mode, lora_rng, None if ids is None else int(ids.shape[0]))
    outs = interp.eval(closed.jaxpr, closed.consts, invals)
    outs = [
        interp.fallback(o, "output", "the kernel is returned")
        if isinstance(o, KernelView)
        else as_array(o)
        for o in outs
    ]
    return jax.tree_util.tree_unflatten(out_def, outs)


def _check(table: dict[str, Any], paths: list[str], leaves: list[Any]) -> None:
    index = dict(zip(paths, leaves, strict=True))
    missing = [p for p in table if p not in index]
    if missing:
        kernels = [p for p, x in index.items() if getattr(x, "ndim", 0) >= 2]
        raise ValueError(
            f"Adapters for {describe(missing)} have no kernel at that path in params. Kernels in "
            f"params: {describe(kernels, limit=20)}. Were these adapters made for another model?"
        )
    for path, w in table.items():
        leaf = index[path]
        if not (_is_array(leaf) or is_quantized(leaf)):
            raise TypeError(f"Kernel {path!r} is a {type(leaf).__name__}; expected an array.")
        check_fits(path, w, tuple(leaf.shape))
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"Kernel {path!r} has dtype {leaf.dtype}; expected a floating dtype.")
