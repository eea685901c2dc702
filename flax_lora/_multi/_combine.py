"""`lora.combine`: several adapter sets of one model combined into one by weights.

The methods follow the meanings of PEFT's ``LoraModel.add_weighted_adapter`` (``linear``,
``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and the ``*_svd``
variants), defined in `combine` as formulas over the deltas ``Δᵢ = sᵢ · aᵢ @ bᵢ``: the
``linear`` family combines the factors ``a`` and ``b`` separately, ``cat`` is exact, and the SVD
methods approximate the combined delta at a chosen rank. Each method is a record of its steps
in `flax_lora._multi._combine_methods.COMBINE_METHODS`; this module checks a call's arguments
against the method's steps and runs it on every kernel (per carried index).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._delta import masked_factor
from flax_lora._adapters._tables import adapter_tables, extra_tables
from flax_lora._adapters._weights import LoraWeights
from flax_lora._field_checks import integer, real
from flax_lora._multi._combine_methods import (
    COMBINE_METHODS,
    SIGN_ELECTIONS,
    Plan,
    SignMethod,
)
from flax_lora._multi._stack_extras import combine_extras
from flax_lora._paths import nest
from flax_lora._typing import PyTree

Method = Literal[
    "cat",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
]
"""`combine`'s ``method``: the keys of `COMBINE_METHODS`."""
METHODS: tuple[str, ...] = tuple(COMBINE_METHODS)
SIGN_METHODS: tuple[str, ...] = tuple(SIGN_ELECTIONS)
_DENSITY = real(lambda x: 0.0 < x <= 1.0, "in (0, 1]")


def combine(
    adapter_list: Sequence[PyTree],
    weights: Sequence[float] | jax.Array,
    method: Method = "linear",
    rank: int | None = None,
    density: float | None = None,
    key: jax.Array | None = None,
    majority_sign_method: SignMethod = "total",
) -> PyTree:
    """Combines several adapter sets of one model into one, like PEFT's ``add_weighted_adapter``.

    With ``Δᵢ = sᵢ · aᵢ @ bᵢ`` the delta of adapter ``i`` at a kernel and ``wᵢ`` its weight
    (weights may be negative), the result's delta is ``a @ b`` with scale 1 (the inputs' scales
    are folded into the factors): ``"cat"`` gives exactly ``Σᵢ wᵢ Δᵢ`` (rank ``Σᵢ rᵢ``),
    ``"svd"`` its best rank-``rank`` approximation, ``"linear"`` (PEFT's) combines the factors
    separately; ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` and ``"magnitude_prune"`` prune
    the factors first, their ``_svd`` variants the deltas. Carried axes (layers, experts) are
    combined per index; trained copies and token deltas as ``Σᵢ wᵢ vᵢ``. Every set must adapt
    the same kernels. Formulas and the differences from PEFT: `docs/guides/multi_adapter.md`.

    Sharp edge: with several adapters, ``"linear"`` and the pruning methods hold cross terms
    ``aᵢ bⱼ`` (i ≠ j), so their delta is not ``Σᵢ wᵢ Δᵢ``: ``"cat"`` is, exactly.

    Examples:
      >>> params, config = {"kernel": jnp.ones((3, 4))}, lora.LoraConfig(rank=2, init="random")
      >>> adapters_a = lora.init(jax.random.key(0), params, config)
      >>> adapters_b = lora.init(jax.random.key(1), params, config)
      >>> both = lora.combine([adapters_a, adapters_b], [0.7, 0.3], method="cat")
      >>> both["kernel"].rank, both["kernel"].scale
      (4, 1.0)
      >>> want = 0.7 * lora.delta(adapters_a["kernel"]) + 0.3 * lora.delta(adapters_b["kernel"])
      >>> bool(jnp.allclose(lora.delta(both["kernel"]), want, atol=1e-5))
      True
      >>> low = lora.combine([adapters_a, adapters_b], [1.0, -1.0], method="svd", rank=2)
      >>> low["kernel"].rank
      2

    Args:
      adapter_list: adapter sets of the same model, adapting the same kernels with the same
        layouts.
      weights: one weight per set (floats or an array; traced only for methods without
        pruning); finite in float32.
      method: ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"``, ``"magnitude_prune"``, or one of the last four with ``"_svd"``.
      rank: the SVD methods' rank (default: the largest input rank at each kernel).
      density: the fraction of entries kept, in (0, 1], for the pruning methods.
      key: a PRNG key, for the dare methods.
      majority_sign_method: ``"total"`` or ``"frequency"``, for the ties methods.

    Returns:
      One adapter set with the inputs' tree structure: `LoraWeights` with scale 1, in the
      inputs' promoted dtype.

    Raises:
      ValueError: the adapter sets adapt different kernels or disagree on a kernel's shape, input
        axes, kind or layer axes (naming the path); DoRA adapters; ``weights`` has the wrong
        length or a NaN / infinite entry (naming its index); an unknown method; unequal ranks
        for a ``linear``-family method (naming the path); a missing or out-of-range
        ``density``; a missing ``key`` for dare; ``rank`` for a non-SVD method, or below 1.
      TypeError: ``adapter_list`` is not a list of adapter sets; ``density`` is not a real
        number (a bool, a string); ``rank`` is not an int.
    """
    if not isinstance(method, str) or method not in COMBINE_METHODS:
        raise ValueError(f"lora.combine: method must be one of {METHODS}; got {method!r}.")
    spec = COMBINE_METHODS[method]
    tables = adapter_tables(adapter_list, "combine")
    n = len(tables)
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != (n,):
        raise ValueError(
            f"lora.combine: weights must hold one weight per adapter set ({n}); got shape "
            f"{tuple(w.shape)}."
        )
    if not isinstance(w, jax.core.Tracer):  # traced weights cannot be checked here
        bad = np.flatnonzero(~np.isfinite(np.asarray(w)))
        if bad.size:
            raise ValueError(
                "lora.combine: weights must be finite (in float32); got "
                + ", ".join(f"weights[{i}] = {np.asarray(w)[i]}" for i in bad[:5])
                + " (every factor of the result would be NaN or inf)."
            )
    if spec.prune is not None:
        if density is None:
            raise ValueError(
                f"lora.combine(method={method!r}) needs density in (0, 1] (the fraction of "
                f"entries kept); got None."
            )
        density = _DENSITY(density, f"lora.combine(method={method!r}): density")
    elif density is not None:
        raise ValueError(
            f"lora.combine: density applies to ties, dare and magnitude_prune methods only; "
            f"got density={density!r} with method={method!r}."
        )
    if spec.prune is not None and spec.prune.draws and key is None:
        raise ValueError(
            f"lora.combine(method={method!r}) draws random masks: pass key=jax.random.key(...)."
        )
    if spec.merge.elects_sign and majority_sign_method not in SIGN_ELECTIONS:
        raise ValueError(
            f"lora.combine: majority_sign_method must be one of {SIGN_METHODS}; got "
            f"{majority_sign_method!r}."
        )
    if rank is not None:
        if not spec.form.takes_rank:
            svd = tuple(m for m, s in COMBINE_METHODS.items() if s.form.takes_rank)
            raise ValueError(
                f"lora.combine: rank applies to the SVD methods {svd} only; got "
                f"rank={rank!r} with method={method!r}."
            )
        rank = integer(lo=1)(rank, "lora.combine: rank")
    if spec.form.equal_ranks:
        for path in tables[0]:
            ranks = [t[path].rank for t in tables]
            if len(set(ranks)) != 1:
                raise ValueError(
                    f"lora.combine(method={method!r}) combines the factors a and b separately, "
                    f"so all adapters need one rank at each kernel; {path!r} has ranks {ranks}. "
                    "Use 'cat' or 'svd' for adapters of different ranks."
                )
    plan = Plan(spec, rank, density, majority_sign_method)
    out = _combine_tables(tables, w, key, plan)
    extras = extra_tables(adapter_list, "combine")
    combined = combine_extras(extras, w) if any(extras) else {}
    return nest([*out.items(), *combined.items()])


@functools.partial(jax.jit, static_argnums=(3,))
def _combine_tables(
    tables: list[dict[str, LoraWeights]], w: jax.Array, key: jax.Array | None, plan: Plan
) -> dict[str, LoraWeights]:
    """The per-kernel work of `combine`, compiled once per structure and plan: the method's
    form on each kernel's adapters (per carried index), with its own key."""
    out = {}
    for p_index, path in enumerate(tables[0]):
        ws = [t[path] for t in tables]
        k = None if key is None else jax.random.fold_in(key, p_index)
        one = lambda ws, k: plan.method.form.fn(ws, w, plan, k)
        out[path] = _per_carried(one, ws, k) if ws[0].carried_axes else one(ws, k)
    return out


def _per_carried(
    one: Callable[[list[LoraWeights], jax.Array | None], LoraWeights],
    ws: list[LoraWeights],
    key: jax.Array | None,
) -> LoraWeights:
    """``one`` (the combination of one kernel's adapters) at each carried index of adapters with
    carried axes (the layers of a layered kernel, the experts of an expert kernel, or both).

    Each index's adapters are those of that index's own kernel (the ``vmap``-ed function sees a
    `LoraWeights` without carried axes, `LoraWeights.carried_slice`); random pruning draws its
    own key per index. An input's factors on the layers it does not adapt (``layers``) count as
    zeros, as its delta there is zero. The result covers the layers any input adapts (``layers``
    is their union, ``None`` if one adapts all).
    """
    w0 = ws[0]
    lead = w0.carried_shape
    n = len(lead)
    per_index = [  # the carried axes flattened to one mapped axis; layers x does not adapt: zeros
        x.carried_slice(
            a=masked_factor(x, x.a).reshape((math.prod(lead), *x.a.shape[n:])),
            b=masked_factor(x, x.b).reshape((math.prod(lead), *x.b.shape[n:])),
        )
        for x in ws
    ]
    keys = None if key is None else jax.random.split(key, math.prod(lead))
    out = jax.vmap(one, in_axes=(0, None if keys is None else 0))(per_index, keys)
    layers = [x.layers for x in ws]
    picked = None if None in layers else sorted({i for picks in layers for i in picks or ()})
    return out.replace(
        a=out.a.reshape((*lead, *out.a.shape[1:])),
        b=out.b.reshape((*lead, *out.b.shape[1:])),
        kernel_shape=tuple(w0.kernel_shape),
        in_axes=tuple(w0.in_axes),
        layer_axes=w0.layer_axes,
        expert_axes=tuple(w0.expert_axes),
        layers=None if picked is None else tuple(picked),
        layer_at=w0.layer_at,
    )
