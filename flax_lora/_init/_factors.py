"""One kernel's starting factors: the random inits (lora, gaussian, random), the inits that
factor the base kernel (PiSSA, OLoRA), and DoRA's magnitude.

A kernel's axes are its input axes ``I``, its output axes ``O`` and its carried axes ``C``:
the axes on which the adapter has an independent factor pair per index (the layer axes of a
layered kernel, ``nn.scan`` / ``nnx.scan``; expert axes next). `init_factors` makes
the factors of one slice of the carried axes at a time, in one loop over the slices, and stacks
them; a kernel without carried axes is a single slice. LoftQ, which quantizes the base while it
fits the factors, is in `flax_lora._init._loftq`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from flax_lora._adapters._delta import HIGHEST
from flax_lora._adapters._dora import weight_norm
from flax_lora._adapters._weights import LoraWeights
from flax_lora._quant._formats import QuantizedKernel, dequantize_kernel
from flax_lora._sharding import place
from flax_lora._typing import Init, Kind

RANDOM_INITS: tuple[Init, ...] = ("lora", "gaussian", "random")
"""The inits that need the kernel's shape only (``b = 0``, or ``a = 0`` for an embedding,
except ``"random"``)."""

FACTORING_INITS: tuple[Init, ...] = ("pissa", "olora", "loftq")
"""The inits that factor the base kernel: they need its values, and `lora.init` returns the new
base (the residual, or LoftQ's quantized kernel) with the adapters."""

WASTEFUL_RANK = 4
"""`check_rank` refuses a rank over this many times ``min(fan_in, fan_out)`` when the factors
would also hold more than `BIG_FACTORS` entries."""

BIG_FACTORS = 2**24
"""See `WASTEFUL_RANK`: 2**24 entries (64 MiB of float32), so that a generous rank on a small
kernel only warns, while a typo such as ``rank=10**9`` is refused before anything is allocated."""


def check_rank(
    path: str,
    shape: tuple[int, ...],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    carried_shape: tuple[int, ...],
    rank: int,
) -> None:
    """Refuses a rank that cannot be meant for the kernel at ``path``, before any factor exists.

    ``a @ b`` has rank at most ``min(fan_in, fan_out)`` (``fan_in = prod(I)``,
    ``fan_out = prod(O)``, per carried slice), so a larger rank only costs memory: `lora.init`
    warns about it (`rank_note`), and refuses it here when it is over ``WASTEFUL_RANK`` times
    that side and the factors would hold more than ``BIG_FACTORS`` entries.

    Raises:
      ValueError: naming the path, the kernel's shape, fan_in, fan_out, the rank and the size.
    """
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    fan = min(fan_in, fan_out)
    entries = math.prod(carried_shape) * rank * (fan_in + fan_out)
    if rank > WASTEFUL_RANK * fan and entries > BIG_FACTORS:
        per = " per layer/expert" if carried_shape else ""
        raise ValueError(
            f"Rank {rank} for {path!r} (kernel of shape {shape}: fan_in {fan_in}, fan_out "
            f"{fan_out}{per}) is over {WASTEFUL_RANK} x min(fan_in, fan_out) = "
            f"{WASTEFUL_RANK * fan}, and its factors would hold {entries:,} entries, though "
            f"a @ b has rank at most {fan}. Lower LoraConfig.rank, or set rank_pattern for "
            "this path."
        )


def warn_ranks(notes: list[str]) -> None:
    """`lora.init`'s one warning (to its caller) about the `rank_note` of each adapter."""
    if not notes:
        return
    more = f"; and {len(notes) - 10} more" if len(notes) > 10 else ""
    warnings.warn(
        f"lora.init: {len(notes)} adapter(s) have a rank above their kernel's smaller side "
        f"({'; '.join(notes[:10])}{more}). a @ b has rank at most min(fan_in, fan_out) (per "
        "layer or expert), so the extra rank only costs memory and compute; lower "
        "LoraConfig.rank, or set rank_pattern for these paths.",
        stacklevel=3,
    )


def rank_note(path: str, w: LoraWeights) -> str | None:
    """``"'path': rank r > min(fan_in=.., fan_out=..)"`` for an adapter whose rank exceeds its
    kernel's smaller side (per carried slice), else ``None``."""
    fan_in, fan_out = math.prod(w.in_shape), math.prod(w.out_shape)
    if w.rank <= min(fan_in, fan_out):
        return None
    return f"{path!r}: rank {w.rank} > min(fan_in={fan_in}, fan_out={fan_out})"


def split_keys(key: jax.Array, n: int) -> list[jax.Array]:
    """The ``n`` keys of ``jax.random.split(key, n)``, as a list.

    Iterating a split key array makes JAX compile an ``unstack`` per size (0.3-0.6 s each on
    CPU at the start of every run), so a concrete key's split is read to the host once and each
    key wrapped from its data (one small program for all). Under
    ``jax_threefry_partitionable`` (JAX's default) the first ``n`` keys of a larger split are
    those of ``split(key, n)``, so the split is compiled per power-of-two size only. A traced
    key (``lora.init`` under ``jax.eval_shape`` or ``jit``) is split as it is.
    """
    if isinstance(key, jax.core.Tracer):
        return list(jax.random.split(key, n))
    m = _bucket(n) if getattr(jax.config, "jax_threefry_partitionable", False) else n
    keys = jax.random.split(key, m)  # JAX's own TypeError for what is no key
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(keys) if typed else keys)[:n]
    if not typed:
        return list(data)
    impl = jax.random.key_impl(key)
    return [jax.random.wrap_key_data(d, impl=impl) for d in data]


def init_factors(
    key: jax.Array,
    kernel: jax.Array | jax.ShapeDtypeStruct,
    init: Init,
    kind: Kind,
    in_axes: tuple[int, ...],
    rank: int,
    scale: float,
    dtype: DTypeLike,
    carried: int = 0,
    picked: np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The factors of one kernel, made slice by slice over its leading carried axes.

    Each slice (an index of the carried axes) gets its own key, split from ``key`` one carried
    axis at a time (``jax.random.split(key, C[0])``, then each of those into ``C[1]``, ...), and
    its own factors, as if it were a kernel of its own.

    Args:
      key: a PRNG key (used by the random inits only).
      kernel: the base kernel; a `jax.ShapeDtypeStruct` is enough for `RANDOM_INITS`.
      init: one of `RANDOM_INITS`, ``"pissa"`` or ``"olora"``.
      kind: the kernel's kind (an embedding starts with ``a = 0`` instead of ``b = 0``).
      in_axes: the kernel's input axes (counted in the whole kernel; none of them carried).
      rank: ``r``.
      scale: the adapter's ``scale`` (PiSSA's factors and every residual depend on it).
      dtype: the factors' dtype.
      carried: the number of the kernel's carried axes, its leading ones.
      picked: a boolean mask of the carried axes' shape: the slices to adapt (``None``: all);
        the others get zero factors and keep their base unchanged.

    Returns:
      ``a`` ``(*C, prod(I), r)`` and ``b`` ``(*C, r, prod(O))`` in ``dtype``, and for PiSSA and
      OLoRA the residual base kernel (``W0 - scale * a @ b``, in the kernel's layout and dtype),
      else ``None``.
    """
    shape = tuple(kernel.shape)
    sizes = shape[:carried]
    slice_in_axes = tuple(d - carried for d in in_axes)
    n_in = math.prod(shape[d] for d in in_axes)
    n_out = math.prod(shape[d] for d in range(carried, len(shape)) if d not in in_axes)
    needs_values = init not in RANDOM_INITS
    keys = [key]
    for size in sizes:
        keys = [k for parent in keys for k in split_keys(parent, size)]
    a_s: list[jax.Array] = []
    b_s: list[jax.Array] = []
    residuals: list[jax.Array] = []
    for k, index in zip(keys, np.ndindex(*sizes), strict=True):
        piece: jax.Array | None = None
        residual: jax.Array | None = None
        if needs_values:
            values = kernel_values(kernel, init)
            piece = values[index] if carried else values
            a, b, residual = _factor(piece, init, slice_in_axes, rank, scale, dtype)
        else:  # random inits need the shape only: no slice of a (sharded) kernel is made
            a, b = _random_factors(k, init, kind == "embed", n_in, n_out, rank, jnp.dtype(dtype))
        if picked is not None and not picked[index]:  # not adapted: zero factors, base unchanged
            a, b, residual = jnp.zeros_like(a), jnp.zeros_like(b), piece
        a_s.append(a)
        b_s.append(b)
        if residual is not None:
            residuals.append(residual)
    if not carried:
        return a_s[0], b_s[0], residuals[0] if residuals else None
    a = jnp.stack(a_s).reshape(*sizes, *a_s[0].shape)
    b = jnp.stack(b_s).reshape(*sizes, *b_s[0].shape)
    if not needs_values:
        return a, b, None
    return a, b, jnp.stack(residuals).astype(kernel.dtype).reshape(shape)


def kernel_values(kernel: jax.Array | jax.ShapeDtypeStruct, init: str) -> jax.Array:
    """``kernel`` itself, an array: ``TypeError`` for a shape alone (``init`` needs values)."""
    if isinstance(kernel, jax.ShapeDtypeStruct):
        raise TypeError(f"init={init!r} needs the kernel's values; got a {kernel}.")
    return kernel


def with_magnitude(w: LoraWeights, base: jax.Array | QuantizedKernel) -> LoraWeights:
    """DoRA: ``w`` with ``m = ||W0 + scale * a @ b||`` over the input axes (PEFT), in the
    factors' dtype, sharded as the kernel's output (and layer) axes.

    ``base`` is the base kernel the adapter will run on (a PiSSA/OLoRA residual, a LoftQ
    `QuantizedKernel`, or the params' kernel). With the default inits (``b = 0``, or ``a = 0``
    for an Embed) this makes DoRA the identity at init.
    """
    kernel = dequantize_kernel(base) if isinstance(base, QuantizedKernel) else base
    m = weight_norm(kernel, w, jnp.promote_types(kernel.dtype, jnp.float32)).astype(w.b.dtype)
    own = tuple(w.stored_order.index(d) for d in (*w.carried_axes, *w.out_axes))
    return w.replace(m=place(m, kernel, own))  # the kernel's own axes (`LoraWeights.layer_at`)


def _factor(
    piece: jax.Array,
    init: Init,
    in_axes: tuple[int, ...],
    rank: int,
    scale: float,
    dtype: DTypeLike,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA / OLoRA of a kernel without carried axes: ``a`` ``(n_in, r)`` and ``b``
    ``(r, n_out)`` in ``dtype`` from ``W0`` in float32, and the residual base kernel."""
    shape = tuple(piece.shape)
    out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
    in_shape = tuple(shape[i] for i in in_axes)
    out_shape = tuple(shape[i] for i in out_axes)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    w = piece.astype(jnp.float32).transpose(in_axes + out_axes).reshape(n_in, n_out)
    a32, b32 = _FACTORIZATIONS[init](w, rank, scale)
    # the residual is taken against the factors as stored (in ``dtype``), so that
    # residual + scale * a @ b is W0 to float32 rounding also for bfloat16 adapters
    a, b = a32.astype(dtype), b32.astype(dtype)
    ab = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST)
    res = w - scale * ab
    inverse = tuple((in_axes + out_axes).index(i) for i in range(len(shape)))
    return a, b, res.reshape(in_shape + out_shape).transpose(inverse).astype(piece.dtype)


def _pissa(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """PiSSA: the top-``r`` singular triplets of ``W0``, ``a = U sqrt(S / scale)``,
    ``b = sqrt(S / scale) Vh``."""
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    return u[:, :r] * root, root[:, None] * vt[:r]


def _olora(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """OLoRA: QR of ``W0`` in PyTorch's (out, in) layout: ``lora_A = R[:r]``,
    ``lora_B = Q[:, :r]`` (``scale`` enters through the residual only)."""
    del scale
    q, rr = jnp.linalg.qr(w.T)
    return rr[:r].T, q[:, :r].T


_FACTORIZATIONS: dict[str, Callable[[jax.Array, int, float], tuple[jax.Array, jax.Array]]] = {
    "pissa": _pissa,
    "olora": _olora,
}


def _random_factors(
    key: jax.Array, init: Init, embed: bool, n_in: int, n_out: int, r: int, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    """``a`` (n_in, r) and ``b`` (r, n_out) for the random inits.

    The random numbers are drawn by one compiled call per power-of-two size (threefry takes
    long to compile on CPU, and a model has many kernel shapes); slicing and scaling them to
    each shape is a second, cheap compiled call.
    """
    na, nb = n_in * r, r * n_out
    normal = init == "gaussian" or (embed and init == "lora")
    flat = _draw(key, _bucket(na + nb), normal)
    return _shape_factors(flat, init, embed, n_in, n_out, r, dtype)


def _bucket(n: int) -> int:
    return max(256, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key: jax.Array, n: int, normal: bool) -> jax.Array:
    if normal:
        return jax.random.normal(key, (n,), jnp.float32)
    return jax.random.uniform(key, (n,), jnp.float32, -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _shape_factors(
    flat: jax.Array, init: Init, embed: bool, n_in: int, n_out: int, r: int, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array]:
    na, nb = n_in * r, r * n_out
    u_a = flat[:na].reshape(n_in, r)
    u_b = flat[na : na + nb].reshape(r, n_out)
    bound = 1.0 / math.sqrt(n_in)  # PyTorch kaiming_uniform_(a=sqrt(5)) on fan_in = prod(I)
    if init == "random":  # both uniform: a as kaiming, b in +-1/sqrt(r)
        a, b = u_a * bound, u_b / math.sqrt(r)
    elif embed:  # PEFT: A zeros, B standard normal, for both "lora" and "gaussian"
        a, b = jnp.zeros_like(u_a), u_b
    elif init == "lora":  # a kaiming-uniform, b zeros
        a, b = u_a * bound, jnp.zeros_like(u_b)
    else:  # gaussian: a normal with std 1/r, b zeros
        a, b = u_a / r, jnp.zeros_like(u_b)
    return a.astype(dtype), b.astype(dtype)
