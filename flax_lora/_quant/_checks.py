"""The checks of a quantization's arguments: the format, and kernels holding non-finite values.

A NaN or an inf in a kernel makes the absmax of its int8 channel or NF4 block non-finite, so the
whole channel or block (with double quantization, the whole kernel) dequantizes to NaN: the
callers (`lora.quantize_kernel`, `lora.quantize`, `lora.requantize`, LoftQ) refuse such
kernels by name before anything is quantized (not under a trace, where the values are unknown).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._typing import QUANT_FORMATS, QuantFormat


def check_format(dtype: object, block_size: object, double_quant: object) -> None:
    """Raises a `lora.quantize` error for an unknown format, a bad block size, or double
    quantization of a format other than NF4."""
    if not isinstance(dtype, str) or dtype not in QUANT_FORMATS:
        raise ValueError(f"lora.quantize: dtype must be one of {QUANT_FORMATS}; got {dtype!r}.")
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


@jax.jit
def _finite_counts(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(number of NaNs, of +infs, of -infs, flat index of the first non-finite entry)."""
    flat = jnp.reshape(w, (-1,))
    counts = (jnp.sum(jnp.isnan(flat)), jnp.sum(jnp.isposinf(flat)), jnp.sum(jnp.isneginf(flat)))
    return (*counts, jnp.argmax(~jnp.isfinite(flat)))


def non_finite(w: jax.Array | np.ndarray) -> str | None:
    """``None`` when ``w`` holds only finite values or is traced (its values unknown); else
    what it holds, e.g. ``"2 non-finite values (1 nan, 1 inf; the first at index (0, 3))"``."""
    if isinstance(w, jax.core.Tracer) or not jnp.issubdtype(w.dtype, jnp.floating):
        return None
    *counts, first = (int(c) for c in _finite_counts(w))
    n = sum(counts)
    if not n:
        return None
    kinds = ", ".join(f"{c} {k}" for c, k in zip(counts, ("nan", "inf", "-inf"), strict=True) if c)
    index = tuple(int(i) for i in np.unravel_index(first, tuple(w.shape)))
    return f"{n} non-finite value{'s' * (n > 1)} ({kinds}; the first at index {index})"


def finite_error(
    owner: str, found: dict[str, str], fmt: QuantFormat, double_quant: bool = False
) -> ValueError:
    """The error for kernels with non-finite entries: ``owner`` (``"lora.quantize"``), what
    `non_finite` found in each (by name, e.g. ``"kernel 'params/fc1/kernel'"``), and what one
    such value does to the quantization in the format."""
    held = "; ".join(f"{name} holds {what}" for name, what in found.items())
    if fmt == "int8":
        why = "int8 scales each channel (last axis) by its absmax, so one such value makes its "
        why += "whole channel NaN"
    else:
        why = "nf4 scales each block by its absmax, so one such value makes its whole block NaN"
        why += " (with double_quant, the whole kernel)" if double_quant else ""
    return ValueError(f"{owner}: {held}. {why}. Replace or clip them before quantizing.")
