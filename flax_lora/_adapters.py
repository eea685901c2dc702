"""The adapter of one kernel (`LoraWeights`) and the low-rank update it stands for."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from flax_lora._paths import describe, flatten

KINDS = ("dense", "conv", "embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """The LoRA factors of one kernel and what is needed to merge them.

    ``a`` and ``b`` are the only pytree leaves (the trainable arrays); everything else is static
    metadata that travels in the tree structure, so ``jax.tree.leaves(adapters)`` never holds a
    base weight or a scale.

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
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(metadata=dict(static=True))
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kind: str = dataclasses.field(default="dense", metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.kernel_shape)) if i not in self.in_axes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[i] for i in self.out_axes)

    def replace(self, **changes: Any) -> LoraWeights:
        return dataclasses.replace(self, **changes)

    def meta(self) -> dict[str, Any]:
        """The static fields as a JSON-ready dict."""
        return dict(
            scale=float(self.scale),
            in_axes=list(self.in_axes),
            kernel_shape=list(self.kernel_shape),
            kind=self.kind,
            dropout=float(self.dropout),
            rank=self.rank,
        )


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeights)


def adapter_table(adapters: Any) -> dict[str, LoraWeights]:
    """Maps each adapted kernel's path to its `LoraWeights`.

    Raises:
      TypeError: when ``adapters`` holds anything besides `LoraWeights` entries.
    """
    table = flatten(adapters, is_leaf=is_lora)
    stray = [p for p, v in table.items() if not is_lora(v) and v is not None]
    if stray:
        raise TypeError(
            "Expected an adapter tree as returned by lora.init (LoraWeights entries only); "
            f"found other leaves at {describe(stray)}."
        )
    return {p: v for p, v in table.items() if v is not None}


def check_fits(path: str, w: LoraWeights, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming ``path`` unless ``w`` fits a kernel of ``shape``."""
    if tuple(shape) != tuple(w.kernel_shape):
        raise ValueError(
            f"Adapter for {path!r} was made for a kernel of shape {tuple(w.kernel_shape)}, but "
            f"the kernel at that path has shape {tuple(shape)}. Were these adapters made for "
            "another model?"
        )
    r = w.a.shape[-1] if w.a.ndim else None
    if tuple(w.a.shape) != (*w.in_shape, r) or tuple(w.b.shape) != (r, *w.out_shape):
        raise ValueError(
            f"Adapter for {path!r}: expected a of shape {(*w.in_shape, 'r')} and b of shape "
            f"{('r', *w.out_shape)} with one rank r; got a {tuple(w.a.shape)}, "
            f"b {tuple(w.b.shape)}."
        )


def delta(w: LoraWeights, dtype: Any = jnp.float32) -> jax.Array:
    """``scale * a @ b`` in the kernel's layout, computed in ``dtype`` (float32 by default).

    The product runs at the highest matmul precision, so TPUs do not round it through bfloat16.
    """
    r = w.a.shape[-1]
    n_in = math.prod(w.in_shape)
    n_out = math.prod(w.out_shape)
    a = w.a.reshape(n_in, r).astype(dtype)
    b = w.b.reshape(r, n_out).astype(dtype)
    d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(w.scale, dtype)
    d = d.reshape(w.in_shape + w.out_shape)
    order = w.in_axes + w.out_axes
    inverse = tuple(order.index(i) for i in range(len(order)))
    return d.transpose(inverse)
