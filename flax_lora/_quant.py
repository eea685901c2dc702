"""QLoRA: a frozen base stored quantized (int8 per channel, NF4 block-wise), and LoftQ.

`quantize` replaces the selected kernels of a params tree with `QuantizedKernel` nodes that hold
the integer codes and their scales; `dequantize` turns them back into arrays of the original
dtype. It is pure and jit-able, so a training step calls it on the quantized tree *inside* the
jitted function: only the codes live in memory between steps, and each kernel is expanded
transiently for its use (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
https://arxiv.org/abs/2305.14314).

Formats:

- ``"int8"``: symmetric, per output channel, as bitsandbytes' ``int8_vectorwise_quant``. The
  channel is the **last axis** of the kernel (Flax's output features for Dense, DenseGeneral's
  last output axis, a Conv's output channels, an Embed table's feature axis): ``absmax`` over all
  other axes, codes ``round(w * 127 / absmax)`` in int8, dequantised as ``codes * absmax / 127``.
  Error per value at most ``absmax / 127 / 2``.
- ``"nf4"``: as bitsandbytes' ``quantize_4bit(quant_type="nf4")``: the kernel is flattened (C
  order), cut into blocks of ``block_size`` values, each block scaled by its absmax into [-1, 1]
  and rounded to the nearest of the 16 NF4 levels; two 4-bit codes per byte, the first value in
  the high nibble. A last, partial block is padded with zeros (its absmax is that of its real
  values, as bitsandbytes'); the padding is dropped again on dequantisation. Error per value at
  most half the widest gap between adjacent levels (0.1519) times the block's absmax.
- A kernel stacked by ``nn.scan`` / ``nnx.scan`` (``layer_axes`` leading layer axes, found by
  `quantize`'s ``probe``) is quantized layer by layer: each layer is stored exactly as the
  unstacked quantization of that layer's kernel, its leaves stacked on the layer axes (int8
  absmax ``(*L, out)``; nf4 blocks, padding and double-quantization groups per layer), so no
  scale is shared across layers and the factored `lora.wrap` dequantizes one layer at a time
  inside the scan.
- ``double_quant=True`` (nf4 only; QLoRA's double quantisation, bitsandbytes'
  ``compress_statistics=True``): the float32 block absmaxes are made zero-mean (``offset`` = their
  mean) and quantised again, block-wise over 256 of them, to 8-bit codes of bitsandbytes'
  signed dynamic map (``create_dynamic_map()``) with one float32 absmax per 256; dequantised as
  ``dynamic[code] * absmax2 + offset``. About 0.127 instead of 0.5 bits per weight for the scales.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._config import regex_tuple
from flax_lora._paths import describe, flatten, path_str

PyTree = Any
FORMATS = ("int8", "nf4")
DOUBLE_QUANT_BLOCK = 256  # QLoRA / bitsandbytes: the block absmaxes are quantised 256 at a time
_KERNEL_NAMES = ("kernel", "embedding")

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

    Example:
      >>> qparams = lora.quantize(params, dtype="nf4")
      >>> q = qparams["params"]["Dense_0"]["kernel"]  # QuantizedKernel(nf4, shape=(64, 32), ...)
      >>> q.shape, q.nbytes  # the kernel's shape; the bytes it stores
      >>> w = lora.dequantize(qparams)["params"]["Dense_0"]["kernel"]  # float again

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
      layer_axes: leading layer axes of a kernel stacked by a scan (0: none). Each leaf then
        has these axes first and holds, per layer, that layer's unstacked quantization (int8
        ``absmax`` ``(*L, out)``; nf4 ``codes`` ``(*L, bytes per layer)``, ``absmax``
        ``(*L, blocks per layer)``, double quantization's ``absmax_scale`` ``(*L, groups)``
        and ``absmax_offset`` ``(*L,)``).
    """

    codes: Any
    absmax: Any
    absmax_scale: Any
    absmax_offset: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    format: str = dataclasses.field(metadata=dict(static=True))
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
        one layer's `QuantizedKernel`, exactly the unstacked quantization of that layer.
        """
        if not self.layer_axes:
            raise ValueError(f"{self!r} has no layer axis.")
        return dataclasses.replace(self, shape=self.shape[1:], layer_axes=self.layer_axes - 1)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


# ---------------------------------------------------------------------------------------------
# one kernel
# ---------------------------------------------------------------------------------------------
def _check_format(dtype: Any, block_size: Any, double_quant: Any) -> None:
    if not isinstance(dtype, str) or dtype not in FORMATS:
        raise ValueError(f"lora.quantize: dtype must be one of {FORMATS}; got {dtype!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise TypeError(f"lora.quantize: block_size must be an int; got {block_size!r}.")
    if block_size < 2 or block_size % 2:
        raise ValueError(
            "lora.quantize: block_size must be a positive even number (two 4-bit codes per "
            f"byte); got {block_size}."
        )
    if double_quant and dtype != "nf4":
        raise ValueError(
            f"lora.quantize: double_quant applies to dtype='nf4' only; got dtype={dtype!r}."
        )


def quantize_kernel(
    w: jax.Array,
    dtype: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    layer_axes: int = 0,
) -> QuantizedKernel:
    """Quantizes one floating array (see `quantize` for the formats).

    Example:
      >>> q = lora.quantize_kernel(jnp.ones((64, 32)), "nf4")
      >>> lora.dequantize_kernel(q).shape
      (64, 32)

    Args:
      w: a floating array of 2 or more dimensions (any floating array works).
      dtype: ``"int8"`` or ``"nf4"``.
      block_size: values per absmax block for ``"nf4"`` (a positive even number).
      double_quant: also quantize the NF4 block absmaxes (QLoRA's double quantization).
      layer_axes: leading layer axes of a stacked kernel (``nn.scan``): each layer is then
        quantized on its own, exactly as ``quantize_kernel(w[i])``, and the leaves are stacked.

    Returns:
      A `QuantizedKernel` that remembers ``w``'s shape and dtype.

    Raises:
      ValueError: an unknown ``dtype``, a bad ``block_size``, ``double_quant`` with int8, or
        ``layer_axes`` that leave fewer than one axis per layer.
      TypeError: ``w`` is not floating.
    """
    _check_format(dtype, block_size, double_quant)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"lora.quantize_kernel: expected a floating array; got {w.dtype}.")
    if isinstance(layer_axes, bool) or not 0 <= int(layer_axes) < w.ndim:
        raise ValueError(
            f"lora.quantize_kernel: layer_axes must be in [0, {w.ndim}) for shape "
            f"{tuple(w.shape)}; got {layer_axes!r}."
        )
    return _quantize_jit(
        w, dtype, int(block_size), bool(double_quant), jnp.dtype(w.dtype), int(layer_axes)
    )


def _quantize(
    w: jax.Array,
    fmt: str,
    block_size: int,
    double_quant: bool,
    orig_dtype: Any,
    layer_axes: int = 0,
) -> QuantizedKernel:
    """``w`` (float32) -> codes; ``orig_dtype`` is what dequantisation returns. With
    ``layer_axes``, each layer (an entry of the leading axes) is quantized on its own."""
    if layer_axes:
        lead = tuple(int(d) for d in w.shape[:layer_axes])
        one = lambda x: _quantize(x, fmt, block_size, double_quant, orig_dtype)
        flat = jax.vmap(one)(w.reshape(-1, *w.shape[layer_axes:]))
        flat = jax.tree.map(lambda x: x.reshape(*lead, *x.shape[1:]), flat)
        return dataclasses.replace(flat, shape=tuple(w.shape), layer_axes=layer_axes)
    shape = tuple(int(d) for d in w.shape)
    meta = dict(shape=shape, dtype=jnp.dtype(orig_dtype), format=fmt)
    if fmt == "int8":
        absmax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
        inv = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
        codes = jnp.clip(jnp.round(w * inv), -127, 127).astype(jnp.int8)
        return QuantizedKernel(codes, absmax, None, None, block_size=0, **meta)
    blocks = _blocks(w.reshape(-1), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    idx = _nearest(blocks * _safe_inv(absmax)[:, None], NF4_LEVELS).reshape(-1)
    packed = (idx[0::2] << 4) | idx[1::2]
    scale, offset = None, None
    if double_quant:
        offset = jnp.mean(absmax)
        centred = _blocks(absmax - offset, DOUBLE_QUANT_BLOCK)
        scale = jnp.max(jnp.abs(centred), axis=1)
        dq = _nearest(centred * _safe_inv(scale)[:, None], DYNAMIC_MAP)
        absmax = dq.reshape(-1)[: absmax.shape[0]]
    return QuantizedKernel(packed, absmax, scale, offset, block_size=block_size, **meta)


#: one compiled program per kernel shape and format (eager calls would dispatch op by op)
_quantize_jit = jax.jit(
    lambda w, *static: _quantize(w.astype(jnp.float32), *static), static_argnums=(1, 2, 3, 4, 5)
)


def _blocks(flat: jax.Array, block: int) -> jax.Array:
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

    Example:
      >>> w = lora.dequantize_kernel(qparams["params"]["Dense_0"]["kernel"])

    Args:
      q: a `QuantizedKernel`.

    Returns:
      The dequantized array (computed in float32, cast once to ``q.dtype``).
    """
    if not is_quantized(q):
        raise TypeError(f"dequantize_kernel expects a QuantizedKernel; got {type(q).__name__}.")
    if q.layer_axes:  # layer by layer, each as an unstacked kernel
        n = q.layer_axes
        inner = dataclasses.replace(q, shape=q.shape[n:], layer_axes=0)
        leaves, treedef = jax.tree.flatten(inner)
        flat = [x.reshape(-1, *x.shape[n:]) for x in leaves]
        w = jax.vmap(lambda *xs: dequantize_kernel(jax.tree.unflatten(treedef, xs)))(*flat)
        return w.reshape(q.shape)
    if q.format == "int8":
        w = q.codes.astype(jnp.float32) * (q.absmax.astype(jnp.float32) / 127.0)
        return w.astype(q.dtype)
    absmax = q.absmax
    if q.double_quant:
        n_blocks = absmax.shape[0]
        vals = _blocks(jnp.asarray(DYNAMIC_MAP)[absmax.astype(jnp.int32)], DOUBLE_QUANT_BLOCK)
        absmax = (vals * q.absmax_scale[:, None]).reshape(-1)[:n_blocks] + q.absmax_offset
    codes = q.codes
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1).astype(jnp.int32)
    vals = jnp.asarray(NF4_LEVELS)[idx].reshape(-1, q.block_size) * absmax[:, None]
    return vals.reshape(-1)[: q.size].reshape(q.shape).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------------
def _select(leaves: dict[str, Any], patterns: tuple[str, ...] | None) -> list[str]:
    """The paths to quantize: the rule of `lora.init` without a probe."""
    candidates = [
        p
        for p, x in leaves.items()
        if not is_quantized(x)
        and getattr(x, "ndim", 0) >= 2
        and (patterns is not None or p.rsplit("/", 1)[-1] in _KERNEL_NAMES)
    ]
    if patterns is None:
        chosen = candidates
    else:
        chosen = [p for p in candidates if any(re.fullmatch(t, p) for t in patterns)]
        again = [p for p, x in leaves.items() if is_quantized(x) and p not in chosen]
        again = [p for p in again if any(re.fullmatch(t, p) for t in patterns)]
        if again:
            raise ValueError(f"lora.quantize: {describe(again)} are already quantized.")
    if not chosen:
        done = [p for p, x in leaves.items() if is_quantized(x)]
        raise ValueError(
            f"lora.quantize: targets={patterns!r} match no unquantized kernel (a floating leaf "
            f"of 2 or more dimensions{'' if patterns else ' named kernel or embedding'}). Paths "
            f"seen: {describe(candidates or [p for p in leaves if p not in done], limit=40)}"
            + (f"; already quantized: {describe(done)}." if done else ".")
        )
    for p in chosen:
        if not jnp.issubdtype(leaves[p].dtype, jnp.floating):
            raise TypeError(
                f"lora.quantize: kernel {p!r} has dtype {leaves[p].dtype}; only floating "
                "kernels are quantized."
            )
    return chosen


def quantize(
    params: PyTree,
    targets: str | Sequence[str] | None = None,
    dtype: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    probe: Callable[[PyTree], Any] | None = None,
) -> PyTree:
    """Stores the frozen kernels of ``params`` quantized (QLoRA's base), as `QuantizedKernel`\\s.

    ``"int8"``: symmetric per-channel absmax, the channel being the kernel's last axis (codes
    ``round(w * 127 / absmax)``; bitsandbytes' LLM.int8 weight format). ``"nf4"``: bitsandbytes'
    NF4: the flattened kernel in blocks of ``block_size`` values, each scaled by its absmax and
    rounded to the nearest of 16 NormalFloat levels, two codes per byte; a partial last block is
    zero-padded. ``double_quant`` (QLoRA) also stores the block absmaxes as 8-bit dynamic-map
    codes of their mean-subtracted values in blocks of 256 (bitsandbytes'
    ``compress_statistics``). Bytes per weight: f32 4, int8 ~1, nf4 ~0.56 (4.5 bits), nf4 with
    double quantisation ~0.52 (4.13 bits). Jit-able with ``targets``/``dtype``/``block_size``/
    ``double_quant`` static.

    A kernel stacked by ``nn.scan`` / ``nnx.scan`` (found by ``probe``, as `lora.init` finds
    them) is quantized layer by layer: int8 gets one absmax per layer and channel ``(L, out)``,
    nf4 blocks never straddle two layers, so every layer is stored exactly as the unstacked
    quantization of its kernel, and the factored `lora.wrap` dequantizes it inside the scan, one
    layer at a time. Without a probe a stacked kernel is quantized as one array (scales shared
    across layers).

    Example:
      >>> qparams = lora.quantize(params, dtype="nf4")
      >>> qparams = lora.quantize(params, dtype="int8", probe=lambda p: model.apply(p, x))
      >>> fn = jax.jit(lambda q, ad, x: lora.wrap(model.apply)(lora.dequantize(q), ad, x))

    Args:
      params: a Linen variables dict, an NNX state, or any pytree.
      targets: which leaves to quantize: a regex that must ``re.fullmatch`` the path, or a
        sequence of them (any matches); the leaves of 2 or more dimensions they match. ``None``:
        every leaf of 2 or more dimensions named ``kernel`` or ``embedding`` (Flax's names).
        Leaves already quantized are left as they are.
      dtype: the format, ``"nf4"`` (default) or ``"int8"``.
      block_size: NF4 values per absmax block (a positive even number; bitsandbytes' default 64).
        Unused by int8.
      double_quant: quantize the NF4 block absmaxes too (QLoRA's double quantization).
      probe: an optional function of the params alone (e.g. ``lambda p: model.apply(p, x)``),
        traced abstractly to find the kernels stacked by a scan and their layer axes.

    Returns:
      ``params`` with each selected kernel replaced by a `QuantizedKernel`; every other leaf is
      the same object.

    Raises:
      ValueError: unknown ``dtype``, bad ``block_size``, ``double_quant`` with int8, or
        ``targets`` that match no kernel (the message lists the paths seen).
      TypeError: a selected kernel is not floating.
    """
    _check_format(dtype, block_size, double_quant)
    leaves = flatten(params, is_leaf=is_quantized)
    chosen = set(_select(leaves, regex_tuple(targets, "lora.quantize: targets")))
    layers = _layer_axes(params, probe, chosen)

    def f(kp: Any, x: Any) -> Any:
        path = path_str(kp)
        if is_quantized(x) or path not in chosen:
            return x
        n = layers.get(path, 0)
        return _quantize_jit(x, dtype, int(block_size), bool(double_quant), jnp.dtype(x.dtype), n)

    return jax.tree_util.tree_map_with_path(f, params, is_leaf=is_quantized)


def _layer_axes(params: PyTree, probe: Any, chosen: set[str]) -> dict[str, int]:
    """Path -> number of leading layer axes of each chosen kernel a scan of ``probe`` slices."""
    if probe is None:
        return {}
    from flax_lora._probe import kernel_uses

    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )
    out = {}
    for path, use in kernel_uses(probe, shapes).items():
        axes = tuple(use.layer_axes)
        if path in chosen and axes and axes == tuple(range(len(axes))):
            out[path] = len(axes)
    return out


def dequantize(params: PyTree) -> PyTree:
    """Replaces every `QuantizedKernel` of ``params`` by its dequantized array (jit-able).

    Call it inside the jitted function, so that only the codes are kept between steps; a tree
    without quantized kernels is returned unchanged.

    Example:
      >>> @jax.jit
      ... def step(adapters, qparams, x):
      ...     return jax.grad(lambda ad: loss(lora.wrap(model.apply)(lora.dequantize(qparams),
      ...                                                          ad, x)))(adapters)

    Args:
      params: a params tree, possibly holding `QuantizedKernel` nodes.

    Returns:
      The same tree with each `QuantizedKernel` replaced by an array of its original shape and
      dtype.
    """
    if not any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized)):
        return params  # nothing to do: the very same tree
    return jax.tree.map(
        lambda x: dequantize_kernel(x) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def requantize(params: PyTree, like: PyTree) -> PyTree:
    """Quantizes the kernels of ``params`` where ``like`` holds a `QuantizedKernel`, in its format.

    For a merged model on a quantized base (``lora.merge(lora.dequantize(qparams), adapters)``)
    this stores the merged kernels quantized again. Rounding the merged kernel to the base's grid
    loses most of a small LoRA update: a ``UserWarning`` gives the relative error
    ``‖W - deQ(Q(W))‖ / ‖W‖`` it introduces (measured, largest over the kernels; not measured
    under a trace). Keep the dequantized merge when that matters.

    Example:
      >>> merged = lora.merge(lora.dequantize(qparams), adapters)
      >>> qmerged = lora.requantize(merged, like=qparams)  # warns with the measured error

    Args:
      params: a params tree with float kernels at the paths that are quantized in ``like``.
      like: a quantized params tree (from `quantize`, or `lora.init` with ``init="loftq"``).

    Returns:
      ``params`` with those kernels replaced by `QuantizedKernel`\\s of the same format, block size
      and double quantization as in ``like``.

    Raises:
      ValueError: a quantized path of ``like`` is not in ``params`` or has another shape.
      TypeError: such a leaf is not a floating array.
    """
    return _requantize(params, like, {})


def _requantize(params: PyTree, like: PyTree, done: dict[str, Any]) -> PyTree:
    """`requantize`; ``done``: path -> the relative error (or ``None`` under a trace) of the
    kernels of ``params`` already quantized again by the caller (`lora.merge`, per layer)."""
    table = {p: q for p, q in flatten(like, is_leaf=is_quantized).items() if is_quantized(q)}
    if not table:
        raise ValueError("lora.requantize: `like` holds no QuantizedKernel.")
    leaves = flatten(params, is_leaf=is_quantized)
    missing = [p for p in table if p not in leaves]
    if missing:
        raise ValueError(
            f"lora.requantize: {describe(missing)} are quantized in `like` but not in params. "
            f"Paths in params: {describe(list(leaves), limit=20)}."
        )
    errors: dict[str, Any] = {p: e for p, e in done.items() if e is not None}

    def f(kp: Any, x: Any) -> Any:
        path = path_str(kp)
        q = table.get(path)
        if q is None or is_quantized(x):
            return x
        if not jnp.issubdtype(getattr(x, "dtype", np.dtype(object)), jnp.floating):
            raise TypeError(f"lora.requantize: {path!r} is not a floating array ({type(x)}).")
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(
                f"lora.requantize: {path!r} has shape {tuple(x.shape)}, but `like` quantized a "
                f"kernel of shape {tuple(q.shape)} there."
            )
        w = x.astype(jnp.float32)
        out = _quantize_jit(
            x, q.format, q.block_size, q.double_quant, jnp.dtype(x.dtype), q.layer_axes
        )
        if not isinstance(w, jax.core.Tracer):
            back = dequantize_kernel(out).astype(jnp.float32)
            errors[path] = float(jnp.linalg.norm(w - back) / jnp.maximum(jnp.linalg.norm(w), 1e-30))
        return out

    out = jax.tree_util.tree_map_with_path(f, params, is_leaf=is_quantized)
    fmt = sorted({q.format for q in table.values()})
    if errors:
        worst = max(errors, key=errors.get)
        detail = (
            f"a relative error ||W - deQ(Q(W))|| / ||W|| of up to {errors[worst]:.3g} (at "
            f"{worst!r}; mean {np.mean(list(errors.values())):.3g} over {len(errors)} kernels)"
        )
    else:
        detail = "a rounding error (not measured under a trace)"
    warnings.warn(  # stacklevel: the caller of lora.requantize / lora.merge
        f"lora.requantize: rounding the merged kernels to {'/'.join(fmt)} introduces {detail}; "
        "a LoRA update smaller than the quantization step is mostly lost. Keep the dequantized "
        "merge (lora.merge(lora.dequantize(qparams), adapters)) to avoid it.",
        UserWarning,
        stacklevel=3,
    )
    return out


def requantize_layers(q: QuantizedKernel, add: Any) -> tuple[QuantizedKernel, Any]:
    """``quantize(dequantize(q) + add(i))`` layer by layer for a kernel quantized per layer
    (``q.layer_axes``), in a `jax.lax.map` over the layers, so one layer's float kernel is
    alive at a time; and the relative error ``||W - deQ(Q(W))|| / ||W||`` over the stack
    (``None`` under a trace). ``add(i)``: layer ``i``'s float32 update."""
    n = q.layer_axes
    inner = dataclasses.replace(q, shape=q.shape[n:], layer_axes=0)
    leaves, treedef = jax.tree.flatten(inner)
    flat = [x.reshape(-1, *x.shape[n:]) for x in leaves]
    fmt = (q.format, q.block_size, q.double_quant, jnp.dtype(q.dtype))

    def one(args: tuple[Any, Any]) -> tuple[QuantizedKernel, Any, Any]:
        i, ls = args
        w = dequantize_kernel(jax.tree.unflatten(treedef, ls)).astype(jnp.float32) + add(i)
        out = _quantize(w.astype(q.dtype).astype(jnp.float32), *fmt)
        back = dequantize_kernel(out).astype(jnp.float32)
        return out, jnp.sum((w - back) ** 2), jnp.sum(w**2)

    size = flat[0].shape[0]
    out, err2, norm2 = jax.lax.map(one, (jnp.arange(size), flat))
    lead = tuple(q.shape[:n])
    out = jax.tree.map(lambda x: x.reshape(*lead, *x.shape[1:]), out)
    out = dataclasses.replace(out, shape=q.shape, layer_axes=n)
    err = None
    if not isinstance(err2, jax.core.Tracer):
        err = float(jnp.sqrt(jnp.sum(err2)) / jnp.maximum(jnp.sqrt(jnp.sum(norm2)), 1e-30))
    return out, err


# ---------------------------------------------------------------------------------------------
# LoftQ
# ---------------------------------------------------------------------------------------------
def loftq_factors(
    kernel: jax.Array,
    in_axes: tuple[int, ...],
    rank: int,
    scale: float,
    iters: int = 1,
    fmt: str = "nf4",
    block_size: int = 64,
    layer_axes: int = 0,
    layers: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array, QuantizedKernel]:
    """LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659), as PEFT's ``loftq_init``.

    Alternates ``iters`` times: ``Q = quantize(W - scale * a @ b)`` (``a @ b = 0`` at first), then
    ``a, b`` from the rank-``rank`` SVD of ``W - deQ(Q)``: ``a = U sqrt(S / scale)``,
    ``b = sqrt(S / scale) Vh``, so that ``deQ(Q) + scale * a @ b`` approximates ``W``. (PEFT
    leaves out ``1 / scale``, which is exact only for ``alpha == r``.) ``W`` is the kernel as an
    ``(prod(I), prod(O))`` matrix; ``Q`` is taken of the kernel in its own layout.

    A kernel stacked by ``nn.scan`` / ``nnx.scan`` (``layer_axes`` leading layer axes, ``in_axes``
    counted in the stacked kernel) gets one SVD per layer, and ``Q`` is the quantization of the
    whole stacked residual, exactly `lora.quantize`'s format for the stacked kernel (so
    `lora.wrap` / `lora.merge` take it as any quantized base). Per layer this is the unstacked
    LoftQ of that layer's kernel whenever the quantizer works layer by layer: NF4 with a
    per-layer size that is a multiple of ``block_size``. Otherwise the stacked format ties
    layers together, and so does ``Q``: an NF4 block that straddles two layers has one absmax,
    and int8 has one absmax per channel (the last axis) over all layers. ``layers``: the picked
    entries of the first layer axis (``None``: all); the others keep zero factors, so their part
    of ``Q`` is the quantization of their float base (plain QLoRA).

    Returns:
      ``a`` ``(*L, n_in, r)`` and ``b`` ``(*L, r, n_out)`` in float32 (``L`` the layer axes, none
      for an unstacked kernel), and the `QuantizedKernel` of the base.
    """
    _check_format(fmt, block_size, False)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration; got loftq_iter={iters!r}.")
    shape = tuple(int(d) for d in kernel.shape)
    n = int(layer_axes)
    in_axes = tuple(int(i) for i in in_axes)
    out_axes = tuple(i for i in range(n, len(shape)) if i not in in_axes)
    mask = np.ones(shape[:n], np.float32)
    if layers is not None:
        mask[np.isin(np.arange(shape[0]), layers, invert=True)] = 0.0
    static = (n, in_axes, out_axes, int(rank), float(scale), fmt, int(block_size))
    w = _to_stacked_matrices(kernel, *static[:3])
    res = w
    for _ in range(iters):
        a, b, q, res = _loftq_stacked_step(w, res, mask, jnp.dtype(kernel.dtype), shape, *static)
    return a, b, q


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _to_stacked_matrices(
    kernel: jax.Array, n: int, in_axes: tuple[int, ...], out_axes: tuple[int, ...]
) -> jax.Array:
    n_in = math.prod(kernel.shape[i] for i in in_axes)
    order = tuple(range(n)) + in_axes + out_axes
    return kernel.astype(jnp.float32).transpose(order).reshape(*kernel.shape[:n], n_in, -1)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 12)))
def _loftq_stacked_step(
    w: jax.Array,
    res: jax.Array,
    mask: jax.Array,
    dtype: Any,
    shape: tuple[int, ...],
    n: int,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    r: int,
    scale: float,
    fmt: str,
    block_size: int,
) -> tuple[jax.Array, jax.Array, QuantizedKernel, jax.Array]:
    """One LoftQ alternation on stacked matrices ``(*L, n_in, n_out)`` (float32; ``L`` may be
    empty): ``Q = quantize(res)`` of the whole stacked kernel, ``a, b`` from the SVD of each
    layer's ``W - deQ(Q)`` (zero where ``mask`` is 0), the next ``res = W - scale * a @ b``."""
    order = tuple(range(n)) + in_axes + out_axes
    inverse = tuple(order.index(i) for i in range(len(shape)))
    kernel_res = res.reshape(tuple(shape[i] for i in order)).transpose(inverse)
    q = _quantize(kernel_res, fmt, block_size, False, dtype)
    deq = dequantize_kernel(q).astype(jnp.float32).transpose(order).reshape(w.shape)
    u, s, vt = jnp.linalg.svd(w - deq, full_matrices=False)
    root = jnp.sqrt(s[..., :r] / scale) * mask[..., None]
    a, b = u[..., :r] * root[..., None, :], root[..., :, None] * vt[..., :r, :]
    return a, b, q, w - scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
