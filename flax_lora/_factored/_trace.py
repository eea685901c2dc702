"""The entry points of factored execution (`call_factored`, `call_routed`) and the trace cache.

``apply_fn`` is traced to a jaxpr (`jax.make_jaxpr`) on the abstract values of its inputs,
once per input structure, shapes and static arguments (`Tracer`), then evaluated by the
interpreter (`flax_lora._factored._interpreter`) with each adapted kernel entering as a
`KernelView` and each quantized kernel as a `QuantBase`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import PyTreeDef

from flax_lora import _jaxpr as jx
from flax_lora._adapters._delta import check_fits
from flax_lora._adapters._tables import adapter_table, stacked_table
from flax_lora._adapters._weights import LoraWeights, StackedLoraWeights
from flax_lora._factored._contract import RoutingFallback, leaving
from flax_lora._factored._interpreter import Interpreter
from flax_lora._factored._quant_base import as_base, input_aval
from flax_lora._factored._view import KernelView, make_routed_view, make_view
from flax_lora._paths import describe, path_str
from flax_lora._quant._formats import is_quantized
from flax_lora._quant._tree import dequantize
from flax_lora._typing import Leaf, Mode, PyTree

_CACHE_SIZE = 8


def _is_array(x: object) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


class Tracer:
    """Traces ``apply_fn`` to a jaxpr, caching one per input structure and abstract values."""

    def __init__(self, apply_fn: Callable[..., PyTree]) -> None:
        self.apply_fn = apply_fn
        self.cache: collections.OrderedDict[Hashable, tuple[jx.ClosedJaxpr, PyTreeDef]] = (
            collections.OrderedDict()
        )

    def __call__(self, leaves: list[Leaf], treedef: PyTreeDef) -> tuple[jx.ClosedJaxpr, PyTreeDef]:
        dynamic = [_is_array(x) or is_quantized(x) for x in leaves]
        avals = [input_aval(x) for x, d in zip(leaves, dynamic, strict=True) if d]
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]
        statics = tuple((type(x), x) for x, d in zip(leaves, dynamic, strict=True) if not d)
        key = (treedef, tuple((a.shape, a.dtype, a.weak_type) for a in avals), statics)
        try:
            hit, cacheable = self.cache.get(key), True
        except TypeError:  # an unhashable static leaf: no caching
            hit, cacheable = None, False
        if hit is not None:
            self.cache.move_to_end(key)
            return hit

        def flat_fn(*vals: jax.Array) -> PyTree:
            it = iter(vals)
            full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
            params, args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return self.apply_fn(params, *args, **kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
        found = (closed, jax.tree_util.tree_structure(out_shape))
        if cacheable and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            self.cache[key] = found
            while len(self.cache) > _CACHE_SIZE:
                self.cache.popitem(last=False)
        return found


def call_factored(
    tracer: Tracer,
    mode: Mode,
    params: PyTree,
    adapters: PyTree,
    args: tuple[PyTree, ...],
    kwargs: dict[str, PyTree],
    lora_rng: jax.Array | None,
) -> PyTree:
    """``apply_fn(merge(params, adapters), *args, **kwargs)`` computed in factored form.

    Quantized kernels in ``params`` (QLoRA) are dequantized at their uses.
    """
    table = adapter_table(adapters)
    if not table:
        return tracer.apply_fn(dequantize(params), *args, **kwargs)
    interp = Interpreter(mode, with_key=lora_rng is not None)
    view = lambda path, leaf: make_view(path, leaf, table[path])
    return _interpret(tracer, interp, table, view, params, args, kwargs, lora_rng)


def call_routed(
    tracer: Tracer,
    mode: Mode,
    params: PyTree,
    stacked: PyTree,
    ids: jax.Array,
    args: tuple[PyTree, ...],
    kwargs: dict[str, PyTree],
    lora_rng: jax.Array | None,
) -> PyTree | RoutingFallback:
    """`call_factored` with a stacked tree (`lora.stack`) whose adapter ``ids[j]`` is applied
    to example ``j`` of the batch (axis 0 of the activations at each adapted kernel), or a
    `RoutingFallback` when the model's uses of the kernels do not allow that on the whole
    batch. Quantized kernels are dequantized up front."""
    table: dict[str, StackedLoraWeights] = stacked_table(stacked)
    params = dequantize(params)
    if not table:
        return tracer.apply_fn(params, *args, **kwargs)
    shapes = {p: w.entry(w.a[0], w.b[0]) for p, w in table.items()}
    interp = Interpreter(mode, with_key=lora_rng is not None, routing=True)
    view = lambda path, leaf: make_routed_view(path, leaf, table[path], ids)
    return _interpret(tracer, interp, shapes, view, params, args, kwargs, lora_rng)


def _interpret(
    tracer: Tracer,
    interp: Interpreter,
    table: dict[str, LoraWeights],
    view: Callable[[str, Leaf], KernelView],
    params: PyTree,
    args: tuple[PyTree, ...],
    kwargs: dict[str, PyTree],
    key: jax.Array | None,
) -> PyTree | RoutingFallback:
    """Traces ``apply_fn`` and evaluates it with ``interp``, the kernel at each path of
    ``table`` (the adapters, checked against the kernels) entering as ``view(path, kernel)``;
    a `RoutingFallback` (only with routed views) instead of the outputs."""
    flat, treedef = jax.tree_util.tree_flatten_with_path((params, args, kwargs), is_quantized)
    leaves = [x for _, x in flat]
    n_params = len(jax.tree_util.tree_leaves(params, is_quantized))
    paths = [path_str(kp[1:]) for kp, _ in flat[:n_params]]
    _check(table, paths, leaves[:n_params])
    closed, out_def = tracer(leaves, treedef)
    where = dict(zip(paths, range(n_params), strict=True))
    views = {where[p]: view(p, leaves[where[p]]) for p in table}
    used = [i for i, x in enumerate(leaves) if _is_array(x) or is_quantized(x)]
    invals = [views[i] if i in views else as_base(leaves[i]) for i in used]
    outs = interp.eval(closed.jaxpr, closed.consts, invals, key)
    if isinstance(outs, RoutingFallback):
        return outs
    plain = leaving(interp, outs, [None] * len(outs), "output", "the kernel is returned")
    if isinstance(plain, RoutingFallback):
        return plain
    return jax.tree_util.tree_unflatten(out_def, plain)


def _check(table: dict[str, LoraWeights], paths: list[str], leaves: list[Leaf]) -> None:
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
