"""Float64 references written independently of flax_lora: a kernel as its ``(inputs, outputs)``
matrix, the LoRA delta ``scale * a @ b`` put back into a kernel's layout, the merged kernel,
DoRA's kernel ``m * V / ||V||``, bf16 distances, and the quantization formats (bitsandbytes'
tables rebuilt as bitsandbytes builds them, int8, NF4, double quantization). Float64 forwards
and hand-written backward passes of whole test models are in `support.refs_models`."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import flax_lora as lora

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------
# LoRA: the delta in the kernel layout we expect
# ---------------------------------------------------------------------------------------------
def as_matrix(w: np.ndarray, in_axes: tuple[int, ...]) -> np.ndarray:
    """A kernel as the ``(prod in, prod out)`` matrix (input axes in ``in_axes`` order, then the
    other axes in order)."""
    in_axes = tuple(in_axes)
    out_axes = tuple(i for i in range(w.ndim) if i not in in_axes)
    n_in = math.prod(w.shape[i] for i in in_axes)
    return np.transpose(w, in_axes + out_axes).reshape(n_in, -1)


def from_matrix(mat: np.ndarray, shape: tuple[int, ...], in_axes: tuple[int, ...]) -> np.ndarray:
    """The inverse of `as_matrix`: the matrix put back into a kernel of ``shape``."""
    in_axes = tuple(in_axes)
    out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
    order = in_axes + out_axes
    full = mat.reshape([shape[i] for i in order])
    return full.transpose([order.index(i) for i in range(len(shape))])


def ref_delta64(a: Any, b: Any, in_axes: tuple[int, ...], scale: float) -> np.ndarray:
    """``scale * a @ b`` in float64, put back into a kernel layout whose input axes are ``in_axes``.

    ``a`` has shape ``(*I, r)``, ``b`` ``(r, *O)``; the product ``(*I, *O)`` is transposed so
    that axis ``in_axes[k]`` of the kernel is the k-th input axis and the remaining kernel axes,
    in order, are the output axes.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    prod = np.tensordot(a64, b64, axes=([a64.ndim - 1], [0]))  # (*I, *O)
    ndim = prod.ndim
    out_axes = [i for i in range(ndim) if i not in in_axes]
    order = list(in_axes) + out_axes  # prod axis j holds kernel axis order[j]
    return scale * np.transpose(prod, np.argsort(order))


def ref_delta_jnp(a: jax.Array, b: jax.Array, in_axes: tuple[int, ...], scale: float) -> jax.Array:
    """The same reference in jnp (differentiable), float32 at the highest precision."""
    prod = jnp.tensordot(
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        axes=([a.ndim - 1], [0]),
        precision=jax.lax.Precision.HIGHEST,
    )
    out_axes = [i for i in range(prod.ndim) if i not in in_axes]
    order = list(in_axes) + out_axes
    return scale * jnp.transpose(prod, tuple(int(i) for i in np.argsort(order)))


def ref_merged_kernel(w0: Any, a: Any, b: Any, in_axes: tuple[int, ...], scale: float) -> Any:
    """``W0 + scale * a @ b`` in float64, then float32, then cast once to the kernel's dtype."""
    ref64 = np.asarray(w0, dtype=np.float64) + ref_delta64(a, b, in_axes, scale)
    return ref64.astype(np.float32).astype(np.asarray(w0).dtype)


def dora_carried64(kernel: np.ndarray, d: np.ndarray, m: np.ndarray, carried: Any, inputs: Any):
    """``m * V / ||V||`` in float64, ``V = W0 + delta``, the norm over the input axes per carried
    index and output unit (``m (*C, *O)`` put back in the kernel's layout)."""
    v = kernel + d
    norm = np.sqrt(np.sum(v**2, axis=inputs, keepdims=True))
    outputs = [i for i in range(v.ndim) if i not in carried and i not in inputs]
    order = [*carried, *outputs]  # m's axes, in kernel axis numbers
    m_k = np.expand_dims(np.transpose(m, np.argsort(np.argsort(order))), inputs)
    return m_k * v / norm


def bf16_ulps(x: Any, y: Any) -> np.ndarray:
    """Distance in bf16 units in the last place between two bf16 arrays (sign-magnitude aware)."""

    def ordered(v: Any) -> np.ndarray:
        bits = np.asarray(v, dtype=BF16).view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.abs(ordered(x) - ordered(y))


# ---------------------------------------------------------------------------------------------
# quantization: bitsandbytes' tables and the formats
# ---------------------------------------------------------------------------------------------

# bitsandbytes' get_4bit_type("nf4"), copied from its source (functional.py / the CUDA kernels)
NF4_BNB = np.array(
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


def pack(codes: np.ndarray) -> np.ndarray:
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed).astype(np.int64)
    return np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)


def ref_decode_nf4(q: lora.QuantizedKernel) -> np.ndarray:
    """A QuantizedKernel (no double quant) decoded by the test's own unpacking, in float64."""
    codes = unpack(np.asarray(q.codes))
    vals = NF4_BNB[codes].astype(np.float64).reshape(-1, q.block_size)
    vals = vals * np.asarray(q.absmax, np.float64)[:, None]
    return vals.reshape(-1)[: math.prod(q.shape)].reshape(q.shape)


def ref_decode(q: lora.QuantizedKernel) -> np.ndarray:
    """The kernel a QuantizedKernel stands for, decoded in float64 by the tests' own decoders
    (int8: ``codes * absmax / 127``), layer by layer when it has layer axes."""
    if q.layer_axes:
        one = lambda i: ref_decode(jax.tree.map(lambda t: t[i], q.layer()))
        return np.stack([one(i) for i in range(q.shape[0])])
    if q.format == "int8":
        return np.asarray(q.codes, np.float64) * np.asarray(q.absmax, np.float64) / 127.0
    return ref_decode_nf4(q)


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32, torch's default dtype) as torch computes
    it on CPU: ``step = (end - start) / (steps - 1)`` in float32, then ``start + i * step`` for
    the first half and ``end - (steps - 1 - i) * step`` for the rest, each rounded once to
    float32 (a fused multiply-add). Exact here in float64 (the products and sums need fewer than
    53 bits), so the one rounding is the final cast."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(start32) + step * i
    second = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def dynamic_map_bnb() -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``,
    as bitsandbytes writes it in torch (float32 tensors; here numpy float32)."""
    data: list[float] = []
    for i in range(7):
        boundaries = linspace32(0.1, 1, 2**i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return np.array(data, np.float32)


DYN = dynamic_map_bnb()


def ref_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, absmax per last-axis channel, dequantized) in float64."""
    w = np.asarray(w, np.float64)
    absmax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    codes = np.clip(np.round(w * 127.0 / absmax), -127, 127)
    return codes, absmax, codes * absmax / 127.0


def nearest(t: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level (ties to the lower one), by brute force."""
    t = np.clip(t, -1.0, 1.0)
    return np.argmin(np.abs(t[..., None] - levels.astype(np.float64)), axis=-1)


def ref_nf4(w: np.ndarray, block: int) -> dict[str, np.ndarray]:
    flat = np.asarray(w, np.float64).reshape(-1)
    pad = (-flat.size) % block
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    t = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    codes = nearest(t, NF4_BNB)
    deq = (NF4_BNB[codes].astype(np.float64) * absmax[:, None]).reshape(-1)[: flat.size]
    return dict(t=t.reshape(-1), codes=codes.reshape(-1), absmax=absmax, deq=deq.reshape(w.shape))


def ref_double(absmax: np.ndarray) -> dict[str, np.ndarray]:
    """Double quantization of block absmaxes: mean-subtracted, blocks of 256, dynamic map."""
    offset = absmax.astype(np.float64).mean()
    centred = absmax.astype(np.float64) - offset
    pad = (-centred.size) % 256
    blocks = np.concatenate([centred, np.zeros(pad)]).reshape(-1, 256)
    a2 = np.abs(blocks).max(axis=1)
    t = blocks / np.where(a2 > 0, a2, 1.0)[:, None]
    codes = nearest(t, DYN)
    deq = (DYN[codes].astype(np.float64) * a2[:, None]).reshape(-1)[: centred.size] + offset
    return dict(t=t.reshape(-1)[: centred.size], codes=codes.reshape(-1)[: centred.size], deq=deq)
