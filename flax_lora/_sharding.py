"""Factor shardings from a kernel's `NamedSharding`: one `place` for every factor and magnitude.

An adapter's arrays are laid out on axes of its kernel (the carried axes, then the input or
the output axes) plus, for ``a`` and ``b``, the rank axis. Giving each such array the mesh axes
of the kernel axes it is laid out on keeps the low-rank products local where the kernel's own
product is, and the rank axis (small) is never split. An expert kernel sharded on its expert
axis (expert parallelism) thus gives factors sharded on their carried expert axis: each device
holds the LoRA of its own experts. `place_adapter` places all the arrays of one adapter.
"""

from __future__ import annotations

from typing import Protocol, Self, TypeVar

import jax


class FactorLayout(Protocol):
    """What `place_adapter` reads of an adapter (a `flax_lora.LoraWeights`)."""

    @property
    def a(self) -> jax.Array: ...

    @property
    def b(self) -> jax.Array: ...

    @property
    def m(self) -> jax.Array | None: ...

    @property
    def in_axes(self) -> tuple[int, ...]: ...

    @property
    def carried_axes(self) -> tuple[int, ...]: ...

    @property
    def out_axes(self) -> tuple[int, ...]: ...

    @property
    def stored_order(self) -> tuple[int, ...]: ...

    def replace(self, **changes: object) -> Self: ...


W = TypeVar("W", bound=FactorLayout)


def place(
    x: jax.Array,
    kernel: jax.Array | jax.ShapeDtypeStruct,
    axes: tuple[int, ...],
    rank_pos: int | None = None,
) -> jax.Array:
    """``x`` with the sharding of its kernel's ``axes``, one mesh axis entry per axis of ``x``.

    Args:
      x: a factor (or DoRA magnitude) whose axes are, in order, the kernel's ``axes`` with an
        unsharded rank axis inserted at ``rank_pos``.
      kernel: the kernel it belongs to; only its ``sharding`` is read.
      axes: the kernel axes ``x`` is laid out on.
      rank_pos: where ``x``'s rank axis is (``-1``: last); ``None``: ``x`` has none.

    Returns:
      ``x`` placed with a `NamedSharding` on the kernel's mesh; ``x`` itself when the kernel has
      no `NamedSharding` (one device, or a tracer under ``jit``).
    """
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or isinstance(kernel, jax.core.Tracer):
        return x
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    picked = [spec[i] for i in axes]
    if rank_pos is not None:
        picked.insert(rank_pos % (len(picked) + 1), None)
    return jax.device_put(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*picked))
    )


def place_adapter(w: W, kernel: jax.Array | jax.ShapeDtypeStruct) -> W:
    """``w`` with ``a (*C, *I, r)``, ``b (*C, r, *O)`` and a DoRA ``m (*C, *O)`` each given the
    sharding of the kernel axes it is laid out on (`place`): the carried axes (layer and expert
    axes) keep the kernel's mesh axes, and so do the input and output axes; the rank axis is
    not split. ``w`` unchanged when the kernel has no `NamedSharding`. The axes are ``w``'s
    (the kernel's scan layout), mapped to the kernel's own by ``w.stored_order``."""
    c = tuple(w.carried_axes)
    own = lambda axes: tuple(w.stored_order.index(d) for d in axes)
    return w.replace(
        a=place(w.a, kernel, own((*c, *w.in_axes)), -1),
        b=place(w.b, kernel, own((*c, *w.out_axes)), len(c)),
        m=None if w.m is None else place(w.m, kernel, own((*c, *w.out_axes))),
    )
