"""The quantized storage formats of a frozen base: int8 per channel, NF4 block-wise, and the
`QuantizedKernel` node that holds one kernel's codes and scales.

This module works on one kernel: `quantize_kernel` / `dequantize_kernel`, the traceable
encoder `quantize_f32` they share with LoftQ and the layer-wise requantization, and the decoder
(`decode`: `int8_values`, `nf4_values`) they share with the factored engine, which dequantizes
a kernel at its use (`flax_lora._factored._quant_base`). The checks of the arguments are in
`flax_lora._quant._checks`; the tree functions (`lora.quantize`, `lora.dequantize`,
`lora.requantize`) in `flax_lora._quant._tree`.

Formats:

- ``"int8"``: symmetric, per output channel, as bitsandbytes' ``int8_vectorwise_quant``. The
  channel is the **last axis** of the kernel (Flax's output features for Dense, DenseGeneral's
  last output axis, a Conv's output channels, an embedding's feature axis): ``absmax`` over all
  other axes, codes ``round(w * 127 / absmax)`` in int8, dequantised as ``codes * absmax / 127``.
  Error per value at most ``absmax / 127 / 2``.
- ``"nf4"``: as bitsandbytes' ``quantize_4bit(quant_type="nf4")``: the kernel is flattened (C
  order), cut into blocks of ``block_size`` values, each block scaled by its absmax into [-1, 1]
  and rounded to the nearest of the 16 NF4 levels; two 4-bit codes per byte, the first value in
  the high nibble. A last, partial block is padded with zeros (its absmax is that of its real
  values, as bitsandbytes'); the padding is dropped again on dequantisation. Error per value at
  most half the widest gap between adjacent levels (0.1519) times the block's absmax.
- A layered kernel (``nn.scan`` / ``nnx.scan``; ``layer_axes`` leading layer axes) is
  quantized layer by layer: each layer is stored exactly as the single-layer quantization of that
  layer's kernel, its leaves stacked on the layer axes (int8 absmax ``(*L, out)``; nf4 blocks,
  padding and double-quantization groups per layer), so no scale is shared across layers and
  the factored `lora.wrap` dequantizes one layer at a time inside the scan.
- ``double_quant=True`` (nf4 only; QLoRA's double quantisation, bitsandbytes'
  ``compress_statistics=True``): the float32 block absmaxes are made zero-mean (``offset`` = their
  mean) and quantised again, block-wise over 256 of them, to 8-bit codes of bitsandbytes'
  signed dynamic map (``create_dynamic_map()``) with one float32 absmax per 256; dequantised as
  ``dynamic[code] * absmax2 + offset``. About 0.127 instead of 0.5 bits per weight for the scales.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._quant._checks import check_format, finite_error, non_finite
from flax_lora._typing import PyTree, QuantFormat

DOUBLE_QUANT_BLOCK = 256  # QLoRA / bitsandbytes: the block absmaxes are quantised 256 at a time

#: The 16 NF4 levels, exactly as bitsandbytes' ``get_4bit_type("nf4")`` (the QLoRA paper's
#: NormalFloat: quantiles of N(0, 1) from ``create_normal_map(offset=0.9677083)``, normalised).
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``.

    For exponent ``e`` in 0..6, the midpoints of ``2**e + 1`` points evenly spaced in [0.1, 1],
    times ``10**(e - 6)``, with both signs; then 0 and 1: 256 sorted float32 values in [-1, 1].
    """
    data: list[float] = []
    for e in range(7):
        bounds = np.linspace(0.1, 1.0, 2**e + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        data += list(np.float32(10.0 ** (e - 6)) * means)
        data += list(-np.float32(10.0 ** (e - 6)) * means)
    data += [0.0, 1.0]
    out = np.sort(np.asarray(data, dtype=np.float32))
    assert out.shape == (256,)
    return out


DYNAMIC_MAP = _dynamic_map()


def _midpoints(levels: np.ndarray) -> np.ndarray:
    return ((levels[:-1].astype(np.float64) + levels[1:]) / 2).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the pytree node
# ---------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A kernel stored quantized: integer codes and scales (the pytree leaves) and static metadata.

    Use `dequantize_kernel` (or `dequantize` on a whole tree) to get the kernel back.

    Examples:
      >>> qparams = lora.quantize({"dense": {"kernel": jnp.ones((32, 64))}}, dtype="nf4")
      >>> q = qparams["dense"]["kernel"]
      >>> q
      QuantizedKernel(nf4, shape=(32, 64), dtype=float32, block_size=64)
      >>> q.shape, q.nbytes  # the kernel's shape; the bytes it stores (8192 in float32)
      ((32, 64), 1152)
      >>> lora.dequantize(qparams)["dense"]["kernel"].shape  # float again
      (32, 64)

    Attributes:
      codes: ``"int8"``: int8 codes of the kernel's shape. ``"nf4"``: uint8 of shape
        ``(ceil(n / block_size) * block_size / 2,)``, two 4-bit level indices per byte (the first
        value in the high nibble), ``n`` the kernel's size.
      absmax: ``"int8"``: float32 absmax per channel (the last axis). ``"nf4"``: float32 absmax
        per block, or with double quantisation its uint8 dynamic-map codes.
      absmax_scale: double quantisation only: float32 absmax of each group of 256 centred block
        absmaxes; else ``None``.
      absmax_offset: double quantisation only: the float32 mean of the block absmaxes (a
        scalar); else ``None``.
      shape: the kernel's shape.
      dtype: the kernel's dtype (what `dequantize_kernel` returns).
      format: ``"int8"`` or ``"nf4"``.
      block_size: values per absmax block (``"nf4"``; 0 for ``"int8"``).
      layer_axes: leading layer axes of a layered kernel (``nn.scan``; 0: none). Each leaf then
        has these axes first and holds, per layer, that layer's own quantization (int8
        ``absmax`` ``(*L, out)``; nf4 ``codes`` ``(*L, bytes per layer)``, ``absmax``
        ``(*L, blocks per layer)``, double quantization's ``absmax_scale`` ``(*L, groups)``
        and ``absmax_offset`` ``(*L,)``).
    """

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None
    absmax_offset: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    format: QuantFormat = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    layer_axes: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def double_quant(self) -> bool:
        """Whether the block absmaxes are themselves quantized (QLoRA's double quantization)."""
        return self.absmax_offset is not None

    @property
    def ndim(self) -> int:
        """The number of axes of the kernel it stands for."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The number of elements of the kernel it stands for."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes and scales)."""
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))

    def __repr__(self) -> str:
        extra = f", block_size={self.block_size}" if self.format == "nf4" else ""
        dq = ", double_quant" if self.double_quant else ""
        lay = f", layer_axes={self.layer_axes}" if self.layer_axes else ""
        return (
            f"QuantizedKernel({self.format}, shape={self.shape}, dtype={jnp.dtype(self.dtype)}"
            f"{extra}{dq}{lay})"
        )

    def layer(self) -> QuantizedKernel:
        """The same leaves, with the static metadata of one layer (``layer_axes`` one less).

        Slicing every leaf on its first axis (as `jax.lax.scan` does with its ``xs``) then gives
        one layer's `QuantizedKernel`, exactly the single-layer quantization of that layer.

        Returns:
          A `QuantizedKernel` of the same leaves.

        Raises:
          ValueError: the kernel has no layer axis.
        """
        if not self.layer_axes:
            raise ValueError(f"{self!r} has no layer axis.")
        return dataclasses.replace(self, shape=self.shape[1:], layer_axes=self.layer_axes - 1)


def is_quantized(x: object) -> TypeGuard[QuantizedKernel]:
    """Whether ``x`` is a `QuantizedKernel` (the ``is_leaf`` of every tree walk over a quantized
    base)."""
    return isinstance(x, QuantizedKernel)


def has_quantized(tree: PyTree) -> bool:
    """Whether ``tree`` holds a `QuantizedKernel`."""
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def as_shapes(params: PyTree) -> PyTree:
    """``params`` with each `QuantizedKernel` replaced by the `jax.ShapeDtypeStruct` of the
    kernel it stands for (for what needs shapes only: a probe's trace, the random inits)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


def split_layers(q: QuantizedKernel) -> tuple[jax.tree_util.PyTreeDef, list[jax.Array]]:
    """The leaves of a kernel quantized per layer, its layer axes flattened into one leading
    axis, and the tree structure of one layer's (single-layer) `QuantizedKernel`."""
    n = q.layer_axes
    leaves, treedef = jax.tree.flatten(dataclasses.replace(q, shape=q.shape[n:], layer_axes=0))
    return treedef, [x.reshape(-1, *x.shape[n:]) for x in leaves]


def join_layers(flat: QuantizedKernel, shape: tuple[int, ...]) -> QuantizedKernel:
    """The inverse of `split_layers`: ``flat``, one layer's `QuantizedKernel` whose leaves have
    one leading axis over the flattened layers, as the kernel of ``shape`` quantized per layer
    (its layer axes: those of ``shape`` before the layer's own)."""
    n = len(shape) - len(flat.shape)
    lead = tuple(int(d) for d in shape[:n])
    out = jax.tree.map(lambda x: x.reshape(*lead, *x.shape[1:]), flat)
    return dataclasses.replace(out, shape=tuple(shape), layer_axes=n)


# ---------------------------------------------------------------------------------------------
# one kernel
# ---------------------------------------------------------------------------------------------
def quantize_kernel(
    w: jax.Array,
    dtype: QuantFormat = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    layer_axes: int = 0,
) -> QuantizedKernel:
    """Quantizes one floating array (see `lora.quantize` for the formats).

    Examples:
      >>> q = lora.quantize_kernel(jnp.ones((64, 32)), "nf4")
      >>> lora.dequantize_kernel(q).shape
      (64, 32)

    Args:
      w: a floating array of 2 or more dimensions (any floating array works).
      dtype: ``"int8"`` or ``"nf4"``.
      block_size: values per absmax block for ``"nf4"`` (a positive even number).
      double_quant: also quantize the NF4 block absmaxes (QLoRA's double quantization).
      layer_axes: leading layer axes of a layered kernel (``nn.scan``): each layer is then
        quantized on its own, exactly as ``quantize_kernel(w[i])``, and the leaves are stacked.

    Returns:
      A `QuantizedKernel` that remembers ``w``'s shape and dtype.

    Raises:
      ValueError: an unknown ``dtype``, a bad ``block_size``, ``double_quant`` with int8,
        ``layer_axes`` that leave fewer than one axis per layer, or ``w`` holding a NaN or an
        inf (the message says how many and where). Under a trace (inside ``jax.jit``) the
        values are unknown and not checked: a non-finite entry then makes its int8 channel,
        its nf4 block (with ``double_quant``, the whole kernel) dequantize to NaN.
      TypeError: ``w`` is not floating.
    """
    check_format(dtype, block_size, double_quant)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"lora.quantize_kernel: expected a floating array; got {w.dtype}.")
    if isinstance(layer_axes, bool) or not 0 <= int(layer_axes) < w.ndim:
        raise ValueError(
            f"lora.quantize_kernel: layer_axes must be in [0, {w.ndim}) for shape "
            f"{tuple(w.shape)}; got {layer_axes!r}."
        )
    found = non_finite(w)
    if found:
        name = f"w of shape {tuple(w.shape)}"
        raise finite_error("lora.quantize_kernel", {name: found}, dtype, bool(double_quant))
    return quantize_jit(
        w, dtype, int(block_size), bool(double_quant), jnp.dtype(w.dtype), int(layer_axes)
    )


def quantize_f32(
    w: jax.Array,
    fmt: QuantFormat,
    block_size: int,
    double_quant: bool,
    orig_dtype: np.dtype,
    layer_axes: int = 0,
) -> QuantizedKernel:
    """``w`` (float32) -> codes; ``orig_dtype`` is what dequantisation returns. With
    ``layer_axes``, each layer (an entry of the leading axes) is quantized on its own."""
    if layer_axes:
        one = lambda x: quantize_f32(x, fmt, block_size, double_quant, orig_dtype)
        return join_layers(jax.vmap(one)(w.reshape(-1, *w.shape[layer_axes:])), tuple(w.shape))
    shape = tuple(int(d) for d in w.shape)
    dtype = jnp.dtype(orig_dtype)
    if fmt == "int8":
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
        inv = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
        codes = jnp.clip(jnp.round(w * inv), -127, 127).astype(jnp.int8)
        return QuantizedKernel(codes, absmax, None, None, shape, dtype, fmt, block_size=0)
    chunks = blocks(w.reshape(-1), block_size)
    absmax = jnp.max(jnp.abs(chunks), axis=1)
    idx = _nearest(chunks * _safe_inv(absmax)[:, None], NF4_LEVELS).reshape(-1)
    packed = (idx[0::2] << 4) | idx[1::2]
    scale, offset = None, None
    if double_quant:
        offset = jnp.mean(absmax)
        centred = blocks(absmax - offset, DOUBLE_QUANT_BLOCK)
        scale = jnp.max(jnp.abs(centred), axis=1)
        dq = _nearest(centred * _safe_inv(scale)[:, None], DYNAMIC_MAP)
        absmax = dq.reshape(-1)[: absmax.shape[0]]
    return QuantizedKernel(packed, absmax, scale, offset, shape, dtype, fmt, block_size=block_size)


#: one compiled program per kernel shape and format (eager calls would dispatch op by op)
quantize_jit = jax.jit(
    lambda w, *static: quantize_f32(w.astype(jnp.float32), *static), static_argnums=(1, 2, 3, 4, 5)
)


def blocks(flat: jax.Array, block: int) -> jax.Array:
    """``flat`` zero-padded to whole blocks, shape ``(n_blocks, block)``."""
    pad = (-flat.shape[0]) % block
    return jnp.pad(flat, (0, pad)).reshape(-1, block)


def _safe_inv(absmax: jax.Array) -> jax.Array:
    return jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)


def _nearest(x: jax.Array, levels: np.ndarray) -> jax.Array:
    """Index (uint8) of the nearest of the sorted ``levels`` for each value of ``x`` (clipped to
    [-1, 1]); a tie goes to the lower level, as an argmin would."""
    x = jnp.clip(x, -1.0, 1.0)
    return jnp.searchsorted(jnp.asarray(_midpoints(levels)), x, side="left").astype(jnp.uint8)


def dequantize_kernel(q: QuantizedKernel) -> jax.Array:
    """The kernel a `QuantizedKernel` stands for, in its original shape and dtype (jit-able).

    Examples:
      >>> w0 = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
      >>> w = lora.dequantize_kernel(lora.quantize_kernel(w0, "int8"))
      >>> w.shape, w.dtype
      ((8, 8), dtype('float32'))
      >>> float(jnp.abs(w - w0).max()) < 0.01  # int8: within half a step of absmax / 127
      True

    Args:
      q: a `QuantizedKernel`.

    Returns:
      The dequantized array (computed in float32, cast once to ``q.dtype``).

    Raises:
      TypeError: ``q`` is not a `QuantizedKernel`.
    """
    if not is_quantized(q):
        raise TypeError(f"dequantize_kernel expects a QuantizedKernel; got {type(q).__name__}.")
    if q.layer_axes:  # layer by layer, each as a single-layer kernel
        treedef, flat = split_layers(q)
        w = jax.vmap(lambda *xs: decode(jax.tree.unflatten(treedef, xs)))(*flat)
        return w.reshape(q.shape)
    return decode(q)


def decode(q: QuantizedKernel, tie: jax.Array | None = None) -> jax.Array:
    """The kernel of a single-layer `QuantizedKernel` (``layer_axes == 0``), computed in float32
    and cast once to its dtype. ``tie``: a traced float32 zero added to the int8 scales or the
    NF4 levels, which ties the decoding to the data it was computed from (the factored engine's
    `flax_lora._factored._quant_base.QuantBase.value`)."""
    if q.format == "int8":
        return int8_values(q.codes, q.absmax, tie).astype(q.dtype)
    absmax = block_absmax(q) if q.double_quant else q.absmax
    vals = nf4_values(q.codes, absmax, q.block_size, tie)
    return vals[: q.size].reshape(q.shape).astype(q.dtype)


def int8_values(codes: jax.Array, absmax: jax.Array, tie: jax.Array | None = None) -> jax.Array:
    """int8 ``codes`` in float32: ``codes * absmax / 127``, ``absmax`` per channel (the last
    axis), ``tie`` (a zero, see `decode`) added to it."""
    scale = absmax.astype(jnp.float32)
    if tie is not None:
        scale = scale + tie
    return codes.astype(jnp.float32) * (scale / 127.0)


def nf4_values(
    codes: jax.Array, absmax: jax.Array, block_size: int, tie: jax.Array | None = None
) -> jax.Array:
    """Packed NF4 ``codes`` ``(..., bytes)`` in float32, each block of ``block_size`` values
    times its entry of ``absmax`` ``(..., blocks)``: shape ``(..., blocks * block_size)``, a last
    block's padding included. ``tie`` (a zero, see `decode`) is added to the levels."""
    levels = jnp.asarray(NF4_LEVELS) if tie is None else jnp.asarray(NF4_LEVELS) + tie
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).astype(jnp.int32)
    vals = levels[idx].reshape(*absmax.shape, block_size) * absmax[..., None]
    return vals.reshape(*absmax.shape[:-1], -1)


def block_absmax(q: QuantizedKernel) -> jax.Array:
    """The float32 block absmaxes of a double-quantized NF4 kernel (one layer's), decoded from
    their dynamic-map codes."""
    scale, offset = q.absmax_scale, q.absmax_offset
    if scale is None or offset is None:
        raise ValueError("block_absmax: the kernel is not double-quantized (no absmax scale).")
    n_blocks = q.absmax.shape[0]
    vals = blocks(jnp.asarray(DYNAMIC_MAP)[q.absmax.astype(jnp.int32)], DOUBLE_QUANT_BLOCK)
    return (vals * scale[:, None]).reshape(-1)[:n_blocks] + offset
