"""The methods of `lora.combine`, each a record of its steps in one table (`COMBINE_METHODS`).

A method is a **form** (what it combines: the factors concatenated, `CAT`; the factors ``a``
and ``b`` each merged, `FACTORS`; the deltas merged, then a rank-``rank`` SVD, `SVD`), an
optional **prune** of the task tensors (`MAGNITUDE`, or `RANDOM`: DARE) and a **merge** of them
(`SUM`, the weighted sum, or `TIES`: sign election and the mean of the agreeing entries). The
prunes and merges are PEFT's ``merge_utils`` rules (peft/utils/merge_utils.py), written here over
a stack of task tensors ``(N, ...)``; TIES elects its signs by one of `SIGN_ELECTIONS`.
What a method needs (``density``, ``key``, ``rank``, equal ranks) follows from its steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from flax_lora._adapters._delta import HIGHEST
from flax_lora._adapters._weights import LoraWeights, factor_dtype

SignMethod = Literal["total", "frequency"]
"""How TIES elects the sign of each entry (PEFT's ``majority_sign_method``)."""


# ---------------------------------------------------------------------------------------------
# PEFT's merge utilities on a stack of task tensors (N, ...)
# ---------------------------------------------------------------------------------------------
def _magnitude_prune_one(t: jax.Array, density: float) -> jax.Array:
    """Keeps the ``int(density * t.size)`` entries of largest magnitude, zeroes the rest."""
    if density >= 1.0:
        return t
    k = int(density * t.size)
    flat = t.reshape(-1)
    if k == 0:
        return jnp.zeros_like(t)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    mask = jnp.zeros(flat.shape, t.dtype).at[idx].set(1.0)
    return (flat * mask).reshape(t.shape)


def _magnitude_prune(ts: jax.Array, density: float, key: jax.Array | None) -> jax.Array:
    del key
    return jnp.stack([_magnitude_prune_one(t, density) for t in ts])


def _random_prune(ts: jax.Array, density: float, key: jax.Array | None) -> jax.Array:
    """DARE: keeps each entry with probability ``density`` and rescales kept ones by 1/density."""
    if density >= 1.0:
        return ts
    assert key is not None, "combine checks that a method that draws masks has a key"
    keep = jax.random.bernoulli(key, density, ts.shape)
    return jnp.where(keep, ts / density, 0.0)


def _weighted_sum(ts: jax.Array, weights: jax.Array, sign_method: SignMethod) -> jax.Array:
    del sign_method
    return jnp.tensordot(weights, ts, axes=1, precision=HIGHEST)


SIGN_ELECTIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "total": lambda ts, signs: ts.sum(0),
    "frequency": lambda ts, signs: signs.sum(0),
}
"""TIES' sign election, by `SignMethod`: what the elected sign per entry is the sign of, from the
task tensors and their signs (the sum of the tensors, or of their signs)."""


def _disjoint_merge(ts: jax.Array, weights: jax.Array, sign_method: SignMethod) -> jax.Array:
    """TIES' sign election on the (unweighted) task tensors, then the mean of agreeing entries."""
    signs = jnp.sign(ts)
    majority = jnp.where(SIGN_ELECTIONS[sign_method](ts, signs) >= 0, 1.0, -1.0)
    agree = (signs == majority).astype(ts.dtype)
    w = weights.reshape((-1,) + (1,) * (ts.ndim - 1))
    return (ts * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)


class Prune(NamedTuple):
    """A prune of task tensors ``(N, ...)``: ``fn(ts, density, key)``; ``draws``: it draws
    random masks (needs a key)."""

    fn: Callable[[jax.Array, float, jax.Array | None], jax.Array]
    draws: bool


class Merge(NamedTuple):
    """A merge of task tensors ``(N, ...)`` by weights: ``fn(ts, weights, sign_method)``;
    ``elects_sign``: it reads ``sign_method``."""

    fn: Callable[[jax.Array, jax.Array, SignMethod], jax.Array]
    elects_sign: bool


MAGNITUDE = Prune(_magnitude_prune, draws=False)
RANDOM = Prune(_random_prune, draws=True)
SUM = Merge(_weighted_sum, elects_sign=False)
TIES = Merge(_disjoint_merge, elects_sign=True)


# ---------------------------------------------------------------------------------------------
# the forms: one kernel's adapters combined
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """A `combine` call's static choices: the method and its options (a `jax.jit` static)."""

    method: CombineMethod
    rank: int | None
    density: float | None
    sign_method: SignMethod

    def merge_tensors(self, ts: jax.Array, weights: jax.Array, key: jax.Array | None) -> jax.Array:
        """The method's prune (if any), then its merge, of task tensors ``ts`` ``(N, ...)``."""
        prune = self.method.prune
        if prune is not None:
            assert self.density is not None, "combine checks that a pruning method has a density"
            ts = prune.fn(ts, self.density, key)
        return self.method.merge.fn(ts, weights, self.sign_method)


def _flat(w: LoraWeights) -> tuple[jax.Array, jax.Array]:
    """``a`` as an ``(prod I, r)`` and ``b`` as an ``(r, prod O)`` float32 matrix."""
    r = w.a.shape[-1]
    a = jnp.asarray(w.a, jnp.float32).reshape(math.prod(w.in_shape), r)
    b = jnp.asarray(w.b, jnp.float32).reshape(r, math.prod(w.out_shape))
    return a, b


def _result(ws: list[LoraWeights], a: jax.Array, b: jax.Array) -> LoraWeights:
    """A `LoraWeights` like ``ws[0]`` from flat factors in the inputs' promoted dtype, with
    scale 1 (the factors carry it)."""
    w0, dtype, r = ws[0], factor_dtype(ws), a.shape[-1]
    return w0.replace(
        a=a.reshape((*w0.in_shape, r)).astype(dtype),
        b=b.reshape((r, *w0.out_shape)).astype(dtype),
        scale=1.0,
    )


def _cat(
    ws: list[LoraWeights], weights: jax.Array, plan: Plan, key: jax.Array | None
) -> LoraWeights:
    del plan, key
    flats = [_flat(x) for x in ws]
    a = jnp.concatenate(
        [fa * (wi * x.scale) for (fa, _), wi, x in zip(flats, weights, ws, strict=True)], -1
    )
    b = jnp.concatenate([fb for _, fb in flats], 0)
    return _result(ws, a, b)


def _factors(
    ws: list[LoraWeights], weights: jax.Array, plan: Plan, key: jax.Array | None
) -> LoraWeights:
    ws_scaled = weights * jnp.asarray([x.scale for x in ws], jnp.float32)
    root = jnp.sqrt(jnp.abs(ws_scaled))
    weights_a = jnp.where(ws_scaled >= 0, 1.0, -1.0) * root
    flats = [_flat(x) for x in ws]
    a_stack = jnp.stack([fa for fa, _ in flats])
    b_stack = jnp.stack([fb for _, fb in flats])
    ka = kb = None
    if key is not None:
        ka, kb = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    a = plan.merge_tensors(a_stack, weights_a, ka)
    b = plan.merge_tensors(b_stack, root, kb)
    return _result(ws, a, b)


def _svd(
    ws: list[LoraWeights], weights: jax.Array, plan: Plan, key: jax.Array | None
) -> LoraWeights:
    deltas = []
    for x in ws:
        fa, fb = _flat(x)
        deltas.append(jnp.matmul(fa, fb, precision=HIGHEST) * x.scale)
    m = plan.merge_tensors(jnp.stack(deltas), weights, key)
    k = min(plan.rank or max(x.rank for x in ws), *m.shape)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[:k])
    return _result(ws, u[:, :k] * root, root[:, None] * vt[:k])


class Form(NamedTuple):
    """What a method combines: ``fn(ws, weights, plan, key)``, one kernel's adapters into one;
    ``takes_rank``: the result's rank is ``rank``; ``equal_ranks``: the inputs need one rank."""

    fn: Callable[[list[LoraWeights], jax.Array, Plan, jax.Array | None], LoraWeights]
    takes_rank: bool
    equal_ranks: bool


CAT = Form(_cat, takes_rank=False, equal_ranks=False)
"""The factors concatenated along the rank axis: exact, any ranks."""
FACTORS = Form(_factors, takes_rank=False, equal_ranks=True)
"""``a`` and ``b`` each merged, with weights ``σᵢ√|wᵢsᵢ|`` and ``√|wᵢsᵢ|`` (PEFT's ``linear``)."""
SVD = Form(_svd, takes_rank=True, equal_ranks=False)
"""The deltas ``sᵢ aᵢ @ bᵢ`` merged, then the best rank-``rank`` approximation (an SVD)."""


@dataclasses.dataclass(frozen=True)
class CombineMethod:
    """A `combine` method as its steps: its form, its prune (``None``: none) and its merge."""

    form: Form
    prune: Prune | None = None
    merge: Merge = SUM


COMBINE_METHODS: dict[str, CombineMethod] = {
    "cat": CombineMethod(CAT),
    "linear": CombineMethod(FACTORS),
    "ties": CombineMethod(FACTORS, MAGNITUDE, TIES),
    "dare_linear": CombineMethod(FACTORS, RANDOM),
    "dare_ties": CombineMethod(FACTORS, RANDOM, TIES),
    "magnitude_prune": CombineMethod(FACTORS, MAGNITUDE),
    "svd": CombineMethod(SVD),
    "ties_svd": CombineMethod(SVD, MAGNITUDE, TIES),
    "dare_linear_svd": CombineMethod(SVD, RANDOM),
    "dare_ties_svd": CombineMethod(SVD, RANDOM, TIES),
    "magnitude_prune_svd": CombineMethod(SVD, MAGNITUDE),
}
"""`lora.combine`'s ``method`` -> its steps (the names and meanings of PEFT's
``add_weighted_adapter``)."""
