"""Expert adapters built by hand (one LoRA per expert and per layer) for the MoE test cases of
`support.moe_models`, in the layout of ``../shared/API.md`` ("Expert kernels"):
``LoraWeights(a (*C, *I, r), b (*C, r, *O), in_axes=..., kernel_shape=..., layer_axes=...,
expert_axes=...)``, the carried axes ``C`` being the scan layer axis (stacked cases) then the
expert axis. Used where `lora.init` is not the subject (merge, combine, stack, summary,
checkpoints, quantized bases, sharding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

import flax_lora as lora
from support.moe_models import MoeCase, build, merged64, random_factors


def kernel_shapes(case: MoeCase) -> dict[str, tuple[int, ...]]:
    """Path -> shape of each kernel of ``case``."""
    return {p: tuple(np.shape(v)) for p, v in merged64(case, case.params).items()}


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        d = out
        *head, last = path.split("/")
        for part in head:
            d = d.setdefault(part, {})
        d[last] = v
    return out


def expert_adapters(
    case: MoeCase,
    factors: Mapping[str, tuple[Any, Any, float]],
    dtype: Any = jnp.float32,
    layers: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """A nested adapter tree with one `lora.LoraWeights` per path of ``factors`` (path ->
    ``(a, b, scale)``, as `support.moe_models.random_factors` gives), its layout read from
    ``case.kernels`` (`ExpertAxes`, written by hand): ``layer_axes`` 1 for a stacked case, the
    other carried axes its expert axes. ``layers`` (stacked cases only) picks adapted layers."""
    shapes = kernel_shapes(case)
    n = 1 if case.stacked else 0
    flat = {}
    for path, (a, b, scale) in factors.items():
        axes = case.kernels[path]
        flat[path] = lora.LoraWeights(
            jnp.asarray(a, dtype),
            jnp.asarray(b, dtype),
            scale=scale,
            in_axes=axes.inputs,
            kernel_shape=shapes[path],
            layer_axes=n,
            expert_axes=tuple(c for c in axes.carried if c >= n),
            layers=layers if n else None,
        )
    return nest(flat)


def einsum_case(stacked: bool, transposed: bool = False) -> MoeCase:
    """The Linen einsum expert model (block or scan stack, ``w_out`` transposed or not)."""
    return build("linen", "einsum", stacked=stacked, transposed_out=transposed)


def two_sets(stacked: bool, transposed: bool, ranks: tuple[int, int] = (2, 2)) -> tuple:
    """``(case, [factors of two sets], [their adapter trees])`` on `einsum_case`: random factors
    of the given ranks (scales 0.75 and 0.5, seeds 3 and 4)."""
    case = einsum_case(stacked, transposed)
    f = [
        random_factors(case, rank=ranks[0], scale=0.75, seed=3),
        random_factors(case, rank=ranks[1], scale=0.5, seed=4),
    ]
    return case, f, [expert_adapters(case, x) for x in f]
