"""Factor shardings from a kernel's `NamedSharding`: one `place` for every factor and magnitude.

An adapter's arrays are laid out on axes of its kernel (the carried axes, then the input or
the output axes) plus, for ``a`` and ``b``, the rank axis. Giving each such array the mesh axes
of the kernel axes it is laid out on keeps the low-rank products local where the kernel's own
product is, and the rank axis (small) is never split.
"""

from __future__ import annotations

import jax


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
