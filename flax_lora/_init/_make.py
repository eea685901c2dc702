"""`lora.init`: the adapter of every kernel `flax_lora._init._select` chooses (its factors made
by `flax_lora._init._factors` or, for LoftQ, `flax_lora._init._loftq`), and the extras beside
them (`flax_lora._init._init_extras`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._weights import LoraWeights, stored_order
from flax_lora._config import LoraConfig
from flax_lora._init._factors import (
    FACTORING_INITS,
    check_rank,
    init_factors,
    kernel_values,
    rank_note,
    split_keys,
    warn_ranks,
    with_magnitude,
)
from flax_lora._init._init_extras import init_extras, saved_leaves
from flax_lora._init._loftq import loftq_factors
from flax_lora._init._select import layered_kernels, select_kernels
from flax_lora._paths import flatten, nest, path_str
from flax_lora._probe import kernel_uses
from flax_lora._quant._formats import QuantizedKernel, as_shapes, has_quantized, is_quantized
from flax_lora._sharding import place
from flax_lora._typing import Kind, PyTree


def init(
    key: jax.Array,
    params: PyTree,
    config: LoraConfig,
    probe: Callable[[PyTree], PyTree] | None = None,
) -> PyTree | tuple[PyTree, PyTree]:
    """Creates the LoRA adapters of every kernel of ``params`` that ``config`` selects.

    The kernels: with ``probe``, every floating leaf of 2 or more dimensions the traced probe
    contracts or gathers, whatever its name (and any leaf ``targets`` matches), with its input,
    layer (``nn.scan``) and expert axes; without one, the leaves of 2 or more dimensions named
    ``kernel`` or ``embedding`` (or matched by ``targets``), whose rows are the input axis, so
    that those of 3 or more dimensions need the probe. `lora.select` lists the choice for
    each leaf, with its reason, without making adapters. ``jax.tree.leaves`` of the result
    are exactly the trainable arrays. Guide: `docs/guides/config.md` (selection, inits, ranks,
    ``layers``).

    Sharp edge: ``init="pissa"``, ``"olora"`` and ``"loftq"`` change the base too, and then
    return a pair (below); the adapters fit only that new base.

    Examples:
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> adapters = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2))
      >>> adapters["params"]["kernel"].a.shape, adapters["params"]["kernel"].b.shape
      ((3, 2), (2, 4))

    Args:
      key: a PRNG key.
      params: a Linen variables dict (``{"params": ...}``), an NNX state, or any pytree; a
        quantized tree is read for its shapes only.
      config: what to adapt and how.
      probe: an optional function of the params alone, e.g. ``lambda p: model.apply(p, x)``,
        traced abstractly (no FLOPs) to learn each kernel's kind and axes.

    Returns:
      Nested dicts mirroring the adapted kernels' paths, each a `LoraWeights`, plus a
      `TrainedCopy` / `TokenDelta` at each leaf that ``modules_to_save``, ``bias`` or
      ``trainable_token_indices`` trains. With ``init="pissa"`` / ``"olora"``, the pair
      ``(adapters, new_params)`` (the residual base kernels); with ``init="loftq"``,
      ``(adapters, qparams)``, the adapted kernels as `QuantizedKernel` nodes.

    Warns:
      UserWarning: a rank above a kernel's smaller side (legal, but it adds nothing).

    Raises:
      ValueError: no kernel matches, an index of ``layers`` picks no layer, ``modules_to_save``
        matches no module, token ids are out of range or their embedding also gets factors,
        ``bias="lora_only"`` finds no bias (each naming the paths); a rank below 1, above the
        kernel's smaller side for PiSSA / OLoRA / LoftQ, or over 4 times it with factors of
        over 2**24 entries; a kernel with a size-0 axis or, of 3 or more dimensions, no
        probe; a probe that reads no leaf of ``params``.
      TypeError: ``config`` is not a `LoraConfig`; a targeted leaf is not floating.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora.init expects a LoraConfig; got {type(config).__name__}.")
    original = params  # DoRA's magnitude needs the values of a quantized base
    params = _shapes_of_quantized(params, config)
    leaves = flatten(params)
    uses = None if probe is None else kernel_uses(probe, params)
    saved = saved_leaves(leaves, config)  # modules_to_save: trained whole, never factored
    candidates = {p: x for p, x in leaves.items() if p not in saved}
    # nn.scan's layer axes; the layered kernels with no picked layer are left out
    selected, layered = layered_kernels(
        select_kernels(candidates, config, uses), uses, leaves, config
    )
    keys = split_keys(key, max(len(selected), 1))
    bases = flatten(original, is_leaf=is_quantized) if config.dora else {}
    adapters: list[tuple[str, LoraWeights]] = []
    new_kernels: dict[str, PyTree] = {}
    too_big: list[str] = []  # adapters of a rank above their kernel's smaller side
    for k, (path, (kind, in_axes)) in zip(keys, selected.items(), strict=False):
        n, layers, at = layered.get(path, (0, None, 0))
        experts = uses[path].expert_axes if uses is not None and path in uses else ()
        w, residual = _adapter(
            k, path, leaves[path], kind, in_axes, config, n, layers, tuple(experts), at
        )
        if config.dora:
            w = with_magnitude(w, residual if residual is not None else bases[path])
        adapters.append((path, w))
        too_big += [note] if (note := rank_note(path, w)) else []
        if residual is not None:
            new_kernels[path] = residual
    warn_ranks(too_big)
    extras = init_extras(original, leaves, saved, selected, config, uses)
    tree = nest(adapters + list(extras.items()))
    if config.init in FACTORING_INITS:
        new_params = jax.tree_util.tree_map_with_path(
            lambda kp, x: new_kernels.get(path_str(kp), x), params
        )
        return tree, new_params
    return tree


def _shapes_of_quantized(params: PyTree, config: LoraConfig) -> PyTree:
    """A quantized base (QLoRA) stands in as the shapes of its kernels: "lora", "gaussian" and
    "random" need no values, and nothing is dequantized."""
    if not has_quantized(params):
        return params
    if config.init in FACTORING_INITS:
        raise TypeError(
            f"lora.init(init={config.init!r}) needs the float base kernels, but params hold "
            "QuantizedKernel nodes. Pass the float params (init='loftq' quantizes them itself), "
            "or lora.dequantize(params)."
        )
    return as_shapes(params)


def _adapter(
    key: jax.Array,
    path: str,
    kernel: jax.Array | jax.ShapeDtypeStruct,
    kind: Kind,
    in_axes: tuple[int, ...],
    config: LoraConfig,
    n_layer_axes: int,
    layers: tuple[int, ...] | None,
    experts: tuple[int, ...] = (),
    layer_at: int = 0,
) -> tuple[LoraWeights, QuantizedKernel | jax.Array | None]:
    """The adapter of one kernel (``n_layer_axes`` layer axes of a layered kernel, from axis
    ``layer_at`` on, adapted on ``layers`` of the first one, ``None``: all; ``experts``: its
    expert axes, one adapter per expert), and the base it runs on when the init replaces it
    (PiSSA/OLoRA: the residual kernel; LoftQ: its `QuantizedKernel`), else ``None``.

    Axes are the kernel's own; a kernel whose layer axes do not lead is made in its scan layout
    (layer axes first, `LoraWeights.layer_at`), and its residual base put back."""
    if layer_at and config.init == "loftq":
        raise ValueError(
            f"init='loftq' does not support a kernel whose layer axes do not lead yet "
            f"({path!r} of shape {tuple(kernel.shape)}, layer axes from axis {layer_at})."
        )
    if layer_at:
        order = stored_order(n_layer_axes, layer_at, len(kernel.shape))
        scan = lambda d: order[d]  # the kernel's own axis -> its scan-layout axis
        w, residual = _adapter(
            key,
            path,
            _transposed(  # the values only for an init that reads them (no copy else)
                kernel
                if config.init in FACTORING_INITS
                else jax.ShapeDtypeStruct(tuple(kernel.shape), kernel.dtype),
                tuple(order.index(i) for i in range(len(order))),
            ),
            kind,
            tuple(scan(d) for d in in_axes),
            config,
            n_layer_axes,
            layers,
            tuple(scan(d) for d in experts),
        )
        w = w.replace(layer_at=layer_at)
        if residual is not None:  # PiSSA / OLoRA: the residual kernel, in the scan layout
            residual = w.to_stored(cast(jax.Array, residual))  # not LoftQ's: refused above
        return _placed(w, kernel), residual
    shape = tuple(kernel.shape)
    n = n_layer_axes
    lead = tuple(range(n))
    carried = (*lead, *experts)
    out_axes = tuple(d for d in range(n, len(shape)) if d not in in_axes and d not in experts)
    in_shape = tuple(shape[i] for i in in_axes)
    out_shape = tuple(shape[i] for i in out_axes)
    r, scale = config.rank_for(path), config.scale_for(path)
    fan = min(math.prod(in_shape), math.prod(out_shape))
    if config.init in FACTORING_INITS and r > fan:
        where = f"stacked kernel {shape}, {n} layer axis(es)" if n else f"kernel {shape}"
        raise ValueError(
            f"init={config.init!r} needs rank <= min(fan_in, fan_out) = {fan} for {path!r} "
            f"({where}, input axes {tuple(in_axes)}); got rank {r}."
        )
    c_shape = tuple(shape[d] for d in carried)
    check_rank(path, shape, in_shape, out_shape, c_shape, r)
    picked = None
    if layers is not None:  # the layers picked on the first layer axis (every expert)
        picked = np.zeros(shape[:n], bool)
        picked[list(layers)] = True
        picked = np.broadcast_to(picked.reshape(shape[:n] + (1,) * len(experts)), c_shape)
    if experts and config.init == "loftq":
        raise ValueError(
            f"init='loftq' does not support expert kernels yet ({path!r}, expert axes {experts})."
        )
    base: QuantizedKernel | jax.Array | None
    if config.init == "loftq":  # the base becomes Q, quantized
        a, b, base = loftq_factors(
            kernel_values(kernel, config.init),
            in_axes,
            r,
            scale,
            config.loftq_iter,
            config.loftq_dtype,
            layer_axes=n,
            picked=picked,
        )
    else:
        a, b, base = _carried_first(
            lambda k_t, in_t: init_factors(
                key, k_t, config.init, kind, in_t, r, scale, config.dtype, len(carried), picked
            ),
            kernel,
            carried,
            in_axes,
        )
    a = a.astype(config.dtype).reshape((*c_shape, *in_shape, r))
    b = b.astype(config.dtype).reshape((*c_shape, r, *out_shape))
    w = LoraWeights(
        a=place(a, kernel, (*carried, *in_axes), -1),
        b=place(b, kernel, (*carried, *out_axes), len(carried)),
        scale=scale,
        in_axes=tuple(in_axes),
        kernel_shape=shape,
        kind=kind,
        dropout=float(config.dropout),
        layer_axes=n,
        layers=layers,
        expert_axes=experts,
    )
    return w, base


def _transposed(
    kernel: jax.Array | jax.ShapeDtypeStruct, perm: tuple[int, ...]
) -> jax.Array | jax.ShapeDtypeStruct:
    """``kernel`` (an array or a shape) transposed by ``perm``."""
    if isinstance(kernel, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(kernel.shape[d] for d in perm), kernel.dtype)
    return jnp.transpose(kernel, perm)


def _placed(w: LoraWeights, kernel: jax.Array | jax.ShapeDtypeStruct) -> LoraWeights:
    """``w`` (made in its kernel's scan layout) with its factors given the sharding of the
    kernel axes as stored (`place`)."""
    own = lambda axes: tuple(w.stored_order.index(d) for d in axes)
    c = w.carried_axes
    return w.replace(
        a=place(w.a, kernel, own((*c, *w.in_axes)), -1),
        b=place(w.b, kernel, own((*c, *w.out_axes)), len(c)),
    )


def _carried_first(
    make: Callable[
        [jax.Array | jax.ShapeDtypeStruct, tuple[int, ...]],
        tuple[jax.Array, jax.Array, jax.Array | None],
    ],
    kernel: jax.Array | jax.ShapeDtypeStruct,
    carried: tuple[int, ...],
    in_axes: tuple[int, ...],
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``make(kernel, in_axes)`` on the kernel with its carried axes moved first (an expert
    axis need not lead), its residual base (if any) put back in the kernel's layout."""
    rest = tuple(d for d in range(len(kernel.shape)) if d not in carried)
    perm = (*carried, *rest)
    if perm == tuple(range(len(perm))):
        return make(kernel, in_axes)
    if isinstance(kernel, jax.ShapeDtypeStruct):
        moved: jax.Array | jax.ShapeDtypeStruct = jax.ShapeDtypeStruct(
            tuple(kernel.shape[d] for d in perm), kernel.dtype
        )
    else:
        moved = jnp.transpose(kernel, perm)
    a, b, base = make(moved, tuple(perm.index(d) for d in in_axes))
    if base is not None:
        base = jnp.transpose(base, tuple(perm.index(d) for d in range(len(perm))))
    return a, b, base
