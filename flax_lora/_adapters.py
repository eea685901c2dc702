"""The adapter of one kernel (`LoraWeights`) and the low-rank update it stands for."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._paths import describe, flatten
from flax_lora._typing import Kind


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights:
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

    @property
    def rank(self) -> int:
        """``r``, the size of the factors' shared axis."""
        return int(self.a.shape[-1])

    @property
    def out_axes(self) -> tuple[int, ...]:
        """The kernel's output axes (not input, not layer axes), in order."""
        return tuple(
            i for i in range(self.layer_axes, len(self.kernel_shape)) if i not in self.in_axes
        )

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The sizes of the leading layer axes of a scan-stacked kernel (``()`` otherwise)."""
        return tuple(self.kernel_shape[: self.layer_axes])

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The sizes of the kernel's input axes ``I``."""
        return tuple(self.kernel_shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The sizes of the kernel's output axes ``O``."""
        return tuple(self.kernel_shape[i] for i in self.out_axes)

    def replace(self, **changes: Any) -> LoraWeights:
        """A copy with the given fields changed (`dataclasses.replace`), e.g. new factors."""
        return dataclasses.replace(self, **changes)

    def unstacked(self, n: int = 1, **changes: Any) -> LoraWeights:
        """The adapter of one layer's kernel of a scan-stacked adapter: ``n`` leading layer
        axes dropped from the metadata (``layers`` cleared), with ``changes`` (e.g. that layer's
        factors ``a``, ``b``) applied."""
        return dataclasses.replace(
            self,
            kernel_shape=tuple(self.kernel_shape[n:]),
            in_axes=tuple(d - n for d in self.in_axes),
            layer_axes=self.layer_axes - n,
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
        )


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeights)


def adapter_table(adapters: Any) -> dict[str, LoraWeights]:
    """Maps each adapted kernel's path to its `LoraWeights` (trained copies and token deltas,
    `flax_lora._extras`, are left out: see `flax_lora._extras.split`).

    Raises:
      TypeError: when ``adapters`` holds anything besides adapter entries.
    """
    from flax_lora._extras import is_extra

    table = flatten(adapters, is_leaf=lambda x: is_lora(x) or is_extra(x))
    stray = [p for p, v in table.items() if not (is_lora(v) or is_extra(v)) and v is not None]
    if stray:
        raise TypeError(
            "Expected an adapter tree as returned by lora.init (LoraWeights, TrainedCopy and "
            f"TokenDelta entries only); found other leaves at {describe(stray)}."
        )
    return {p: v for p, v in table.items() if is_lora(v)}


def check_fits(path: str, w: LoraWeights, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming ``path`` unless ``w`` fits a kernel of ``shape``."""
    if tuple(shape) != tuple(w.kernel_shape):
        raise ValueError(
            f"Adapter for {path!r} was made for a kernel of shape {tuple(w.kernel_shape)}, but "
            f"the kernel at that path has shape {tuple(shape)}. Were these adapters made for "
            "another model?"
        )
    r = w.a.shape[-1] if w.a.ndim else None
    lead = w.layer_shape
    if tuple(w.a.shape) != (*lead, *w.in_shape, r) or tuple(w.b.shape) != (
        *lead,
        r,
        *w.out_shape,
    ):
        raise ValueError(
            f"Adapter for {path!r}: expected a of shape {(*lead, *w.in_shape, 'r')} and b of "
            f"shape {(*lead, 'r', *w.out_shape)} with one rank r; got a {tuple(w.a.shape)}, "
            f"b {tuple(w.b.shape)}."
        )
    if w.m is not None and tuple(w.m.shape) != (*lead, *w.out_shape):
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
    lead = w.layer_shape  # stacked layers: one product per layer (a batched matmul)
    a = w.a.reshape(*lead, n_in, r).astype(dtype)
    b = w.b.reshape(*lead, r, n_out).astype(dtype)
    mask = layer_mask(w)
    if mask is not None:
        a = a * jnp.asarray(mask, dtype).reshape(mask.shape + (1,) * (a.ndim - 1))
    d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(w.scale, dtype)
    d = d.reshape(lead + w.in_shape + w.out_shape)
    order = tuple(range(len(lead))) + w.in_axes + w.out_axes
    inverse = tuple(order.index(i) for i in range(len(order)))
    return d.transpose(inverse)


def layer_mask(w: LoraWeights) -> np.ndarray | None:
    """For a stacked kernel adapted on some layers only: 1.0 on the adapted indices of its first
    layer axis, 0.0 elsewhere (shape ``(L,)``); ``None`` when every layer is adapted."""
    if w.layers is None or not w.layer_axes:
        return None
    return np.isin(np.arange(w.kernel_shape[0]), np.asarray(w.layers, int)).astype(np.float32)
