"""Numpy references shared by several test modules, written independently of flax_lora."""

from __future__ import annotations

import math

import numpy as np

import flax_lora as lora

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
