"""`lora.merge` / `lora.unmerge`: pure functions from (params, adapters) to params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import KeyPath

from flax_lora._adapters._delta import check_fits, delta, layer_mask
from flax_lora._adapters._dora import dora_kernel
from flax_lora._adapters._substitute import substitute, unmerge_extras
from flax_lora._adapters._tables import adapter_table, split_plain
from flax_lora._paths import describe, path_str
from flax_lora._quant._formats import dequantize_kernel, has_quantized, is_quantized
from flax_lora._quant._tree import requantize_layers, requantize_tree
from flax_lora._typing import Leaf, PyTree

_DORA_UNMERGE = (
    "lora.unmerge: the adapter for {path!r} is a DoRA adapter (it has a magnitude m). A DoRA "
    "merge W = m * V / ||V|| cannot be undone from W, m, a and b: W determines V only up to a "
    "positive factor per output unit (every choice has ||W|| = m), so W0 is lost. Keep the base "
    "params (merge is pure and does not change them) instead of unmerging."
)


def merge(params: PyTree, adapters: PyTree, requantize: bool = False) -> PyTree:
    """Folds each adapter into its kernel: ``W = W0 + scale * a @ b``.

    A DoRA adapter gives ``W = m * V / ||V||`` with ``V = W0 + scale * a @ b``; a `TrainedCopy`
    replaces its leaf; a `TokenDelta` gives ``W0.at[indices].add(delta)``. The sum is computed
    in float32 (or the kernel's dtype, if wider) and cast once to the kernel's dtype; every
    other leaf is returned untouched and the tree keeps its type (a Linen variables dict, an
    NNX state) and each kernel its sharding. Pure and jit-able. On a quantized base an adapted
    `QuantizedKernel` comes back merged as a plain array of its original dtype, the others
    untouched. Guides: `docs/guides/qlora.md`, `docs/guides/dora.md`.

    Sharp edge: ``requantize=True`` rounds the merged kernels to the base's quantization grid,
    which loses most of a small LoRA update; it warns with the relative error it introduces.

    Examples:
      >>> model, x = nn.Dense(4), jnp.ones((2, 3))
      >>> params = model.init(jax.random.key(0), x)
      >>> config = lora.LoraConfig(rank=2, init="random")  # "random": b != 0, a real update
      >>> adapters = lora.init(jax.random.key(1), params, config)
      >>> merged = jax.jit(lora.merge)(params, adapters)  # a plain params tree
      >>> y = model.apply(merged, x)  # zero added latency
      >>> bool(jnp.allclose(y, lora.wrap(model.apply)(params, adapters, x), atol=1e-5))
      True

    Args:
      params: the base params tree.
      adapters: adapters from `lora.init` (or `lora.load`, `lora.load_peft`, `lora.combine`).
      requantize: on a quantized base, store the merged kernels quantized again in their base's
        format (`lora.requantize`; a layered kernel quantized per layer one layer at a time).

    Returns:
      A params tree of the same structure with the adapted kernels merged.

    Raises:
      ValueError: an adapter's path is not in ``params``, or its kernel shape does not fit.
      TypeError: ``requantize`` is not a bool (a string such as ``"no"`` would be truthy); an
        adapted kernel is not floating.
    """
    if not isinstance(requantize, bool | np.bool_):
        raise TypeError(
            f"lora.merge: requantize must be a bool (True: quantize the merged kernels again); "
            f"got {requantize!r} ({type(requantize).__name__}). Under jax.jit, pass it as a "
            "static argument."
        )
    requantize = bool(requantize)
    adapters, extras = split_plain(adapters, "merge")
    layered: dict[str, float | None] = {}
    base = params
    if requantize:  # layered kernels quantized per layer: merged and quantized layer by layer
        params, layered = _requantize_layers(params, adapters)
    merged, dequantized = _fold(params, adapters, +1.0, skip=set(layered))
    merged = substitute(merged, extras, "lora.merge")
    if not requantize:
        return merged
    if has_quantized(params) and not dequantized and not layered:
        return merged  # no quantized kernel was merged: nothing to quantize again
    # raises on a base without QuantizedKernels; the unadapted ones pass through untouched
    return requantize_tree(merged, base, layered)


def _requantize_layers(params: PyTree, adapters: PyTree) -> tuple[PyTree, dict[str, float | None]]:
    """Each adapted kernel quantized per layer (``layer_axes``, a plain LoRA adapter of the
    same layer axes) replaced by its merged kernel quantized again, one layer at a time
    (`flax_lora._quant._tree.requantize_layers`); and path -> relative rounding error of each."""
    if adapters is None:
        return params, {}
    table = adapter_table(adapters)
    errors: dict[str, float | None] = {}

    def f(keypath: KeyPath, leaf: Leaf) -> Leaf:
        path = path_str(keypath)
        w = table.get(path)
        if w is None or not is_quantized(leaf) or not leaf.layer_axes or w.m is not None:
            return leaf
        if w.layer_axes != leaf.layer_axes:
            return leaf
        check_fits(path, w, tuple(leaf.shape))
        n = w.layer_axes
        lead = tuple(leaf.shape[:n])
        a = w.a.reshape(-1, *w.a.shape[n:])
        b = w.b.reshape(-1, *w.b.shape[n:])
        mask = layer_mask(w)
        keep = None if mask is None else jnp.repeat(jnp.asarray(mask), int(np.prod(lead[1:])))
        inner = w.layout.layer_slice(n)

        def add(i: jax.Array) -> jax.Array:
            d = delta(inner.with_factors(a[i], b[i]), jnp.float32)
            return d if keep is None else d * keep[i]

        out, err = requantize_layers(leaf, add)
        errors[path] = err
        return out

    out = jax.tree_util.tree_map_with_path(f, params, is_leaf=is_quantized)
    return out, errors


def unmerge(params: PyTree, adapters: PyTree) -> PyTree:
    """The inverse of `merge`: ``W0 = W - scale * a @ b``, with the same precision rule.

    As in `merge`, an adapted `QuantizedKernel` is dequantized and returned as a plain array;
    every other leaf, quantized or not, is returned untouched.

    Token deltas are subtracted again.

    Sharp edge: DoRA adapters (``W`` does not determine ``||V||``, so ``W0`` is lost) and
    trained copies (`TrainedCopy`, which replaced their leaves) cannot be unmerged: they raise;
    keep the base params instead (`merge` does not change them). Guide: `docs/guides/dora.md`.

    Examples:
      >>> params = {"kernel": jnp.ones((3, 4))}
      >>> adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, init="random"))
      >>> base = lora.unmerge(lora.merge(params, adapters), adapters)
      >>> bool(jnp.allclose(base["kernel"], params["kernel"], atol=1e-5))
      True

    Args:
      params: a params tree with the adapters merged in.
      adapters: the adapters that were merged.

    Returns:
      The params tree with the adapters taken out again.

    Raises:
      ValueError: an adapter's path is not in ``params``, or its kernel shape does not fit; an
        adapter is a DoRA adapter; the adapters hold trained copies (naming their paths).
      TypeError: an adapted kernel is not floating.
    """

    adapters, extras = split_plain(adapters, "unmerge")
    return unmerge_extras(_fold(params, adapters, -1.0)[0], extras)


def _fold(
    params: PyTree, adapters: PyTree, sign: float, skip: set[str] | None = None
) -> tuple[PyTree, bool]:
    """The folded tree, and whether an adapted kernel was a `QuantizedKernel` (dequantized
    here; quantized kernels without an adapter are passed through untouched)."""
    if adapters is None:
        return params, False
    table = adapter_table(adapters)
    seen: set[str] = set()
    kernels: list[str] = []
    dequantized: list[str] = []

    def fold(keypath: KeyPath, leaf: Leaf) -> Leaf:
        path = path_str(keypath)
        if getattr(leaf, "ndim", 0) >= 2:
            kernels.append(path)
        w = table.get(path)
        if w is None:
            return leaf
        seen.add(path)
        if skip and path in skip:  # merged already (per layer, requantized)
            return leaf
        check_fits(path, w, tuple(leaf.shape))
        if is_quantized(leaf):  # only adapted kernels are dequantized
            dequantized.append(path)
            leaf = dequantize_kernel(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"Kernel {path!r} has dtype {leaf.dtype}; expected a floating dtype.")
        compute = jnp.promote_types(leaf.dtype, jnp.float32)
        if w.m is not None:  # DoRA: m * V / ||V||
            if sign < 0:
                raise ValueError(_DORA_UNMERGE.format(path=path))
            return dora_kernel(leaf, w, compute).astype(leaf.dtype)
        out = leaf.astype(compute) + sign * delta(w, compute)
        return out.astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(fold, params, is_leaf=is_quantized)
    missing = [p for p in table if p not in seen]
    if missing:
        raise ValueError(
            f"Adapters for {describe(missing)} have no kernel at that path in params. Kernels in "
            f"params: {describe(kernels, limit=20)}. Were these adapters made for another model?"
        )
    return out, bool(dequantized)
