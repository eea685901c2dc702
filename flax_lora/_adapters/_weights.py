"""The adapter data types of the factors: `LoraWeights` (one kernel's factors),
`StackedLoraWeights` (a stack of them for routing) and the axis layout they share.

Both types lay their factors out over the kernel's axes the same way (`AdapterLayout`): input
axes ``I``, output axes ``O`` and **carried axes** ``C``, the axes on which the adapter holds an
independent factor pair per index, so ``a`` has shape ``(*C, *I, r)`` and ``b`` ``(*C, r, *O)``.
The carried axes are the leading layer axes of a layered kernel (``nn.scan`` / ``nnx.scan``)
(``layer_axes``) followed by its expert axes (``expert_axes``: a batch dimension of the
``dot_general`` using the kernel, or the group axis of ``ragged_dot``), in the kernel's order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._typing import Kind


class AdapterLayout:
    """The axis layout shared by `LoraWeights` and `StackedLoraWeights`: properties over their
    static fields (``in_axes``, ``kernel_shape``, ``layer_axes``) and the rank axis of ``a``.

    The kernel's axes split into carried axes ``C`` (`carried_axes`), input axes ``I``
    (``in_axes``) and output axes ``O`` (`out_axes`, the rest). ``in_axes`` and
    ``kernel_shape`` refer to the whole kernel, carried axes included.
    """

    a: Any
    in_axes: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    kind: Kind
    layer_axes: int
    expert_axes: tuple[int, ...]

    LAYOUT_FIELDS = ("kernel_shape", "layer_axes", "expert_axes", "in_axes", "kind")
    """The static fields that adapters of one kernel share whatever their ranks and scales."""

    @property
    def rank(self) -> int:
        """``r``, the size of the factors' shared axis (the last of ``a``; padded for a stack)."""
        return int(self.a.shape[-1])

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

    def replace(self, **changes: Any) -> Self:
        """A copy with the given fields changed (`dataclasses.replace`), e.g. new factors."""
        return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights(AdapterLayout):
    """The LoRA factors of one kernel and what is needed to merge them.

    ``a`` and ``b`` (and DoRA's ``m``) are the only pytree leaves (the trainable arrays);
    everything else is static metadata that travels in the tree structure, so
    ``jax.tree.leaves(adapters)`` never holds a base weight or a scale.

    For a kernel whose axes split into input axes ``I`` (contracted with the layer input, or
    gathered by an Embed lookup) and output axes ``O``, ``a`` has shape ``(*I, r)`` and ``b``
    has shape ``(r, *O)``; the update is ``scale * a @ b`` reshaped and transposed to the
    kernel's own layout.

    Attributes:
      a: the input-side factor, shape ``(*I, r)``.
      b: the output-side factor, shape ``(r, *O)``.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
      in_axes: the kernel's input axes, in order.
      kernel_shape: the shape of the adapted kernel.
      kind: ``"dense"`` (Dense, DenseGeneral, Einsum), ``"conv"`` or ``"embed"``.
      dropout: the dropout rate of the LoRA branch (applied in factored execution).
      m: DoRA's magnitude (``LoraConfig(dora=True)``), shape ``O`` (one entry per output unit),
        a third trainable leaf; ``None`` (no leaf) for plain LoRA. With it the adapted kernel is
        ``m * V / ||V||``, ``V = W0 + scale * a @ b``, the norm over the input axes (see
        `flax_lora._adapters._dora`).
      layer_axes: the number of leading layer axes of a kernel stacked by ``nn.scan`` /
        ``nnx.scan`` (0 for an ordinary kernel). A stacked kernel ``(L, *rest)`` has factors
        ``a`` ``(L, *I, r)`` and ``b`` ``(L, r, *O)``: one adapter per layer. ``in_axes`` and
        ``kernel_shape`` refer to the whole stacked kernel.
      layers: for a stacked kernel adapted on some layers only (``LoraConfig(layers=...)``),
        the adapted indices of its first layer axis; the others' factors are zero and stay zero
        (the update is masked per layer, so their gradients are zero). ``None``: all layers.
      expert_axes: the kernel's expert axes (a batch dimension of the ``dot_general`` using it,
        or the group axis of ``ragged_dot``), in order: one adapter per expert. For an expert
        kernel ``(E, d, f)`` the factors are ``a (E, d, r)`` and ``b (E, r, f)``; with layer
        axes too, ``a (L, E, d, r)``. ``()`` for an ordinary kernel.
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(metadata=dict(static=True))
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kind: Kind = dataclasses.field(default="dense", metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    m: Any = None
    layer_axes: int = dataclasses.field(default=0, metadata=dict(static=True))
    layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    expert_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def layer_slice(self, n: int = 1, **changes: Any) -> LoraWeights:
        """The adapter of one layer's kernel of a layered adapter: ``n`` leading layer
        axes dropped from the metadata (``layers`` cleared), with ``changes`` (e.g. that layer's
        factors ``a``, ``b``) applied."""
        return dataclasses.replace(
            self,
            kernel_shape=tuple(self.kernel_shape[n:]),
            in_axes=tuple(d - n for d in self.in_axes),
            layer_axes=self.layer_axes - n,
            expert_axes=tuple(d - n for d in self.expert_axes),
            layers=None,
            **changes,
        )

    def carried_slice(self, **changes: Any) -> LoraWeights:
        """The adapter of the kernel at one carried index (one layer of a layered kernel, one
        expert): every carried axis dropped from the metadata (``layers`` cleared, input axes
        renumbered), with ``changes`` (e.g. that index's factors ``a``, ``b``) applied."""
        carried = set(self.carried_axes)
        kept = [i for i in range(len(self.kernel_shape)) if i not in carried]
        return dataclasses.replace(
            self,
            kernel_shape=tuple(self.kernel_shape[i] for i in kept),
            in_axes=tuple(kept.index(d) for d in self.in_axes),
            layer_axes=0,
            expert_axes=(),
            layers=None,
            **changes,
        )

    def meta(self) -> dict[str, Any]:
        """The static fields as a JSON-ready dict."""
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
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedLoraWeights(AdapterLayout):
    """N adapters of one kernel, stacked for per-example routing (made by `lora.stack`).

    Adapter ``k``'s delta is ``a[k] @ b[k]`` (no scale: each adapter's scale is folded into its
    ``b``), reshaped to the kernel's layout exactly as for `LoraWeights`. Adapters of rank
    ``rₖ < R`` are padded with zeros: ``a[k, ..., rₖ:] == 0`` and ``b[k, rₖ:] == 0``.

    A routed forward gathers per example: for ``ids`` of shape ``(B,)``, ``a[ids]`` has shape
    ``(B, *I, R)`` and ``b[ids]`` shape ``(B, R, *O)``; ``ids == -1`` (the base model) needs a zero
    update, which `gather` gives (it maps ``-1`` out of range and fills with zeros).

    For a kernel stacked by ``nn.scan`` / ``nnx.scan`` (``layer_axes > 0``, kernel
    ``(*L, *rest)``) the adapter axis comes first and the layer axes next: ``a`` has shape
    ``(N, *L, *I, R)`` and ``b`` shape ``(N, *L, R, *O)``, adapter ``k``'s delta at layer ``l``
    being ``a[k, l] @ b[k, l]``. Layers an adapter does not adapt (``LoraConfig(layers=...)``)
    hold zero factors for it.

    DoRA: when some adapters carry a magnitude, ``m`` stacks them, shape ``(N, *O)``
    (``(N, *L, *O)``), and the static ``dora`` says per adapter which entries are DoRA. A plain
    adapter in the stack (``dora[k] is False``) behaves as a DoRA adapter whose magnitude is
    ``||W0 + a[k] @ b[k]||`` (its factor ``g = m / ||V||`` is 1): its ``m[k]`` holds zeros and
    is not read. A routed call computes ``g`` per adapter from ``W0`` (the detached factored norm;
    zero-padded ranks leave the norm unchanged) and gathers it per example (``g = 1`` for ``-1``).

    Attributes:
      a: shape ``(N, *I, R)`` (``(N, *L, *I, R)`` for a scan-stacked kernel).
      b: shape ``(N, R, *O)`` (``(N, *L, R, *O)``), each ``b[k]`` multiplied by adapter ``k``'s
        scale.
      ranks: the original rank of each adapter (static), so ``a[k, ..., :ranks[k]]`` is its own.
      in_axes: the kernel's input axes, in order.
      kernel_shape: the shape of the adapted kernel (the whole stack for a scan-stacked one).
      kind: ``"dense"``, ``"conv"`` or ``"embed"``.
      dropout: the dropout rate of the LoRA branch (of adapter 0).
      layer_axes: the number of leading layer axes of a scan-stacked kernel (0 otherwise), as
        `LoraWeights.layer_axes`.
      m: DoRA magnitudes ``(N, *O)`` (``(N, *L, *O)``), zeros for plain adapters; ``None`` (no
        leaf) when no stacked adapter is DoRA.
      dora: static, with ``m``: per adapter ``False`` (plain LoRA), ``True`` (DoRA) or, for a
        scan-stacked DoRA adapter adapted on some layers only, the tuple of its ``layers``
        (the other layers behave as plain: ``g = 1``); ``None`` without ``m``.
    """

    a: Any
    b: Any
    ranks: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kind: Kind = dataclasses.field(default="dense", metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    layer_axes: int = dataclasses.field(default=0, metadata=dict(static=True))
    m: Any = None
    dora: tuple[bool | tuple[int, ...], ...] | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )
    expert_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def num_adapters(self) -> int:
        """``N``, the number of stacked adapters."""
        return len(self.ranks)

    def dora_keep(self) -> np.ndarray:
        """Where ``m`` is read: a boolean array ``(N, *C)``, True for DoRA adapters (on the
        layers they adapt), False for plain ones (their ``g`` is 1)."""
        keep = np.zeros((self.num_adapters, *self.carried_shape), bool)
        for k, d in enumerate(self.dora or (False,) * self.num_adapters):
            if d is True:
                keep[k] = True
            elif d is not False:  # picked positions on the first layer axis
                keep[k, np.asarray(d, int)] = True
        return keep

    def entry(self, a: Any = None, b: Any = None, m: Any = None) -> LoraWeights:
        """One adapter of the stack as a `LoraWeights` of this kernel, with the factors (and
        DoRA magnitude) given: e.g. ``a[k]``, ``b[k]``, or factors gathered per example. Its
        scale is 1 (the stack's ``b`` carries the scales); without factors, the static layout
        alone (``a = b = None``)."""
        return LoraWeights(
            a=a,
            b=b,
            scale=1.0,
            in_axes=self.in_axes,
            kernel_shape=self.kernel_shape,
            kind=self.kind,
            dropout=self.dropout,
            m=m,
            layer_axes=self.layer_axes,
            expert_axes=self.expert_axes,
        )


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeights)


def is_stacked(x: Any) -> bool:
    return isinstance(x, StackedLoraWeights)


def factor_dtype(ws: Sequence[AdapterLayout]) -> Any:
    """The promoted dtype of the factors of ``ws``."""
    return jnp.result_type(*[w.a.dtype for w in ws], *[w.b.dtype for w in ws])
