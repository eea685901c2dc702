"""LoftQ: the adapter factors and the quantized base of one kernel, fitted together so that
``deQ(Q) + scale * a @ b`` approximates the float kernel (`lora.init(init="loftq")`)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._quant._checks import check_format
from flax_lora._quant._formats import QuantizedKernel, dequantize_kernel, quantize_f32
from flax_lora._typing import QuantFormat


def loftq_factors(
    kernel: jax.Array,
    in_axes: tuple[int, ...],
    rank: int,
    scale: float,
    iters: int = 1,
    fmt: QuantFormat = "nf4",
    block_size: int = 64,
    layer_axes: int = 0,
    picked: np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array, QuantizedKernel]:
    """LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659), as PEFT's ``loftq_init``.

    Alternates ``iters`` times: ``Q = quantize(W - scale * a @ b)`` (``a @ b = 0`` at first), then
    ``a, b`` from the rank-``rank`` SVD of ``W - deQ(Q)``: ``a = U sqrt(S / scale)``,
    ``b = sqrt(S / scale) Vh``, so that ``deQ(Q) + scale * a @ b`` approximates ``W``. (PEFT
    leaves out ``1 / scale``, which is exact only for ``alpha == r``.) ``W`` is the kernel as an
    ``(prod(I), prod(O))`` matrix; ``Q`` is taken of the kernel in its own layout.

    A layered kernel (``nn.scan`` / ``nnx.scan``; ``layer_axes`` leading layer axes, ``in_axes``
    counted in the layered kernel) gets one SVD per layer, and ``Q`` is the quantization of the
    whole layered residual, exactly `lora.quantize`'s format for the layered kernel (so
    `lora.wrap` / `lora.merge` take it as any quantized base). Per layer this is the unstacked
    LoftQ of that layer's kernel whenever the quantizer works layer by layer: NF4 with a
    per-layer size that is a multiple of ``block_size``. Otherwise the layered format ties
    layers together, and so does ``Q``: an NF4 block that straddles two layers has one absmax,
    and int8 has one absmax per channel (the last axis) over all layers. ``picked``: a boolean
    mask of the layer axes' shape, the layers adapted (``None``: all); the others keep zero
    factors, so their part of ``Q`` is the quantization of their float base (plain QLoRA).

    Returns:
      ``a`` ``(*L, n_in, r)`` and ``b`` ``(*L, r, n_out)`` in float32 (``L`` the layer axes, none
      for a single-layer kernel), and the `QuantizedKernel` of the base.
    """
    check_format(fmt, block_size, False)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration; got loftq_iter={iters!r}.")
    shape = tuple(int(d) for d in kernel.shape)
    n = int(layer_axes)
    in_axes = tuple(int(i) for i in in_axes)
    out_axes = tuple(i for i in range(n, len(shape)) if i not in in_axes)
    mask = np.ones(shape[:n], np.float32) if picked is None else picked.astype(np.float32)
    static = (n, in_axes, out_axes, int(rank), float(scale), fmt, int(block_size))
    w = _to_layered_matrices(kernel, *static[:3])
    res = w
    for _ in range(iters):
        a, b, q, res = _loftq_layered_step(w, res, mask, jnp.dtype(kernel.dtype), shape, *static)
    return a, b, q


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _to_layered_matrices(
    kernel: jax.Array, n: int, in_axes: tuple[int, ...], out_axes: tuple[int, ...]
) -> jax.Array:
    n_in = math.prod(kernel.shape[i] for i in in_axes)
    order = tuple(range(n)) + in_axes + out_axes
    return kernel.astype(jnp.float32).transpose(order).reshape(*kernel.shape[:n], n_in, -1)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 12)))
def _loftq_layered_step(
    w: jax.Array,
    res: jax.Array,
    mask: jax.Array,
    dtype: np.dtype,
    shape: tuple[int, ...],
    n: int,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    r: int,
    scale: float,
    fmt: QuantFormat,
    block_size: int,
) -> tuple[jax.Array, jax.Array, QuantizedKernel, jax.Array]:
    """One LoftQ alternation on layered matrices ``(*L, n_in, n_out)`` (float32; ``L`` may be
    empty): ``Q = quantize(res)`` of the whole layered kernel, ``a, b`` from the SVD of each
    layer's ``W - deQ(Q)`` (zero where ``mask`` is 0), the next ``res = W - scale * a @ b``."""
    order = tuple(range(n)) + in_axes + out_axes
    inverse = tuple(order.index(i) for i in range(len(shape)))
    kernel_res = res.reshape(tuple(shape[i] for i in order)).transpose(inverse)
    q = quantize_f32(kernel_res, fmt, block_size, False, dtype)
    deq = dequantize_kernel(q).astype(jnp.float32).transpose(order).reshape(w.shape)
    u, s, vt = jnp.linalg.svd(w - deq, full_matrices=False)
    root = jnp.sqrt(s[..., :r] / scale) * mask[..., None]
    a, b = u[..., :r] * root[..., None, :], root[..., :, None] * vt[..., :r, :]
    return a, b, q, w - scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
