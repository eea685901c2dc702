"""`lora.summary`: trainable and total parameter counts, like PEFT's print_trainable_parameters."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

import jax
from flax import nnx

from flax_lora._adapters._extras import TokenDelta
from flax_lora._adapters._tables import adapter_table, split_plain
from flax_lora._paths import flatten
from flax_lora._quant._formats import is_quantized
from flax_lora._typing import Leaf, PyTree


@dataclasses.dataclass(frozen=True)
class Row:
    """One adapted kernel."""

    path: str
    kernel_shape: tuple[int, ...]
    rank: int
    scale: float
    params: int  # trainable parameters of this adapter
    bytes: int
    kernel_params: int
    kind: Literal["lora", "module", "bias", "tokens"] = "lora"  # module/bias: a trained copy


@dataclasses.dataclass(frozen=True)
class Summary:
    """Counts of trainable (adapter) and total (base + adapter) parameters and bytes.

    Returned by `lora.summary`; ``str(summary)`` is the printed table, one row per adapted
    kernel, and the fields below hold the numbers.

    Examples:
      >>> params = {"kernel": jnp.ones((32, 64))}
      >>> adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2))
      >>> s = lora.summary(params, adapters, show=False)
      >>> s.trainable_params, s.total_params, f"{100 * s.trainable_fraction:.2f}%"
      (192, 2240, '8.57%')
      >>> [(r.path, r.rank) for r in s.rows]
      [('kernel', 2)]

    Attributes:
      rows: one row per adapted kernel (path, kernel shape, rank, scale, adapter parameters
        and bytes, kernel parameters), then one per trained copy (``kind`` ``"module"`` or
        ``"bias"``) and token delta (``kind`` ``"tokens"``, its number of rows as ``rank``).
      trainable_params: parameters in the adapters.
      trainable_bytes: their bytes.
      base_params: parameters of the base params tree (a `QuantizedKernel` counts as the
        elements of the kernel it stands for).
      base_bytes: its bytes (of a `QuantizedKernel`, the bytes it stores).
    """

    rows: tuple[Row, ...]
    trainable_params: int
    trainable_bytes: int
    base_params: int
    base_bytes: int

    @property
    def total_params(self) -> int:
        """Base plus adapter parameters."""
        return self.base_params + self.trainable_params

    @property
    def total_bytes(self) -> int:
        """Base plus adapter bytes."""
        return self.base_bytes + self.trainable_bytes

    @property
    def trainable_fraction(self) -> float:
        """``trainable_params / total_params`` (PEFT's "trainable%" / 100)."""
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.rows] + [4])
        lines = [f"{'path':<{width}}  {'kernel':>16}  {'rank':>4}  {'scale':>7}  {'params':>10}"]
        for r in self.rows:
            rank, scale = (f"{r.rank:>4}", f"{r.scale:>7.4g}") if r.kind == "lora" else ("", "")
            if r.kind != "lora":
                rank = {"module": "copy", "bias": "bias", "tokens": "rows"}.get(r.kind, r.kind)
                scale = f"{r.rank:>7}" if r.kind == "tokens" else ""
            lines.append(
                f"{r.path:<{width}}  {'x'.join(map(str, r.kernel_shape)):>16}  {rank:>4}  "
                f"{scale:>7}  {r.params:>10,}"
            )
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {100 * self.trainable_fraction:.4f} || trainable bytes: "
            f"{_human(self.trainable_bytes)} || all bytes: {_human(self.total_bytes)}"
        )
        return "\n".join(lines)


def _human(n: int) -> str:
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return str(size)


def _size(x: Leaf) -> tuple[int, int]:
    """(elements, bytes) of an array; a `QuantizedKernel` counts the elements of the kernel it
    stands for and the bytes of its stored arrays (codes, absmax, double-quant scales)."""
    if is_quantized(x):
        return math.prod(x.shape), sum(_size(leaf)[1] for leaf in jax.tree.leaves(x))
    n = math.prod(getattr(x, "shape", ()))
    return n, n * getattr(getattr(x, "dtype", None), "itemsize", 0)


def _parameters(params: PyTree) -> list[Leaf]:
    """The parameter arrays of ``params`` (see `summary`)."""
    variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if any(isinstance(v, nnx.Variable) for v in variables):
        params = [v for v in variables if isinstance(v, nnx.Param)]
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return [x for x in leaves if not is_key(x)]


def summary(params: PyTree, adapters: PyTree, show: bool = True) -> Summary:
    """Counts trainable and total parameters and bytes, per adapted kernel and in total.

    Examples:
      >>> params = {"kernel": jnp.ones((32, 64))}
      >>> adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2))
      >>> s = lora.summary(params, adapters)  # prints the table
      path                     kernel  rank    scale      params
      kernel                    32x64     2        4         192
      trainable params: 192 || all params: 2,240 || trainable%: 8.5714 || ...
      >>> s.trainable_params, s.total_params
      (192, 2240)

    Args:
      params: the base params tree. As in PEFT, only parameters count: of an NNX state its
        ``nnx.Param`` variables (not batch statistics or RNG state), of a Linen variables
        dict its ``"params"`` collection (not ``"batch_stats"``). On a quantized base
        (`lora.quantize`) a `QuantizedKernel` counts as the parameters of the kernel it stands
        for (its ``shape``), so the counts and the trainable % are those of the float model,
        and as the bytes it actually stores (codes, absmax and any double-quantization
        scales).
      adapters: the adapters.
      show: print the table (the default), as PEFT's ``print_trainable_parameters`` does.

    Returns:
      A `Summary` whose ``str`` is the printed table.

    Raises:
      TypeError: ``adapters`` holds leaves other than adapter entries (naming their paths).
    """

    kernels = flatten(params, is_leaf=is_quantized)
    rows = []
    for path, w in adapter_table(adapters).items():
        (na, ba), (nb, bb) = _size(w.a), _size(w.b)
        nm, bm = _size(w.m) if w.m is not None else (0, 0)  # DoRA's magnitude
        rows.append(
            Row(
                path,
                tuple(w.stored_shape),  # as in params (the layer axes where the kernel has them)
                w.rank,
                float(w.scale),
                na + nb + nm,
                ba + bb + bm,
                _size(kernels[path])[0] if path in kernels else 0,
            )
        )

    for path, node in split_plain(adapters, "summary")[1].items():
        n, nbytes = _size(node.array)
        rows_ = len(node.indices) if isinstance(node, TokenDelta) else 0  # a token delta's rows
        shape = tuple(getattr(kernels.get(path), "shape", node.array.shape))
        total = _size(kernels[path])[0] if path in kernels else 0
        rows.append(Row(path, shape, rows_, 0.0, n, nbytes, total, node.kind))
    base = [_size(x) for x in _parameters(params)]
    result = Summary(
        rows=tuple(rows),
        trainable_params=sum(r.params for r in rows),
        trainable_bytes=sum(r.bytes for r in rows),
        base_params=sum(n for n, _ in base),
        base_bytes=sum(b for _, b in base),
    )
    if show:
        print(result)
    return result
