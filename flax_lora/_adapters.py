"""The adapter data types: `LoraWeights` (one kernel's factors), `StackedLoraWeights` (a stack
of them for routing), the axis layout they share, the update ``delta``, the per-layer mask, the
tables of an adapter tree and the shape checks.

Both types lay their factors out over the kernel's axes the same way (`AdapterLayout`): input
axes ``I``, output axes ``O`` and **carried axes** ``C``, the axes on which the adapter holds an
independent factor pair per index, so ``a`` has shape ``(*C, *I, r)`` and ``b`` ``(*C, r, *O)``.
The carried axes are the leading layer axes of a kernel stacked by ``nn.scan`` / ``nnx.scan``
(``layer_axes``) followed by its expert axes (``expert_axes``: a batch dimension of the
``dot_general`` using the kernel, or the group axis of ``ragged_dot``), in the kernel's order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._extras import Extra, is_extra, split
from flax_lora._paths import describe, flatten
from flax_lora._typing import Kind, PyTree


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
        """The kernel's carried axes, in order: the leading layer axes of a scan-stacked kernel,
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
        `flax_lora._dora`).
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
        """The adapter of one layer's kernel of a scan-stacked adapter: ``n`` leading layer
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
        """The adapter of the kernel at one carried index (one layer of a scan stack, one
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


def adapter_table(adapters: PyTree) -> dict[str, LoraWeights]:
    """Maps each adapted kernel's path to its `LoraWeights` (trained copies and token deltas,
    `flax_lora._extras`, are left out: see `flax_lora._extras.split`).

    Raises:
      TypeError: when ``adapters`` holds anything besides adapter entries.
    """
    table = flatten(adapters, is_leaf=lambda x: is_lora(x) or is_extra(x))
    stray = [p for p, v in table.items() if not (is_lora(v) or is_extra(v)) and v is not None]
    if stray:
        raise TypeError(
            "Expected an adapter tree as returned by lora.init (LoraWeights, TrainedCopy and "
            f"TokenDelta entries only); found other leaves at {describe(stray)}."
        )
    return {p: v for p, v in table.items() if is_lora(v)}


def adapter_tables(
    adapter_list: Sequence[PyTree], fn: str, dora_ok: bool = False
) -> list[dict[str, LoraWeights]]:
    """The `adapter_table` of each of several adapter sets of one model (for `lora.combine`,
    `lora.stack`), checked to adapt the same kernels with the same layouts (DoRA adapters
    refused unless ``dora_ok``).

    Raises:
      TypeError: ``adapter_list`` is not a list of adapter sets.
      ValueError: it is empty, its first set adapts nothing, the sets adapt different kernels or
        disagree on a kernel's layout, a set's factors disagree on their rank, or (without
        ``dora_ok``) a set holds DoRA adapters; naming ``lora.{fn}`` and the path.
    """
    if isinstance(adapter_list, Mapping) or not isinstance(adapter_list, Sequence):
        raise TypeError(
            f"lora.{fn} takes a list of adapter sets (e.g. [adapters_a, adapters_b]); got "
            f"{type(adapter_list).__name__}. For a dict of tasks pass list(tasks.values())."
        )
    if not adapter_list:
        raise ValueError(f"lora.{fn}: adapter_list is empty; pass at least one adapter set.")
    tables = [adapter_table(ad) for ad in adapter_list]
    dora = [f"set {i}: {p}" for i, t in enumerate(tables) for p, w in t.items() if w.m is not None]
    if dora and not dora_ok:  # m / ||W0 + delta|| does not combine linearly
        raise ValueError(
            f"lora.{fn} does not support DoRA adapters (with a magnitude m), found at "
            f"{describe(dora)}: a DoRA kernel m * V / ||V|| is not linear in the adapters. "
            "Merge each DoRA adapter into its own params (lora.merge) instead."
        )
    first = tables[0]
    if not first:
        raise ValueError(f"lora.{fn}: adapter set 0 holds no adapters.")
    for i, table in enumerate(tables[1:], start=1):
        missing = [p for p in first if p not in table]
        extra = [p for p in table if p not in first]
        if missing or extra:
            raise ValueError(
                f"lora.{fn}: all adapter sets must adapt the same kernels. Adapter set {i} lacks "
                f"{describe(missing)} and has extra {describe(extra)} compared with set 0."
            )
        for path, w in table.items():
            w0 = first[path]
            for field in AdapterLayout.LAYOUT_FIELDS:
                if getattr(w, field) != getattr(w0, field):
                    raise ValueError(
                        f"lora.{fn}: adapters for {path!r} disagree on {field}: set 0 has "
                        f"{getattr(w0, field)!r}, set {i} has {getattr(w, field)!r}. Were they "
                        "made for different models?"
                    )
            if w.a.shape[-1] != w.b.shape[len(w.carried_axes)]:
                raise ValueError(
                    f"lora.{fn}: adapter set {i} at {path!r} has a of shape {tuple(w.a.shape)} "
                    f"and b of shape {tuple(w.b.shape)}: their ranks differ."
                )
    return tables


def extra_tables(adapter_list: Sequence[PyTree]) -> list[dict[str, Extra]]:
    """The trained copies and token deltas (`flax_lora._extras`) of each adapter set."""
    return [split(ad, is_lora)[1] for ad in adapter_list]


def factor_dtype(ws: Sequence[AdapterLayout]) -> Any:
    """The promoted dtype of the factors of ``ws``."""
    return jnp.result_type(*[w.a.dtype for w in ws], *[w.b.dtype for w in ws])


def check_fits(path: str, w: LoraWeights, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming ``path`` unless ``w`` fits a kernel of ``shape``."""
    if tuple(shape) != tuple(w.kernel_shape):
        raise ValueError(
            f"Adapter for {path!r} was made for a kernel of shape {tuple(w.kernel_shape)}, but "
            f"the kernel at that path has shape {tuple(shape)}. Were these adapters made for "
            "another model?"
        )
    r = w.a.shape[-1] if w.a.ndim else None
    c = w.carried_shape
    if tuple(w.a.shape) != (*c, *w.in_shape, r) or tuple(w.b.shape) != (*c, r, *w.out_shape):
        raise ValueError(
            f"Adapter for {path!r}: expected a of shape {(*c, *w.in_shape, 'r')} and b of "
            f"shape {(*c, 'r', *w.out_shape)} with one rank r; got a {tuple(w.a.shape)}, "
            f"b {tuple(w.b.shape)}."
        )
    if w.m is not None and tuple(w.m.shape) != (*c, *w.out_shape):
        raise ValueError(
            f"DoRA adapter for {path!r}: expected a magnitude m of shape {tuple(w.out_shape)} "
            f"(the kernel's output axes); got {tuple(w.m.shape)}."
        )


def delta(w: LoraWeights, dtype: Any = jnp.float32) -> jax.Array:
    """``scale * a @ b`` in the kernel's layout, computed in ``dtype`` (float32 by default).

    The product runs at the highest matmul precision, so TPUs do not round it through bfloat16.
    For a scan-stacked kernel it is one product per layer (layers not picked by
    ``LoraConfig(layers=...)`` give zeros). A DoRA adapter's magnitude is not applied here:
    `lora.merge` forms the DoRA kernel.

    Example:
      >>> w = adapters["params"]["Dense_0"]["kernel"]
      >>> d = lora.delta(w)  # same shape as params["params"]["Dense_0"]["kernel"]

    Args:
      w: the `LoraWeights` of one kernel.
      dtype: the dtype to compute and return in.

    Returns:
      An array of the kernel's shape: the update ``merge`` adds for a plain LoRA adapter.
    """
    r = w.a.shape[-1]
    n_in = math.prod(w.in_shape)
    n_out = math.prod(w.out_shape)
    lead = w.carried_shape  # one product per carried index (a batched matmul)
    a = masked_factor(w, w.a.reshape(*lead, n_in, r).astype(dtype))
    b = w.b.reshape(*lead, r, n_out).astype(dtype)
    d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(w.scale, dtype)
    d = d.reshape(lead + w.in_shape + w.out_shape)
    order = w.carried_axes + w.in_axes + w.out_axes
    inverse = tuple(order.index(i) for i in range(len(order)))
    return d.transpose(inverse)


def layer_mask(w: LoraWeights) -> np.ndarray | None:
    """For a stacked kernel adapted on some layers only: 1.0 on the adapted indices of its first
    layer axis, 0.0 elsewhere (shape ``(L,)``); ``None`` when every layer is adapted."""
    if w.layers is None or not w.layer_axes:
        return None
    return np.isin(np.arange(w.kernel_shape[0]), np.asarray(w.layers, int)).astype(np.float32)


def carried_mask(w: LoraWeights, ndim: int | None = None) -> np.ndarray | None:
    """1.0 on the carried indices that ``w`` adapts, 0.0 on the others (today: the layers
    `layer_mask` picks); ``None`` when it adapts every index.

    Shape ``w.carried_shape``; with ``ndim``, that shape followed by size-1 axes up to ``ndim``
    axes, to broadcast against an array whose leading axes are the carried axes (a factor, a
    magnitude, or an array in the layout of a kernel whose carried axes lead).
    """
    mask = layer_mask(w)
    if mask is None:
        return None
    c = len(w.carried_axes)
    mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (c - 1)), w.carried_shape)
    return mask if ndim is None else mask.reshape(mask.shape + (1,) * (ndim - c))


def masked_factor(w: LoraWeights, x: jax.Array) -> jax.Array:
    """``x`` (leading axes: ``w``'s carried axes, e.g. a factor) zeroed on the carried indices
    ``w`` does not adapt (`carried_mask`), so they give a zero update and a zero gradient."""
    mask = carried_mask(w, jnp.ndim(x))
    return x if mask is None else x * jnp.asarray(mask, x.dtype)
