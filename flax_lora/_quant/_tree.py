"""QLoRA's tree functions: `lora.quantize`, `lora.dequantize` and `lora.requantize` over a params
tree, and the layer-wise requantization `lora.merge` uses for a kernel quantized per layer.

`quantize` replaces the selected kernels of a params tree with `QuantizedKernel` nodes that hold
the integer codes and their scales; `dequantize` turns them back into arrays of the original
dtype. It is pure and jit-able, so a training step calls it on the quantized tree *inside* the
jitted function: only the codes live in memory between steps, and each kernel is expanded
transiently for its use (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
https://arxiv.org/abs/2305.14314). The formats themselves are in `flax_lora._quant._formats`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import KeyPath

from flax_lora._config import target_matches
from flax_lora._field_checks import regex_tuple
from flax_lora._paths import KERNEL_LEAVES, describe, flatten, leaf_name, path_str
from flax_lora._probe import Use, kernel_uses
from flax_lora._quant._checks import check_format, finite_error, non_finite
from flax_lora._quant._formats import (
    QuantizedKernel,
    as_shapes,
    dequantize_kernel,
    has_quantized,
    is_quantized,
    join_layers,
    quantize_f32,
    quantize_jit,
    split_layers,
)
from flax_lora._typing import Leaf, PyTree, QuantFormat


def _select(leaves: dict[str, Leaf], patterns: tuple[str, ...] | None) -> list[str]:
    """The paths to quantize: the rule of `lora.init` without a probe."""
    candidates = [
        p
        for p, x in leaves.items()
        if not is_quantized(x)
        and getattr(x, "ndim", 0) >= 2
        and (patterns is not None or leaf_name(p) in KERNEL_LEAVES)
    ]
    if patterns is None:
        chosen = candidates
    else:
        what = "lora.quantize: targets"
        # a module's plain name selects the module's kernel (a leaf named as Flax names them)
        hit = lambda p: any(
            target_matches(t, p, what, leaf_name(p) in KERNEL_LEAVES) for t in patterns
        )
        chosen = [p for p in candidates if hit(p)]
        again = [p for p, x in leaves.items() if is_quantized(x) and p not in chosen]
        again = [p for p in again if hit(p)]
        if again:
            raise ValueError(f"lora.quantize: {describe(again)} are already quantized.")
    if not chosen:
        done = [p for p, x in leaves.items() if is_quantized(x)]
        raise ValueError(
            f"lora.quantize: targets={patterns!r} match no unquantized kernel (a floating leaf "
            f"of 2 or more dimensions{'' if patterns else ' named kernel or embedding'}). Paths "
            f"seen: {describe(candidates or [p for p in leaves if p not in done], limit=40)}"
            + (f"; already quantized: {describe(done)}." if done else ".")
        )
    for p in chosen:
        if not jnp.issubdtype(leaves[p].dtype, jnp.floating):
            raise TypeError(
                f"lora.quantize: kernel {p!r} has dtype {leaves[p].dtype}; only floating "
                "kernels are quantized."
            )
    return chosen


def quantize(
    params: PyTree,
    targets: str | Sequence[str] | None = None,
    dtype: QuantFormat = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    probe: Callable[[PyTree], PyTree] | None = None,
) -> PyTree:
    """Stores the frozen kernels of ``params`` quantized (QLoRA's base), as `QuantizedKernel`\\s.

    ``"int8"``: symmetric absmax per channel of the kernel's last axis (bitsandbytes'
    LLM.int8 weight format, ~1 byte per weight). ``"nf4"``: bitsandbytes' NF4, the flattened
    kernel in absmax-scaled blocks of ``block_size`` values rounded to 16 NormalFloat levels
    (~0.56 bytes per weight; ~0.52 with ``double_quant``, which also quantizes the block
    absmaxes). With ``probe``, layered kernels (``nn.scan`` / ``nnx.scan``) are quantized
    layer by layer, each layer exactly as that layer's kernel alone. Jit-able with
    ``targets`` / ``dtype`` / ``block_size`` / ``double_quant`` static. Guide:
    `docs/guides/qlora.md`.

    Sharp edge: under a trace (inside ``jax.jit``) the values are unknown and not checked: a
    NaN or inf then makes its int8 channel, its nf4 block (with ``double_quant``, the whole
    kernel) dequantize to NaN. Outside a trace such a kernel is a ``ValueError``.

    Examples:
      >>> model, x = nn.Dense(64), jnp.ones((2, 32))
      >>> qparams = lora.quantize(model.init(jax.random.key(0), x), dtype="nf4")
      >>> qparams["params"]["kernel"].nbytes  # its bytes: 8192 in float32
      1152
      >>> adapters = lora.init(jax.random.key(1), qparams, lora.LoraConfig(rank=4))
      >>> jax.jit(lora.wrap(model.apply))(qparams, adapters, x).shape  # dequantized at each use
      (2, 64)

    Args:
      params: a Linen variables dict, an NNX state, or any pytree.
      targets: the leaves of 2 or more dimensions to quantize, as `LoraConfig.targets`: plain
        names (PEFT's module names: the path's last components) or regexes that must
        ``re.fullmatch`` the path, one or a sequence. ``None``: those named ``kernel`` or
        ``embedding`` (Flax's names), skipping leaves already quantized.
      dtype: the format, ``"nf4"`` (default) or ``"int8"``.
      block_size: NF4 values per absmax block (a positive even number); unused by int8.
      double_quant: quantize the NF4 block absmaxes too (QLoRA's double quantization).
      probe: an optional function of the params alone (e.g. ``lambda p: model.apply(p, x)``),
        traced abstractly to find the layered kernels and their layer axes.

    Returns:
      ``params`` with each selected kernel replaced by a `QuantizedKernel`; every other leaf is
      the same object.

    Warns:
      UserWarning: with ``targets=None`` and a ``probe``, leaves the probe contracts or gathers
        that are left unquantized only because they are not named ``kernel`` / ``embedding``.

    Raises:
      ValueError: unknown ``dtype``, bad ``block_size``, ``double_quant`` with int8,
        ``targets`` that match no kernel (listing the paths seen) or an already quantized one,
        a selected kernel holding a NaN or an inf (naming it, how many and where), or one
        whose layer axes (``probe``) do not lead (MaxText's ``param_scan_axis: 1``: not
        supported yet).
      TypeError: a selected kernel is not floating.
    """
    check_format(dtype, block_size, double_quant)
    leaves = flatten(params, is_leaf=is_quantized)
    chosen = set(_select(leaves, regex_tuple(targets, "lora.quantize: targets")))
    kernels = {p: x for p, x in leaves.items() if p in chosen}
    _check_finite("lora.quantize", kernels, dtype, bool(double_quant))
    uses = None if probe is None else kernel_uses(probe, as_shapes(params))
    if targets is None and uses is not None:
        _warn_unnamed(leaves, uses)
    layers = _layer_axes(uses, chosen)

    def f(kp: KeyPath, x: Leaf) -> Leaf:
        path = path_str(kp)
        if is_quantized(x) or path not in chosen:
            return x
        n = layers.get(path, 0)
        return quantize_jit(x, dtype, int(block_size), bool(double_quant), jnp.dtype(x.dtype), n)

    return jax.tree_util.tree_map_with_path(f, params, is_leaf=is_quantized)


def _check_finite(
    owner: str, kernels: dict[str, Leaf], fmt: QuantFormat, double_quant: bool = False
) -> None:
    """Raises `finite_error` naming every kernel (path -> array) that holds a NaN or an inf;
    traced kernels are not checked."""
    found = {}
    for path, w in kernels.items():
        what = non_finite(w)
        if what:
            found[f"kernel {path!r}"] = what
    if found:
        raise finite_error(owner, found, fmt, double_quant)


def _warn_unnamed(leaves: dict[str, Leaf], uses: dict[str, Use]) -> None:
    """Warns of the floating leaves the probe contracts or gathers that ``targets=None`` leaves
    unquantized only because of their names (tunix's ``w``, Gemma's ``gating_einsum``)."""
    missed = [
        p
        for p, x in leaves.items()
        if p in uses
        and leaf_name(p) not in KERNEL_LEAVES
        and not is_quantized(x)
        and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    if not missed:
        return
    names = list(dict.fromkeys([*KERNEL_LEAVES, *(leaf_name(p) for p in missed)]))
    warnings.warn(
        f"lora.quantize: the probe contracts or gathers {len(missed)} floating leaf(s) that are "
        f"not quantized only because of their names: {describe(missed)}. With targets=None only "
        "leaves named 'kernel' or 'embedding' (Flax's names) are quantized; pass targets= to "
        f"choose the kernels, e.g. the leaf names targets={names!r} (plain names).",
        stacklevel=3,
    )


def _layer_axes(uses: dict[str, Use] | None, chosen: set[str]) -> dict[str, int]:
    """Path -> number of leading layer axes of each chosen kernel a scan of the probe slices.

    Raises:
      ValueError: a chosen kernel's layer axes do not lead (quantized per layer, its codes
        could not be sliced by the scan as the kernel is).
    """
    if uses is None:
        return {}
    out = {}
    for path, use in uses.items():
        axes = tuple(use.layer_axes)
        if path in chosen and axes and axes != tuple(range(len(axes))):
            raise ValueError(
                f"lora.quantize: the kernel {path!r} is sliced by a scan on axes {axes}, not "
                "on its leading axes (MaxText's param_scan_axis: 1). Quantizing such a layered "
                "kernel per layer is not supported yet: leave it out with targets=, or store "
                "its layer axis first (param_scan_axis: 0)."
            )
        if path in chosen and axes:
            out[path] = len(axes)
    return out


def dequantize(params: PyTree) -> PyTree:
    """Replaces every `QuantizedKernel` of ``params`` by its dequantized array (jit-able).

    Call it inside the jitted function, so that only the codes are kept between steps; a tree
    without quantized kernels is returned unchanged.

    Examples:
      >>> model, x = nn.Dense(64), jnp.ones((2, 32))
      >>> qparams = lora.quantize(model.init(jax.random.key(0), x))
      >>> adapters = lora.init(jax.random.key(1), qparams, lora.LoraConfig(rank=4))
      >>> @jax.jit
      ... def grads(adapters, qparams, x):  # only the codes are kept between steps
      ...     loss = lambda ad: lora.wrap(model.apply)(lora.dequantize(qparams), ad, x).sum()
      ...     return jax.grad(loss)(adapters)
      >>> grads(adapters, qparams, x)["params"]["kernel"].b.shape
      (4, 64)

    Args:
      params: a params tree, possibly holding `QuantizedKernel` nodes.

    Returns:
      The same tree with each `QuantizedKernel` replaced by an array of its original shape and
      dtype.
    """
    if not has_quantized(params):
        return params  # nothing to do: the very same tree
    return jax.tree.map(
        lambda x: dequantize_kernel(x) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def requantize(params: PyTree, like: PyTree) -> PyTree:
    """Quantizes the kernels of ``params`` where ``like`` holds a `QuantizedKernel`, in its format.

    For a merged model on a quantized base (``lora.merge(lora.dequantize(qparams), adapters)``)
    this stores the merged kernels quantized again. Rounding the merged kernel to the base's grid
    loses most of a small LoRA update: a ``UserWarning`` gives the relative error
    ``‖W - deQ(Q(W))‖ / ‖W‖`` it introduces (measured, largest over the kernels; not measured
    under a trace). Keep the dequantized merge when that matters.

    Examples:
      >>> qparams = lora.quantize({"kernel": jax.random.normal(jax.random.key(0), (32, 64))})
      >>> config = lora.LoraConfig(rank=4, init="random")
      >>> adapters = lora.init(jax.random.key(1), qparams, config)
      >>> merged = lora.merge(lora.dequantize(qparams), adapters)
      >>> lora.requantize(merged, like=qparams)["kernel"]  # warns with the measured error
      QuantizedKernel(nf4, shape=(32, 64), dtype=float32, block_size=64)

    Args:
      params: a params tree with float kernels at the paths that are quantized in ``like``.
      like: a quantized params tree (from `quantize`, or `lora.init` with ``init="loftq"``).

    Returns:
      ``params`` with those kernels replaced by `QuantizedKernel`\\s of the same format, block size
      and double quantization as in ``like``.

    Raises:
      ValueError: a quantized path of ``like`` is not in ``params``, has another shape, or
        holds a NaN or an inf (not checked under a trace, as `quantize`).
      TypeError: such a leaf is not a floating array.
    """
    return requantize_tree(params, like, {})


def requantize_tree(params: PyTree, like: PyTree, done: dict[str, float | None]) -> PyTree:
    """`requantize`, with ``done``: path -> the relative error (or ``None`` under a trace) of
    the kernels of ``params`` the caller already quantized again (`lora.merge`, layer by layer
    with `requantize_layers`), so that one warning reports every kernel."""
    table = {p: q for p, q in flatten(like, is_leaf=is_quantized).items() if is_quantized(q)}
    if not table:
        raise ValueError("lora.requantize: `like` holds no QuantizedKernel.")
    leaves = flatten(params, is_leaf=is_quantized)
    missing = [p for p in table if p not in leaves]
    if missing:
        raise ValueError(
            f"lora.requantize: {describe(missing)} are quantized in `like` but not in params. "
            f"Paths in params: {describe(list(leaves), limit=20)}."
        )
    errors: dict[str, float] = {p: e for p, e in done.items() if e is not None}

    def f(kp: KeyPath, x: Leaf) -> Leaf:
        path = path_str(kp)
        q = table.get(path)
        if q is None or is_quantized(x):
            return x
        if not jnp.issubdtype(getattr(x, "dtype", np.dtype(object)), jnp.floating):
            raise TypeError(f"lora.requantize: {path!r} is not a floating array ({type(x)}).")
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(
                f"lora.requantize: {path!r} has shape {tuple(x.shape)}, but `like` quantized a "
                f"kernel of shape {tuple(q.shape)} there."
            )
        _check_finite("lora.requantize", {path: x}, q.format, q.double_quant)
        w = x.astype(jnp.float32)
        out = quantize_jit(
            x, q.format, q.block_size, q.double_quant, jnp.dtype(x.dtype), q.layer_axes
        )
        if not isinstance(w, jax.core.Tracer):
            back = dequantize_kernel(out).astype(jnp.float32)
            errors[path] = float(jnp.linalg.norm(w - back) / jnp.maximum(jnp.linalg.norm(w), 1e-30))
        return out

    out = jax.tree_util.tree_map_with_path(f, params, is_leaf=is_quantized)
    fmt = sorted({q.format for q in table.values()})
    if errors:
        worst = max(errors, key=errors.__getitem__)
        detail = (
            f"a relative error ||W - deQ(Q(W))|| / ||W|| of up to {errors[worst]:.3g} (at "
            f"{worst!r}; mean {np.mean(list(errors.values())):.3g} over {len(errors)} kernels)"
        )
    else:
        detail = "a rounding error (not measured under a trace)"
    warnings.warn(  # stacklevel: the caller of lora.requantize / lora.merge
        f"lora.requantize: rounding the merged kernels to {'/'.join(fmt)} introduces {detail}; "
        "a LoRA update smaller than the quantization step is mostly lost. Keep the dequantized "
        "merge (lora.merge(lora.dequantize(qparams), adapters)) to avoid it.",
        UserWarning,
        stacklevel=3,
    )
    return out


def requantize_layers(
    q: QuantizedKernel, add: Callable[[jax.Array], jax.Array]
) -> tuple[QuantizedKernel, float | None]:
    """``quantize(dequantize(q) + add(i))`` layer by layer for a kernel quantized per layer
    (``q.layer_axes``), in a `jax.lax.map` over the layers, so one layer's float kernel is
    alive at a time; and the relative error ``||W - deQ(Q(W))|| / ||W||`` over all layers
    (``None`` under a trace). ``add(i)``: layer ``i``'s float32 update."""
    treedef, flat = split_layers(q)
    fmt = (q.format, q.block_size, q.double_quant, jnp.dtype(q.dtype))

    def one(
        args: tuple[jax.Array, list[jax.Array]],
    ) -> tuple[QuantizedKernel, jax.Array, jax.Array]:
        i, ls = args
        w = dequantize_kernel(jax.tree.unflatten(treedef, ls)).astype(jnp.float32) + add(i)
        out = quantize_f32(w.astype(q.dtype).astype(jnp.float32), *fmt)
        back = dequantize_kernel(out).astype(jnp.float32)
        return out, jnp.sum((w - back) ** 2), jnp.sum(w**2)

    size = flat[0].shape[0]
    out, err2, norm2 = jax.lax.map(one, (jnp.arange(size), flat))
    out = join_layers(out, q.shape)
    err = None
    if not isinstance(err2, jax.core.Tracer):
        err = float(jnp.sqrt(jnp.sum(err2)) / jnp.maximum(jnp.sqrt(jnp.sum(norm2)), 1e-30))
    return out, err
