"""`lora.init`: the adapter of every kernel `flax_lora._init._select` chooses (its factors made
by `flax_lora._init._factors` or, for LoftQ, `flax_lora._init._loftq`), and the extras beside
them (`flax_lora._init._init_extras`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._weights import LoraWeights
from flax_lora._config import LoraConfig
from flax_lora._init._factors import (
    FACTORING_INITS,
    check_rank,
    init_factors,
    rank_note,
    warn_ranks,
    with_magnitude,
)
from flax_lora._init._init_extras import init_extras, saved_leaves
from flax_lora._init._loftq import loftq_factors
from flax_lora._init._select import layered_kernels, select_kernels
from flax_lora._paths import flatten, nest, path_str
from flax_lora._probe import kernel_uses
from flax_lora._quant._formats import as_shapes, has_quantized, is_quantized
from flax_lora._sharding import place
from flax_lora._typing import Kind, PyTree


def init(
    key: jax.Array,
    params: PyTree,
    config: LoraConfig,
    probe: Callable[[PyTree], Any] | None = None,
) -> PyTree | tuple[PyTree, PyTree]:
    """Creates the LoRA adapters of every kernel of ``params`` that ``config`` selects.

    Example:
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> adapters = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2))
      >>> adapters["params"]["kernel"].a.shape, adapters["params"]["kernel"].b.shape
      ((3, 2), (2, 4))

    Which leaves are kernels: with ``probe``, every floating leaf of 2 or more dimensions that the
    traced probe contracts (``dot_general``, ``conv``) or gathers (an Embed lookup). Without a
    probe, with ``targets=None``, the 2-D leaves named ``kernel`` or ``embedding`` (Flax's names);
    with explicit ``targets``, every 2-D floating leaf they match. Rows of a 2-D kernel are its
    input axis; kernels of 3 or more dimensions need the probe.

    Expert kernels (mixture of experts): an axis the probe sees as a batch dimension of the
    ``dot_general`` using the kernel (``jnp.einsum("etd,edf->etf", x, w)``), as the group axis
    of ``jax.lax.ragged_dot``, or indexed one expert at a time (``w[e]`` in a Python loop) is an
    expert axis: the adapter holds one LoRA per expert, ``a (*L, *E, *I, r)`` and
    ``b (*L, *E, r, *O)`` (`LoraWeights.expert_axes`; ``L`` the layer axes of a scan stack),
    each expert's factors drawn as for a kernel of its own (``init="lora"``: kaiming-uniform
    ``a`` with ``fan_in = prod(I)``; PiSSA / OLoRA factor each expert's ``W0_e``).

    ``config.layers``: every index must pick a layer of some selected kernel (a position on a
    scan-stacked kernel's layer axis, or the layer number in a path), else ``ValueError``; an
    index in range for some stacks only (stacks of different lengths) adapts those. Negative
    indices are refused by `LoraConfig` (no counting from the end, as PEFT's
    ``layers_to_transform``). A rank above ``min(fan_in, fan_out)`` (``prod(I)``, ``prod(O)``,
    per layer / expert) is legal but adds nothing (``a @ b`` has rank at most that): one
    ``UserWarning`` names such paths; over ``4 x`` that side with factors of more than
    ``2**24`` entries (a typo such as ``rank=10**9``) it is refused before allocation.

    Args:
      key: a PRNG key.
      params: a Linen variables dict (``{"params": ...}``), an NNX state, or any pytree.
      config: what to adapt and how.
      probe: an optional function of the params alone, e.g. ``lambda p: model.apply(p, x)``,
        traced abstractly (no FLOPs) to learn each kernel's input axes and kind.

    Returns:
      The adapters: nested dicts that mirror the paths of the adapted kernels, each ending in a
      `LoraWeights` with factors ``a`` and ``b``; with ``modules_to_save``, ``bias`` or
      ``trainable_token_indices``, also a `TrainedCopy` or `TokenDelta` at the path of each
      leaf they train. With ``init="pissa"`` or ``"olora"``, the pair
      ``(adapters, new_params)``, where ``new_params`` holds the residual base kernels; with
      ``init="loftq"``, ``(adapters, qparams)``, where each adapted kernel of ``qparams`` is a
      `QuantizedKernel` (``config.loftq_dtype``) and ``deQ(Q) + scale * a @ b`` approximates it
      (see `lora.quantize`; the other leaves are unchanged).

    Raises:
      ValueError: no kernel matches; an index of ``layers`` picks no layer (naming it, the
        stacked kernels' layer counts and the paths' layer numbers); ``modules_to_save``
        patterns match no module; token ids are out of range for a table, or a table also gets
        LoRA factors; ``bias="lora_only"`` finds no bias beside the adapted kernels (all naming
        the paths); a rank is below 1, (PiSSA/OLoRA/LoftQ) above the kernel's smaller side, or
        far above it (above); a kernel has an axis of size 0 or, of 3 or more dimensions, no
        probe; the probe contracts or gathers no leaf of ``params`` (it ignores its argument).
      TypeError: a targeted leaf is not floating.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora.init expects a LoraConfig; got {type(config).__name__}.")
    original = params  # DoRA's magnitude needs the values of a quantized base
    params = _shapes_of_quantized(params, config)
    leaves = flatten(params)
    uses = None if probe is None else kernel_uses(probe, params)
    saved = saved_leaves(leaves, config)  # modules_to_save: trained whole, never factored
    selected = select_kernels({p: x for p, x in leaves.items() if p not in saved}, config, uses)
    layered = layered_kernels(selected, uses, leaves, config)  # nn.scan's layer axes
    keys = jax.random.split(key, max(len(selected), 1))
    bases = flatten(original, is_leaf=is_quantized) if config.dora else {}
    adapters: list[tuple[str, LoraWeights]] = []
    new_kernels: dict[str, PyTree] = {}
    too_big: list[str] = []  # adapters of a rank above their kernel's smaller side
    for k, (path, (kind, in_axes)) in zip(keys, selected.items(), strict=False):
        n, layers = layered.get(path, (0, None))
        experts = uses[path].expert_axes if uses is not None and path in uses else ()
        w, residual = _adapter(
            k, path, leaves[path], kind, in_axes, config, n, layers, tuple(experts)
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
) -> tuple[LoraWeights, PyTree]:
    """The adapter of one kernel (``n_layer_axes`` leading layer axes of a layered kernel,
    adapted on ``layers`` of the first one, ``None``: all; ``experts``: its expert axes, one
    adapter per expert), and the base it runs on when the init replaces it (PiSSA/OLoRA: the
    residual kernel; LoftQ: its `QuantizedKernel`), else ``None``."""
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
    if config.init == "loftq":  # the base becomes Q, quantized
        a, b, base = loftq_factors(
            kernel,
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


def _carried_first(
    make: Callable[[Any, tuple[int, ...]], tuple[Any, Any, Any]],
    kernel: jax.Array | jax.ShapeDtypeStruct,
    carried: tuple[int, ...],
    in_axes: tuple[int, ...],
) -> tuple[Any, Any, Any]:
    """``make(kernel, in_axes)`` on the kernel with its carried axes moved first (an expert
    axis need not lead), its residual base (if any) put back in the kernel's layout."""
    rest = tuple(d for d in range(len(kernel.shape)) if d not in carried)
    perm = (*carried, *rest)
    if perm == tuple(range(len(perm))):
        return make(kernel, in_axes)
    if isinstance(kernel, jax.ShapeDtypeStruct):
        moved: Any = jax.ShapeDtypeStruct(tuple(kernel.shape[d] for d in perm), kernel.dtype)
    else:
        moved = jnp.transpose(kernel, perm)
    a, b, base = make(moved, tuple(perm.index(d) for d in in_axes))
    if base is not None:
        base = jnp.transpose(base, tuple(perm.index(d) for d in range(len(perm))))
    return a, b, base
