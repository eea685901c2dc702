"""Kernels stacked by ``nn.scan`` / ``nnx.scan``: a leading layer axis, one adapter per layer.

A stacked kernel ``(L, *rest)`` (found by the probe: the scan slices it on axis 0) gets factors
``a`` ``(L, *I, r)`` and ``b`` ``(L, r, *O)``, made layer by layer with the ordinary init and
stacked. ``LoraConfig(layers=...)`` picks entries of the layer axis: the adapter still covers
the whole stack (so the scan can slice it like the kernel), with zero factors on the other
layers, and `LoraWeights.layers` records the pick so that the update is masked per layer and
those factors also get zero gradients.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from flax_lora._adapters import LoraWeights
from flax_lora._config import LoraConfig
from flax_lora._paths import describe

_VALUE_FREE_INITS = ("lora", "gaussian", "random")


def stacked_kernels(
    selected: dict[str, tuple[str, tuple[int, ...]]],
    uses: dict[str, Any] | None,
    leaves: dict[str, Any],
    config: LoraConfig,
) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """Path -> (number of leading layer axes, picked layers or ``None``) of the stacked kernels
    among ``selected``; drops from ``selected`` the stacked kernels with no picked layer.

    Raises:
      ValueError: a scan slices a kernel on an axis that is not leading, a stacked kernel has
        no output axis, or no kernel is left once ``layers`` is applied.
    """
    if uses is None:
        return {}
    out: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for path in list(selected):
        use = uses.get(path)
        lax_ = tuple(getattr(use, "layer_axes", ()) or ())
        if not lax_:
            continue
        shape = tuple(leaves[path].shape)
        n = len(lax_)
        if lax_ != tuple(range(n)):
            raise ValueError(
                f"Kernel {path!r} of shape {shape} is sliced by a scan on axes {lax_}; stacked "
                "layers must be its leading axes."
            )
        in_axes = selected[path][1]
        if any(i < n for i in in_axes) or len(in_axes) + n >= len(shape):
            raise ValueError(
                f"Kernel {path!r} of shape {shape} with {n} layer axis(es): the probe contracts "
                f"axes {in_axes}, which leaves no input or no output axis to factor."
            )
        layers = None
        if config.layers is not None:
            layers = tuple(sorted({i for i in config.layers if 0 <= i < shape[0]}))
            if not layers:
                del selected[path]
                continue
        out[path] = (n, layers)
    if not selected:
        raise ValueError(
            f"LoraConfig(layers={config.layers!r}) picks no layer of the stacked kernels "
            f"{describe(list(uses))}."
        )
    return out


def init_stacked(
    key: jax.Array,
    path: str,
    kernel: Any,
    kind: str,
    in_axes: tuple[int, ...],
    config: LoraConfig,
    n_layer_axes: int,
    layers: tuple[int, ...] | None,
) -> tuple[LoraWeights, jax.Array | None]:
    """The adapter of a stacked kernel (and, for PiSSA/OLoRA, its residual base kernel; for
    LoftQ, its quantized base)."""
    from flax_lora._init import _init_one

    if config.init == "loftq":
        return _loftq_stacked(path, kernel, kind, in_axes, config, n_layer_axes, layers)
    size = kernel.shape[0]
    picked = set(range(size)) if layers is None else set(layers)
    needs_values = config.init not in _VALUE_FREE_INITS
    inner_axes = tuple(i - 1 for i in in_axes)
    keys = jax.random.split(key, size)
    pieces: list[LoraWeights] = []
    residuals: list[Any] = []
    for i in range(size):
        if needs_values:
            piece = kernel[i]
        else:  # random inits need the shape only: no slice of a (sharded) kernel is made
            piece = jax.ShapeDtypeStruct(tuple(kernel.shape[1:]), kernel.dtype)
        if n_layer_axes > 1:
            w, res = init_stacked(
                keys[i], path, piece, kind, inner_axes, config, n_layer_axes - 1, None
            )
        else:
            w, res = _init_one(keys[i], path, piece, kind, inner_axes, config)
        if i not in picked:  # a layer not picked: zero factors, base unchanged
            w = w.replace(a=jnp.zeros_like(w.a), b=jnp.zeros_like(w.b))
            res = piece if needs_values else None
        pieces.append(w)
        residuals.append(res)
    lead = tuple(range(n_layer_axes))
    out_axes = tuple(d for d in range(n_layer_axes, kernel.ndim) if d not in in_axes)
    a = place(jnp.stack([w.a for w in pieces]), kernel, (*lead, *in_axes), -1)
    b = place(jnp.stack([w.b for w in pieces]), kernel, (*lead, *out_axes), n_layer_axes)
    w = pieces[0].replace(
        a=a,
        b=b,
        in_axes=tuple(in_axes),
        kernel_shape=tuple(kernel.shape),
        layer_axes=n_layer_axes,
        layers=layers,
    )
    residual = jnp.stack(residuals).astype(kernel.dtype) if needs_values else None
    return w, residual


def _loftq_stacked(
    path: str,
    kernel: Any,
    kind: str,
    in_axes: tuple[int, ...],
    config: LoraConfig,
    n: int,
    layers: tuple[int, ...] | None,
) -> tuple[LoraWeights, Any]:
    """LoftQ of a stacked kernel: the adapter and the quantized stacked base (see
    `flax_lora._quant.loftq_factors`)."""
    from flax_lora._quant import loftq_factors

    shape = tuple(kernel.shape)
    lead = tuple(range(n))
    out_axes = tuple(d for d in range(n, len(shape)) if d not in in_axes)
    in_shape = tuple(shape[i] for i in in_axes)
    out_shape = tuple(shape[i] for i in out_axes)
    r, scale = config.rank_for(path), config.scale_for(path)
    if r > min(math.prod(in_shape), math.prod(out_shape)):
        raise ValueError(
            f"init='loftq' needs rank <= min(fan_in, fan_out) = "
            f"{min(math.prod(in_shape), math.prod(out_shape))} for {path!r} (stacked kernel "
            f"{shape}, {n} layer axis(es), input axes {tuple(in_axes)}); got rank {r}."
        )
    a, b, q = loftq_factors(
        kernel,
        in_axes,
        r,
        scale,
        config.loftq_iter,
        config.loftq_dtype,
        layer_axes=n,
        layers=layers,
    )
    a = a.astype(config.dtype).reshape((*shape[:n], *in_shape, r))
    b = b.astype(config.dtype).reshape((*shape[:n], r, *out_shape))
    w = LoraWeights(
        a=place(a, kernel, (*lead, *in_axes), -1),
        b=place(b, kernel, (*lead, *out_axes), n),
        scale=scale,
        in_axes=tuple(in_axes),
        kernel_shape=shape,
        kind=kind,
        dropout=float(config.dropout),
        layer_axes=n,
        layers=layers,
    )
    return w, q


def place(x: jax.Array, kernel: Any, axes: tuple[int, ...], rank_pos: int) -> jax.Array:
    """Gives a factor the sharding of its kernel's ``axes``, the rank axis (at ``rank_pos``)
    unsharded; unchanged when the kernel has no `NamedSharding`."""
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or isinstance(kernel, jax.core.Tracer):
        return x
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    picked = [spec[i] for i in axes]
    picked.insert(rank_pos % (len(picked) + 1), None)
    return jax.device_put(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*picked))
    )
