"""`KernelView`: an adapted kernel as the interpreted model sees it, and every way to make one.

Factored execution never forms ``W = W0 + scale * a @ b``. Instead each adapted kernel enters
the traced model as a `KernelView`: the base kernel ``W0`` with the model's layout ops applied
to it (dtype promotion, transposes, reshapes: `flax_lora._factored._layout_ops`), together with the
factors ``a`` and ``b`` carried through the same ops. Each axis of the view's base is an input
axis ``I``, an output axis ``O`` or a carried axis, and the factors keep the invariant

    view == base + scale * contract_r(a, b),  with
    a: (*C, the I-axes of the view, in view order..., r),  b: (*C, r, the O-axes, in order...)

**Carried axes** ``C`` lead the factors: axes on which the adapter has an independent factor
pair per index. The view says which kind each is (`ViewMeta.carried`), and this module lays
them out (`make_view`, `make_routed_view`), slices them (`per_layer`) and maps them
(`per_example`):

- ``"layer"``: the layer axis of a layered kernel (``nn.scan`` / ``nnx.scan``). ``W0`` has it
  too (its side is ``"layer"``), where the kernel holds it (`LoraWeights.layer_at`; a transpose
  that moves it first, as MaxText's before its scan, moves only the sides); the scan rule
  slices it together with ``W0``, so the scan's body sees an ordinary view of one layer.
- ``"expert"``: an expert axis of the kernel (`LoraWeights.expert_axes`; its side is
  ``"expert"``): ``W0`` has it too, and the expert rules (`flax_lora._factored._expert_rules`) keep
  it a batch (or group) dimension of the low-rank products.
- ``"example"``: the adapter axis of a routing stack (`lora.stack`), gathered per example by
  ``lora_ids``, so its length is the batch; ``W0`` has no such axis. The routing rules map it
  with `jax.vmap` against the batch axis of the activation.

A DoRA view also carries ``g = m / ||V||`` (norm detached) per output unit, ``(*C, *O-axes)``;
it then stands for ``g * (base + scale * a @ b)``. The base may be a quantized kernel
(`flax_lora._factored._quant_base.QuantBase`, QLoRA), dequantized only where an op uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora import _jaxpr as jx
from flax_lora._adapters._delta import delta, layer_mask, masked_factor
from flax_lora._adapters._dora import dora_factor, dora_kernel, layered_factor
from flax_lora._adapters._weights import AdapterLayout, LoraWeights, StackedLoraWeights
from flax_lora._factored._quant_base import Base, as_array, as_base, layer_base
from flax_lora._multi._stack import gather, gather_dora
from flax_lora._typing import Leaf

Carried = Literal["layer", "example", "expert"]
LAYER: Carried = "layer"
EXAMPLE: Carried = "example"
EXPERT: Carried = "expert"
I_SIDE, O_SIDE = "I", "O"


@dataclasses.dataclass(eq=False)
class ViewMeta:
    """The static part of a view (compared by identity, so it can sit in a pytree treedef).

    Attributes:
      path: the kernel's path, for messages.
      weights: the adapter's static fields (an `AdapterLayout`), for `materialize`.
      ops: the layout ops applied so far, for `materialize`.
      side: for each axis of the view's base, ``"I"``, ``"O"``, ``"layer"`` or ``"expert"``.
      carried: the kind of each leading carried axis of the factors, in order.
      why: why the view can no longer be factored, if it cannot.
    """

    path: str
    weights: AdapterLayout
    ops: tuple[tuple[jx.Primitive, dict[str, Any]], ...]
    side: tuple[str, ...]
    carried: tuple[Carried, ...]
    why: str | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelView:
    """An adapted kernel inside the interpreted model; its arrays are pytree leaves.

    Attributes:
      root: the base kernel ``W0`` as it entered the model.
      root_a: the adapter's ``a`` in the kernel's layout (the layer mask applied), after the
        carried axes, for `materialize`.
      root_b: the adapter's ``b`` likewise.
      base: ``W0`` with the view's layout ops applied.
      a: the input-side factor in view layout, ``(*C, *I-axes of the view, r)``.
      b: the output-side factor in view layout, ``(*C, r, *O-axes of the view)``.
      meta: path, adapter metadata, the op history, the axis sides and the carried axes.
      g: DoRA only: the per-output-unit factor ``m / ||V||`` (norm detached) in view layout,
        ``(*C, *O-axes of the view)``, broadcast over the I-axes. ``None`` for plain LoRA.
      root_m: DoRA only: the magnitude giving ``g``, for `materialize`.
    """

    root: Base
    root_a: jax.Array
    root_b: jax.Array
    base: Base
    a: jax.Array
    b: jax.Array
    meta: ViewMeta = dataclasses.field(metadata=dict(static=True))
    g: jax.Array | None = None
    root_m: jax.Array | None = None

    @property
    def path(self) -> str:
        return self.meta.path

    @property
    def scale(self) -> float:
        return float(self.meta.weights.scale)

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def routed(self) -> bool:
        """Whether the factors hold an example axis (one adapter per example)."""
        return EXAMPLE in self.meta.carried

    @property
    def layered(self) -> bool:
        """Whether the factors hold a layer axis (a layered kernel, used whole)."""
        return LAYER in self.meta.carried

    def axes(self, side: str) -> list[int]:
        """The view's axes on ``side``, in view order (= the factor's axis order)."""
        return [d for d, s in enumerate(self.meta.side) if s == side]


def transposed(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """``x`` transposed by ``perm`` (no op for the identity)."""
    return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


# -- making views ------------------------------------------------------------------------------
def make_view(path: str, leaf: Leaf, w: LoraWeights) -> KernelView:
    """The view of an adapted kernel that no op has touched yet (a quantized kernel's base is a
    `QuantBase`, dequantized at its uses).

    A layered kernel keeps its layer axes: the layer mask (``LoraConfig(layers=...)``)
    is applied to ``a`` here, and DoRA's ``g`` is computed for every layer at once (the factored
    norm of `flax_lora._adapters._dora` mapped over the layers: no kernel-sized array; 1 on
    layers not picked, whose magnitude for `materialize` is then ``||W0||``).
    """
    kernel = as_base(leaf)
    a, g, root_m = w.a, None, w.m
    mask = layer_mask(w)
    a = masked_factor(w, a)  # layers not picked: zero update, zero gradient
    carried = (LAYER,) * w.layer_axes + (EXPERT,) * len(w.expert_axes)
    n = len(w.carried_axes)
    if w.m is not None and w.expert_axes and w.carried_axes != tuple(range(n)):
        view = _assemble(path, kernel, w.layout, a, w.b, None, root_m, carried)
        why = "DoRA on an expert kernel whose expert axes do not lead"
        return dataclasses.replace(view, meta=dataclasses.replace(view.meta, why=why))
    if w.m is not None and w.expert_axes:  # DoRA per expert (and layer): norms mapped over C
        inner = w.layout.carried_slice()  # the carried axes lead: the layout past them
        keep = None if mask is None else jnp.asarray(mask > 0)
        g, root_m = layered_factor(w.to_scan(as_array(kernel)), inner, a, w.b, w.m, n, keep)
        return _assemble(path, kernel, w.layout, a, w.b, g, root_m, carried)
    if w.m is not None and w.layer_axes:
        inner = w.layout.layer_slice(w.layer_axes)
        keep = None if mask is None else jnp.asarray(mask > 0)
        lead = w.to_scan(as_array(kernel))  # layer axes first (`LoraWeights.layer_at`)
        g, root_m = layered_factor(lead, inner, a, w.b, w.m, w.layer_axes, keep)
    elif w.m is not None:  # DoRA: the factor per output unit, from W0's norms and low-rank terms
        g = dora_factor(as_array(kernel), w)
    return _assemble(path, kernel, w.layout, a, w.b, g, root_m, carried)


def make_routed_view(
    path: str, kernel: jax.Array, w: StackedLoraWeights, ids: jax.Array
) -> KernelView:
    """The view of kernel ``path`` whose factors are adapter ``ids[j]``'s for example ``j``.

    ``w`` is a `StackedLoraWeights` (scales folded into ``b``); its adapter axis is gathered by
    ``ids`` into the view's leading ``"example"`` axis, zeros where ``ids == -1``. With DoRA
    adapters in the stack so are ``g`` (``m / ||V||`` of example ``j``'s adapter, 1 for plain
    adapters and ``-1``; `flax_lora._multi._stack`) and ``root_m`` (the magnitude giving it).
    """
    a, b = gather(w, ids)
    g, root_m = (None, None) if w.m is None else gather_dora(w, kernel, ids)
    carried = (EXAMPLE,) + (LAYER,) * w.layer_axes + (EXPERT,) * len(w.expert_axes)
    return _assemble(path, kernel, w.layout, a, b, g, root_m, carried)


def _assemble(
    path: str,
    kernel: Base,
    w: AdapterLayout,
    a: jax.Array,
    b: jax.Array,
    g: jax.Array | None,
    root_m: jax.Array | None,
    carried: tuple[Carried, ...],
) -> KernelView:
    """The view of ``kernel`` before any op: the factors' input and output axes put in the
    kernel's axis order, after the ``carried`` axes that lead them. The sides are those of the
    kernel as stored (its layer axes at ``w.layer_at``)."""
    n = len(carried)
    lead = tuple(range(n))
    scan_side = tuple(
        LAYER
        if d < w.layer_axes
        else EXPERT
        if d in w.expert_axes
        else I_SIDE
        if d in w.in_axes
        else O_SIDE
        for d in range(len(w.kernel_shape))
    )
    side = tuple(scan_side[d] for d in w.stored_order)
    in_order = sorted(range(len(w.in_axes)), key=lambda k: w.in_axes[k])
    out_order = sorted(range(len(w.out_axes)), key=lambda k: w.out_axes[k])
    view_a = transposed(a, (*lead, *[n + k for k in in_order], a.ndim - 1))
    view_b = transposed(b, (*lead, n, *[n + 1 + k for k in out_order]))
    view_g = None if g is None else transposed(g, (*lead, *[n + k for k in out_order]))
    meta = ViewMeta(path, w, (), side, carried)
    return KernelView(kernel, a, b, kernel, view_a, view_b, meta, g=view_g, root_m=root_m)


def materialize(v: KernelView) -> jax.Array:
    """``W0 + scale * a @ b`` in the kernel's dtype (as `lora.merge`; DoRA's kernel for a DoRA
    view), then the view's layout ops. Not for a routed view, which stands for one kernel per
    example: its uses run per example (`per_example`)."""
    w = v.meta.weights.with_factors(v.root_a, v.root_b, v.root_m)
    root = as_array(v.root)  # a quantized base is dequantized here
    compute = jnp.promote_types(root.dtype, jnp.float32)
    if w.m is not None:  # DoRA, as `lora.merge`
        out = dora_kernel(root, w, compute).astype(root.dtype)
    else:
        out = (root.astype(compute) + delta(w, compute)).astype(root.dtype)
    for prim, params in v.meta.ops:
        out = prim.bind(out, **params)
    return out


# -- slicing and mapping the carried axes ------------------------------------------------------
_FACTORS = ("root_a", "root_b", "a", "b", "g", "root_m")  # the arrays that hold the axes C


def per_layer(v: KernelView) -> KernelView:
    """What a scan over the view's first layer axis slices: the view's arrays with that axis
    first (``W0`` cut by `layer_base`: a quantized layered kernel is sliced per layer) and the
    metadata of one layer, so that `jax.lax.scan` hands its body an ordinary view of one layer.

    The scan rule has checked that this axis is the base's first and that only value ops (dtype
    casts, sharding) and transposes were applied (`flax_lora._factored._scan`); of those, the
    ones that commute with slicing stay in the layer's op history. A transpose that brought the
    layer axis first (a kernel whose layer axes do not lead, `LoraWeights.layer_at`) moves the
    root's layer axis first instead; what it does to the other axes stays, as one transpose.
    """
    meta = v.meta
    k = meta.carried.index(LAYER)
    perm = composed_transpose(v)
    is_array = lambda x: isinstance(x, jax.Array)
    ops = tuple((p, q) for p, q in meta.ops if p.name in jx.ELEMENTWISE)
    root = layer_base(v.root)
    rest = [d for d in range(len(perm)) if d != perm[0]]
    inner = tuple(rest.index(d) for d in perm[1:])  # the transpose left for one layer
    if perm[0] != 0 and not ops and inner == tuple(range(len(inner))) and is_array(v.base):
        root = v.base  # the root moved by the model's own transpose: no second copy
    elif perm[0] != 0:  # the root's layer axis is perm[0]: moved first, the rest as they were
        root = jnp.moveaxis(as_array(v.root), perm[0], 0)
    if inner != tuple(range(len(inner))):
        transpose = next(p for p, _ in meta.ops if p.name == "transpose")
        ops = (*ops, (transpose, {"permutation": inner}))
    one = ViewMeta(
        meta.path,
        meta.weights.layer_slice(1),  # layers cleared: the mask is already in a and root_a
        ops,
        meta.side[1:],
        meta.carried[:k] + meta.carried[k + 1 :],
    )
    first = lambda x: x if x is None or k == 0 else jnp.moveaxis(x, k, 0)
    moved = {f: first(getattr(v, f)) for f in _FACTORS}
    return dataclasses.replace(v, root=root, base=layer_base(v.base), meta=one, **moved)


def composed_transpose(v: KernelView) -> tuple[int, ...]:
    """The permutation of the root's axes that the view's transposes make (its other ops must
    keep the axes: value ops): the view's axis ``j`` is the root's axis ``perm[j]``."""
    perm = tuple(range(len(v.shape)))
    for p, params in v.meta.ops:
        if p.name == "transpose":
            perm = tuple(perm[i] for i in jx.bound_param(p, params, "permutation"))
    return perm


def per_example(v: KernelView) -> tuple[KernelView, KernelView]:
    """A routed view for `jax.vmap` over its example axis: the view with the metadata of one
    example (its arrays still whole) and its ``in_axes`` (the factors mapped on their example
    axis, ``W0`` not), sharing one treedef."""
    meta = v.meta
    k = meta.carried.index(EXAMPLE)
    inner = dataclasses.replace(
        v, meta=dataclasses.replace(meta, carried=meta.carried[:k] + meta.carried[k + 1 :])
    )
    mapped = {f: None if getattr(v, f) is None else k for f in _FACTORS}
    # vmap's in_axes: the view's pytree with an axis (or None) as each leaf, not a view
    spec = dataclasses.replace(inner, root=None, base=None, **mapped)  # type: ignore[arg-type]
    return inner, spec


def expert_slice(
    v: KernelView, axis: int, take: Callable[[jax.Array, int], jax.Array], base: Base
) -> KernelView:
    """The view sliced to one index on its expert axis ``axis`` (``w[e]`` of a loop over the
    experts): ``take(x, k)`` slices an array on its carried axis ``k``; ``base`` is ``W0``
    sliced. The view's ops so far must be value ops (its layout is the kernel's): the sliced
    view starts afresh, ``W0``'s slice as its root."""
    k = v.axes(EXPERT).index(axis) + v.meta.carried.index(EXPERT)
    cut: dict[str, Any] = {  # factors, some None: dataclasses.replace keywords
        f: None if getattr(v, f) is None else take(getattr(v, f), k) for f in _FACTORS
    }
    w = v.meta.weights.replace(kernel_shape=tuple(base.shape))
    meta = ViewMeta(v.meta.path, w, (), v.meta.side, v.meta.carried)
    return dataclasses.replace(v, root=base, base=base, meta=meta, **cut)


def drop_experts(v: KernelView, drop: set[int], base: Base) -> KernelView:
    """The view with its size-1 expert axes ``drop`` squeezed away (the other half of ``w[e]``):
    an ordinary view of one expert's kernel, ``base`` (``W0`` squeezed) its root."""
    meta, w = v.meta, v.meta.weights
    lost = [v.axes(EXPERT).index(d) + meta.carried.index(EXPERT) for d in sorted(drop)]
    cut: dict[str, Any] = {  # factors, some None: dataclasses.replace keywords
        f: None if getattr(v, f) is None else jnp.squeeze(getattr(v, f), tuple(lost))
        for f in _FACTORS
    }
    shift = lambda d: d - sum(1 for x in drop if x < d)
    one = w.replace(
        kernel_shape=tuple(base.shape),
        in_axes=tuple(shift(d) for d in w.in_axes),
        expert_axes=tuple(shift(d) for d in w.expert_axes if d not in drop),
    )
    side = tuple(s for d, s in enumerate(meta.side) if d not in drop)
    carried = tuple(c for k, c in enumerate(meta.carried) if k not in lost)
    meta = ViewMeta(meta.path, one, (), side, carried)
    return dataclasses.replace(v, root=base, base=base, meta=meta, **cut)
