"""The adapter data types of the factors: `LoraWeights` (one kernel's factors),
`StackedLoraWeights` (a stack of them for routing), the axis layout they share (`Axes`) and
`AdapterLayout`, the static fields of a `LoraWeights` as a record of their own (no arrays).

Both types lay their factors out over the kernel's axes the same way (`Axes`): input
axes ``I``, output axes ``O`` and **carried axes** ``C``, the axes on which the adapter holds an
independent factor pair per index, so ``a`` has shape ``(*C, *I, r)`` and ``b`` ``(*C, r, *O)``.
The carried axes are the leading layer axes of a layered kernel (``nn.scan`` / ``nnx.scan``)
(``layer_axes``) followed by its expert axes (``expert_axes``: a batch dimension of the
``dot_general`` using the kernel, or the group axis of ``ragged_dot``), in the kernel's order.

A kernel may hold its layer axes elsewhere than in front (MaxText's ``param_scan_axis: 1``
stores ``(d, L, mlp)`` and moves ``L`` to the front before the scan): ``layer_at`` says where.
The static fields then describe the kernel in its **scan layout**, layer axes first (as the
scan slices it), and `Axes.to_stored` / `Axes.stored_shape` give the kernel's own layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Self, TypeGuard, cast

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._typing import Kind


class Axes:
    """The axis properties shared by `AdapterLayout`, `LoraWeights` and `StackedLoraWeights`,
    over their static fields ``in_axes``, ``kernel_shape``, ``layer_axes``, ``expert_axes``,
    ``layer_at``.

    The kernel's axes split into carried axes ``C`` (`carried_axes`), input axes ``I``
    (``in_axes``) and output axes ``O`` (`out_axes`, the rest). ``in_axes`` and
    ``kernel_shape`` refer to the whole kernel, carried axes included, in its scan layout
    (layer axes first); a kernel that holds its layer axes at ``layer_at > 0`` has the shape
    `stored_shape`.
    """

    in_axes: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    layer_axes: int
    expert_axes: tuple[int, ...]
    layer_at: int

    @property
    def stored_order(self) -> tuple[int, ...]:
        """For each axis of the kernel as stored, its axis in the scan layout: the permutation
        that `to_stored` applies (the identity when ``layer_at == 0``)."""
        n, at = self.layer_axes, self.layer_at
        return stored_order(n, at, len(self.kernel_shape))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The kernel's shape as stored: ``kernel_shape`` with its layer axes at ``layer_at``."""
        return tuple(self.kernel_shape[i] for i in self.stored_order)

    def to_stored(self, x: jax.Array) -> jax.Array:
        """``x``, an array in the kernel's scan layout (layer axes first; ``kernel_shape``),
        with its layer axes moved to ``layer_at``, the kernel's own layout."""
        order = self.stored_order
        return x if order == tuple(range(len(order))) else jnp.transpose(x, order)

    def to_scan(self, x: jax.Array) -> jax.Array:
        """``x``, an array in the kernel's own layout (`stored_shape`), with its layer axes
        moved first: the scan layout of ``kernel_shape`` (the inverse of `to_stored`)."""
        order = self.stored_order
        if order == tuple(range(len(order))):
            return x
        return jnp.transpose(x, tuple(order.index(i) for i in range(len(order))))

    @property
    def carried_axes(self) -> tuple[int, ...]:
        """The kernel's carried axes, in order: the leading layer axes of a layered kernel,
        then its expert axes (``()`` for an ordinary kernel)."""
        return tuple(range(self.layer_axes)) + tuple(self.expert_axes)

    @property
    def carried_shape(self) -> tuple[int, ...]:
        """The sizes of the carried axes ``C``: the leading axes of ``a`` and ``b``."""
        return tuple(self.kernel_shape[i] for i in self.carried_axes)

    @property
    def out_axes(self) -> tuple[int, ...]:
        """The kernel's output axes (neither input nor carried axes), in order."""
        skip = set(self.in_axes) | set(self.carried_axes)
        return tuple(i for i in range(len(self.kernel_shape)) if i not in skip)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The sizes of the kernel's input axes ``I``."""
        return tuple(self.kernel_shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The sizes of the kernel's output axes ``O``."""
        return tuple(self.kernel_shape[i] for i in self.out_axes)

    def replace(self, **changes: object) -> Self:
        """A copy with the given fields changed (`dataclasses.replace`), e.g. new factors."""
        changed: Self = dataclasses.replace(cast(Any, self), **changes)  # subclasses: dataclasses
        return changed


@dataclasses.dataclass(frozen=True)
class AdapterLayout(Axes):
    """The static fields of a `LoraWeights` (its layout, scale and dropout), without factors:
    what code needs that handles a kernel's adapter before or apart from its arrays (the
    engine's view metadata, one layer's or one carried index's layout in a loop over them).
    `LoraWeights.layout` gives it; `with_factors` makes the `LoraWeights` back.

    Attributes: as the static fields of `LoraWeights`.
    """

    scale: float
    in_axes: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    kind: Kind = "dense"
    dropout: float = 0.0
    layer_axes: int = 0
    layers: tuple[int, ...] | None = None
    expert_axes: tuple[int, ...] = ()
    layer_at: int = 0

    LAYOUT_FIELDS = ("kernel_shape", "layer_axes", "expert_axes", "in_axes", "kind", "layer_at")
    """The static fields that adapters of one kernel share whatever their ranks and scales."""

    def with_factors(self, a: jax.Array, b: jax.Array, m: jax.Array | None = None) -> LoraWeights:
        """The `LoraWeights` of this layout with factors ``a``, ``b`` (and DoRA's ``m``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return LoraWeights(a=a, b=b, m=m, **fields)

    def layer_slice(self, n: int = 1) -> AdapterLayout:
        """The layout of one layer's kernel of a layered adapter: ``n`` leading layer axes
        dropped (``layers`` cleared; the layer axes left, if any, stay at ``layer_at``)."""
        return dataclasses.replace(
            self,
            kernel_shape=tuple(self.kernel_shape[n:]),
            in_axes=tuple(d - n for d in self.in_axes),
            layer_axes=self.layer_axes - n,
            expert_axes=tuple(d - n for d in self.expert_axes),
            layers=None,
            layer_at=self.layer_at if self.layer_axes > n else 0,
        )

    def carried_slice(self) -> AdapterLayout:
        """The layout of the kernel at one carried index (one layer of a layered kernel, one
        expert): every carried axis dropped (``layers`` cleared, input axes renumbered)."""
        carried = set(self.carried_axes)
        kept = [i for i in range(len(self.kernel_shape)) if i not in carried]
        return dataclasses.replace(
            self,
            kernel_shape=tuple(self.kernel_shape[i] for i in kept),
            in_axes=tuple(kept.index(d) for d in self.in_axes),
            layer_axes=0,
            expert_axes=(),
            layers=None,
            layer_at=0,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights(Axes):
    """The LoRA factors of one kernel and what is needed to merge them.

    ``a`` and ``b`` (and DoRA's ``m``) are the only pytree leaves (the trainable arrays);
    everything else is static metadata that travels in the tree structure, so
    ``jax.tree.leaves(adapters)`` never holds a base weight or a scale. For a kernel whose axes
    split into input axes ``I`` (contracted with the layer input, or gathered by an Embed
    lookup), output axes ``O`` and carried axes ``C`` (layer axes of an ``nn.scan`` stack, then
    expert axes), ``a`` has shape ``(*C, *I, r)`` and ``b`` ``(*C, r, *O)``; the update is
    ``scale * a @ b`` per carried index, in the kernel's own layout (`lora.delta`). Guide:
    `docs/guides/config.md`.

    Examples:
      >>> w = lora.init(jax.random.key(0), {"kernel": jnp.ones((3, 4))}, lora.LoraConfig(rank=2))
      >>> w["kernel"].a.shape, w["kernel"].b.shape, w["kernel"].scale
      ((3, 2), (2, 4), 4.0)

    Attributes:
      a: the input-side factor, shape ``(*C, *I, r)``.
      b: the output-side factor, shape ``(*C, r, *O)``.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
      in_axes: the kernel's input axes, in order.
      kernel_shape: the shape of the adapted kernel (carried axes included).
      kind: ``"dense"`` (Dense, DenseGeneral, Einsum), ``"conv"`` or ``"embed"``.
      dropout: the dropout rate of the LoRA branch (applied in factored execution).
      m: DoRA's magnitude, shape ``(*C, *O)``, a third trainable leaf; ``None`` (no leaf) for
        plain LoRA. The adapted kernel is then ``m * V / ||V||``, ``V = W0 + scale * a @ b``
        (`docs/guides/dora.md`).
      layer_axes: the number of leading layer axes of a layered kernel (one whose layers
        ``nn.scan`` / ``nnx.scan`` stacks; 0 for an ordinary kernel): one adapter per layer.
      layers: for a layered kernel adapted on some layers only (``LoraConfig(layers=...)``),
        the adapted indices of its first layer axis; the others' factors are zero and stay zero
        (the update is masked per layer). ``None``: all layers.
      expert_axes: the kernel's expert axes (a batch dimension of the ``dot_general`` using it,
        the group axis of ``ragged_dot``, or an axis free in its product that later meets a
        kernel's batch dimension, as MaxText's dense MoE ``"BSM,EMH->BSEH"``): one adapter per
        expert, ``a (E, d, r)`` and ``b (E, r, f)`` for a kernel ``(E, d, f)``. ``()`` for an
        ordinary kernel.
      layer_at: where the kernel holds its layer axes (0: in front, as ``nn.scan`` stores
        them; 1 for MaxText's ``param_scan_axis: 1``, a kernel ``(d, L, mlp)``).
        ``kernel_shape``, ``in_axes`` and ``expert_axes`` describe the kernel with its layer
        axes moved first (``(L, d, mlp)``, its scan layout); `Axes.stored_shape` is its own
        shape. The factors keep the layer axes first whatever ``layer_at``.
    """

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kind: Kind = dataclasses.field(default="dense", metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    m: jax.Array | None = None
    layer_axes: int = dataclasses.field(default=0, metadata=dict(static=True))
    layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    expert_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    layer_at: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        """``r``, the size of the factors' shared axis (the last of ``a``)."""
        return int(self.a.shape[-1])

    @property
    def layout(self) -> AdapterLayout:
        """The static fields, without the arrays."""
        fields = dataclasses.fields(AdapterLayout)
        return AdapterLayout(**{f.name: getattr(self, f.name) for f in fields})

    def layer_slice(self, n: int = 1, **changes: object) -> LoraWeights:
        """The adapter of one layer's kernel of a layered adapter.

        Args:
          n: the number of leading layer axes to drop from the metadata (``layers`` is
            cleared).
          **changes: fields to set, as `dataclasses.replace` (e.g. that layer's ``a``, ``b``).

        Returns:
          A `LoraWeights` for one layer's kernel.
        """
        return self.layout.layer_slice(n).with_factors(self.a, self.b, self.m).replace(**changes)

    def carried_slice(self, **changes: object) -> LoraWeights:
        """The adapter of the kernel at one carried index (one layer, one expert).

        Args:
          **changes: fields to set, as `dataclasses.replace` (e.g. that index's ``a``, ``b``).

        Returns:
          A `LoraWeights` with every carried axis dropped from the metadata.
        """
        return self.layout.carried_slice().with_factors(self.a, self.b, self.m).replace(**changes)

    def meta(self) -> dict[str, object]:
        """The static fields as a JSON-ready dict (a checkpoint's metadata).

        Returns:
          A dict of plain values: lists, strings, numbers, bools, ``None``.
        """
        return dict(
            scale=float(self.scale),
            in_axes=list(self.in_axes),
            kernel_shape=list(self.kernel_shape),
            kind=self.kind,
            dropout=float(self.dropout),
            rank=self.rank,
            dora=self.m is not None,
            layer_axes=self.layer_axes,
            layers=None if self.layers is None else list(self.layers),
            expert_axes=list(self.expert_axes),
            layer_at=self.layer_at,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedLoraWeights(Axes):
    """N adapters of one kernel, stacked for per-example routing (made by `lora.stack`).

    Adapter ``k``'s delta is ``a[k] @ b[k]`` (no scale: each adapter's scale is folded into its
    ``b``), reshaped to the kernel's layout as for `LoraWeights`; the adapter axis comes first,
    then the carried axes ``C``. Adapters of rank ``rₖ < R`` are padded with zeros on the rank
    axis (``a[k, ..., rₖ:] == 0``; without carried axes ``b[k, rₖ:] == 0``), which leaves their
    deltas and DoRA norms unchanged. A routed call gathers the factors per example (``-1``:
    zeros, the base). Guide: `docs/guides/multi_adapter.md`.

    Examples:
      >>> params = {"kernel": jnp.ones((3, 4))}
      >>> adapters_a = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2))
      >>> adapters_b = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=3))
      >>> w = lora.stack([adapters_a, adapters_b])["kernel"]
      >>> w.num_adapters, w.ranks, w.a.shape, w.b.shape
      (2, (2, 3), (2, 3, 3), (2, 3, 4))

    Attributes:
      a: shape ``(N, *C, *I, R)``, ``R`` the largest rank.
      b: shape ``(N, *C, R, *O)``, each ``b[k]`` multiplied by adapter ``k``'s scale.
      ranks: the original rank of each adapter (static): ``a[k, ..., :ranks[k]]`` is its own.
      in_axes: the kernel's input axes, in order.
      kernel_shape: the shape of the adapted kernel (carried axes included).
      kind: ``"dense"``, ``"conv"`` or ``"embed"``.
      dropout: the dropout rate of the LoRA branch (one for all adapters).
      layer_axes: the number of leading layer axes, as `LoraWeights.layer_axes`.
      m: DoRA magnitudes ``(N, *C, *O)``, zeros for plain adapters; ``None`` (no leaf) when no
        stacked adapter is DoRA.
      dora: static, with ``m``: per adapter ``False`` (plain: its ``m[k]`` is not read and its
        ``g = m / ||V||`` is 1), ``True`` (DoRA) or, for a layered DoRA adapter adapted on some
        layers only, the tuple of its ``layers``; ``None`` without ``m``.
      expert_axes: the kernel's expert axes, as `LoraWeights.expert_axes`.
      layer_at: where the kernel holds its layer axes, as `LoraWeights.layer_at`.
    """

    a: jax.Array
    b: jax.Array
    ranks: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kind: Kind = dataclasses.field(default="dense", metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    layer_axes: int = dataclasses.field(default=0, metadata=dict(static=True))
    m: jax.Array | None = None
    dora: tuple[bool | tuple[int, ...], ...] | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )
    expert_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    layer_at: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        """``N``, the number of stacked adapters."""
        return len(self.ranks)

    def dora_keep(self) -> np.ndarray:
        """Where ``m`` is read.

        Returns:
          A boolean array ``(N, *C)``: True for DoRA adapters (on the layers they adapt),
          False for plain ones (their ``g`` is 1).
        """
        keep = np.zeros((self.num_adapters, *self.carried_shape), bool)
        for k, d in enumerate(self.dora or (False,) * self.num_adapters):
            if d is True:
                keep[k] = True
            elif d is not False:  # picked positions on the first layer axis
                keep[k, np.asarray(d, int)] = True
        return keep

    @property
    def rank(self) -> int:
        """``R``, the size of the factors' shared axis (the largest rank, the others padded)."""
        return int(self.a.shape[-1])

    @property
    def layout(self) -> AdapterLayout:
        """The layout of each stacked adapter, as a `LoraWeights` (scale 1: the stack's ``b``
        carries the scales)."""
        return AdapterLayout(
            scale=1.0,
            in_axes=self.in_axes,
            kernel_shape=self.kernel_shape,
            kind=self.kind,
            dropout=self.dropout,
            layer_axes=self.layer_axes,
            expert_axes=self.expert_axes,
            layer_at=self.layer_at,
        )

    def entry(self, a: jax.Array, b: jax.Array, m: jax.Array | None = None) -> LoraWeights:
        """One adapter of the stack as a `LoraWeights` of this kernel (scale 1, `layout`).

        Args:
          a: its ``a``, e.g. ``self.a[k]`` or factors gathered per example.
          b: its ``b``, as ``a``.
          m: its DoRA magnitude, or ``None``.

        Returns:
          The `LoraWeights`.
        """
        return self.layout.with_factors(a, b, m)


def stored_order(n: int, at: int, ndim: int) -> tuple[int, ...]:
    """The permutation that moves ``n`` leading axes of an ``ndim``-axis array to position
    ``at`` (`Axes.to_stored`): stored axis ``j`` is scan-layout axis ``order[j]``."""
    rest = tuple(range(n, ndim))
    return (*rest[:at], *range(n), *rest[at:])


def is_lora(x: object) -> TypeGuard[LoraWeights]:
    return isinstance(x, LoraWeights)


def is_stacked(x: object) -> TypeGuard[StackedLoraWeights]:
    return isinstance(x, StackedLoraWeights)


def factor_dtype(ws: Sequence[LoraWeights | StackedLoraWeights]) -> jnp.dtype:
    """The promoted dtype of the factors of ``ws``."""
    return jnp.result_type(*[w.a.dtype for w in ws], *[w.b.dtype for w in ws])
