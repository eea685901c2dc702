"""`lora.combine`: several adapter sets of one model combined into one by weights.

The methods follow the meanings of PEFT's ``LoraModel.add_weighted_adapter`` (``linear``,
``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and the ``*_svd``
variants), defined in `combine` as formulas over the deltas ``Δᵢ = sᵢ · aᵢ @ bᵢ``: the
``linear`` family combines the factors ``a`` and ``b`` separately, ``cat`` is exact, and the SVD
methods approximate the combined delta at a chosen rank. PEFT's ``merge_utils`` rules (pruning,
TIES' sign election) are written here over a stack of task tensors ``(N, ...)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._delta import masked_factor
from flax_lora._adapters._tables import adapter_tables, extra_tables
from flax_lora._adapters._weights import LoraWeights, factor_dtype
from flax_lora._multi._stack_extras import combine_extras
from flax_lora._paths import nest
from flax_lora._typing import PyTree

FactorMethod = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
"""Methods that combine the factors ``a`` and ``b`` separately (equal ranks per kernel)."""
DeltaMethod = Literal["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
"""Methods that combine the deltas, then take a rank-``rank`` SVD."""
Method = Literal["cat", FactorMethod, DeltaMethod]
"""`combine`'s ``method``."""
SignMethod = Literal["total", "frequency"]
"""How TIES elects the sign of each entry (PEFT's ``majority_sign_method``)."""

FACTOR_METHODS: tuple[str, ...] = get_args(FactorMethod)
DELTA_METHODS: tuple[str, ...] = get_args(DeltaMethod)
METHODS: tuple[str, ...] = get_args(Method)
SIGN_METHODS: tuple[str, ...] = get_args(SignMethod)
_HIGHEST = jax.lax.Precision.HIGHEST


def _flat(w: LoraWeights) -> tuple[jax.Array, jax.Array]:
    """``a`` as an ``(prod I, r)`` and ``b`` as an ``(r, prod O)`` float32 matrix."""
    r = w.a.shape[-1]
    a = jnp.asarray(w.a, jnp.float32).reshape(math.prod(w.in_shape), r)
    b = jnp.asarray(w.b, jnp.float32).reshape(r, math.prod(w.out_shape))
    return a, b


def _result(
    w0: LoraWeights, a: jax.Array, b: jax.Array, dtype: jax.typing.DTypeLike
) -> LoraWeights:
    """A `LoraWeights` like ``w0`` from flat factors, with scale 1 (the factors carry it)."""
    r = a.shape[-1]
    return w0.replace(
        a=a.reshape((*w0.in_shape, r)).astype(dtype),
        b=b.reshape((r, *w0.out_shape)).astype(dtype),
        scale=1.0,
    )


# --------------------------------------------------------------------------------------------
# PEFT's merge utilities (peft/utils/merge_utils.py) on a stack of task tensors (N, ...)
# --------------------------------------------------------------------------------------------
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


def _magnitude_prune(ts: jax.Array, density: float) -> jax.Array:
    return jnp.stack([_magnitude_prune_one(t, density) for t in ts])


def _random_prune(ts: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: keeps each entry with probability ``density`` and rescales kept ones by 1/density."""
    if density >= 1.0:
        return ts
    keep = jax.random.bernoulli(key, density, ts.shape)
    return jnp.where(keep, ts / density, 0.0)


def _weighted_sum(ts: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.tensordot(weights, ts, axes=1, precision=_HIGHEST)


def _disjoint_merge(ts: jax.Array, weights: jax.Array, sign_method: SignMethod) -> jax.Array:
    """TIES' sign election on the (unweighted) task tensors, then the mean of agreeing entries."""
    signs = jnp.sign(ts)
    magnitude = ts.sum(0) if sign_method == "total" else signs.sum(0)
    majority = jnp.where(magnitude >= 0, 1.0, -1.0)
    agree = (signs == majority).astype(ts.dtype)
    w = weights.reshape((-1,) + (1,) * (ts.ndim - 1))
    return (ts * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)


def _merge_tensors(
    method: str,
    ts: jax.Array,
    weights: jax.Array,
    density: float | None,
    key: jax.Array | None,
    sign_method: SignMethod,
) -> jax.Array:
    """PEFT's rule ``method`` (no ``_svd`` suffix) over task tensors ``ts`` of shape (N, ...)."""
    if method in ("linear", "svd"):
        return _weighted_sum(ts, weights)
    assert density is not None
    if method == "magnitude_prune":
        return _weighted_sum(_magnitude_prune(ts, density), weights)
    if method == "ties":
        return _disjoint_merge(_magnitude_prune(ts, density), weights, sign_method)
    assert key is not None
    pruned = _random_prune(ts, density, key)
    if method == "dare_linear":
        return _weighted_sum(pruned, weights)
    if method == "dare_ties":
        return _disjoint_merge(pruned, weights, sign_method)
    raise AssertionError(method)


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

    With ``Δᵢ = sᵢ · aᵢ @ bᵢ`` the delta of adapter ``i`` at a kernel (``aᵢ`` as a
    ``(prod I, rᵢ)`` matrix, ``bᵢ`` as ``(rᵢ, prod O)``, ``sᵢ`` its scale) and ``wᵢ`` its weight
    (weights may be negative), the combined adapter at that kernel has delta ``Δ = a @ b`` (its
    scale is 1; the scales of the inputs, rsLoRA's included, are folded into the factors):

    - ``"cat"``: exactly ``Δ = Σᵢ wᵢ Δᵢ``. ``a = [w₁s₁a₁ | w₂s₂a₂ | ...]`` (concatenated along
      the rank axis), ``b = [b₁; b₂; ...]``; rank ``Σᵢ rᵢ``; any ranks.
    - ``"svd"``: the best rank-``rank`` approximation (Frobenius and spectral norm) of
      ``M = Σᵢ wᵢ Δᵢ``, from the SVD ``M = U S Vᵀ`` computed in float32 on the ``(prod I, prod O)``
      matrix: ``a = U[:, :k] √S[:k]``, ``b = √S[:k] Vᵀ[:k]``, ``k = min(rank, prod I, prod O)``.
      Exact when ``k`` reaches the rank of ``M`` (e.g. ``rank >= Σᵢ rᵢ``). Default ``rank``: the
      largest input rank at that kernel. Works for any kernel (Dense, DenseGeneral, Embed, Conv
      of any spatial dimension).
    - ``"linear"`` (PEFT's, a cheap approximation): the factors are combined separately,
      ``a = Σᵢ σᵢ √|wᵢsᵢ| aᵢ`` and ``b = Σᵢ √|wᵢsᵢ| bᵢ`` with ``σᵢ = sign(wᵢsᵢ)``, so
      ``Δ = (Σᵢ σᵢ√|wᵢsᵢ| aᵢ)(Σⱼ √|wⱼsⱼ| bⱼ)``, which holds cross terms ``aᵢbⱼ`` (i ≠ j); for a
      single adapter ``Δ = w Δ₁`` exactly. All ranks must be equal (per kernel).
    - ``"magnitude_prune"``, ``"ties"`` (TIES-Merging, Yadav et al. 2023,
      arXiv:2306.01708), ``"dare_linear"``, ``"dare_ties"`` (DARE, Yu et al. 2023,
      arXiv:2311.03099): as ``"linear"``
      (same factor weights ``σᵢ√|wᵢsᵢ|`` for ``a``, ``√|wᵢsᵢ|`` for ``b``), but each factor
      ``F`` (``a``, then ``b``) is merged with PEFT's ``merge_utils`` rule ``merge({Fᵢ}, {vᵢ})``:

      * ``magnitude_prune``: ``Σᵢ vᵢ P(Fᵢ)``, where ``P`` keeps the ``int(density · size)``
        entries of largest ``|·|`` of each ``Fᵢ`` and zeroes the rest;
      * ``dare_linear``: ``Σᵢ vᵢ Rᵢ(Fᵢ)``, where ``Rᵢ`` keeps each entry with probability
        ``density`` (a Bernoulli draw from ``key``) and divides kept entries by ``density``;
      * ``ties``: ``T = P(Fᵢ)``; the elected sign per entry is ``ε = sign(Σᵢ Tᵢ)`` (``"total"``) or
        ``sign(Σᵢ sign Tᵢ)`` (``"frequency"``), with ``ε = +1`` where that sum is 0; the result is
        ``Σᵢ vᵢ Tᵢ [sign Tᵢ = ε] / max(1, Σᵢ [sign Tᵢ = ε])`` (the mean over the agreeing
        adapters; as in PEFT the election is on the unweighted ``Tᵢ``);
      * ``dare_ties``: ``ties`` with ``Tᵢ = Rᵢ(Fᵢ)``.

      ``density=1`` disables pruning, so ``dare_linear`` and ``magnitude_prune`` then equal
      ``"linear"``.
    - ``"magnitude_prune_svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``: the
      same rules applied to the deltas ``Δᵢ`` themselves with weights ``wᵢ`` (``M = merge({Δᵢ},
      {wᵢ})``), followed by the rank-``rank`` SVD as in ``"svd"``.

    Differences from PEFT: the result's scale is 1 with the factors carrying everything, so no
    scale is applied twice (peft #3111) and an rsLoRA input does not leak ``√r`` into the
    combined scale (peft #3449); the SVD runs on the ``(prod I, prod O)`` matrix, so Conv 1-D and
    3-D work (peft #3769); ``√S`` goes on each SVD factor rather than ``S`` on ``b``; ``rank``
    above ``min(prod I, prod O)`` is lowered to it (no dead zero columns); with a single adapter
    every method does what its formula says (PEFT silently switches to ``"linear"``); ranks may
    differ per kernel (PEFT's ``rank_pattern``), only ``linear``-family methods need equal ranks
    at each kernel. All adapter sets must adapt the same kernels (PEFT skips missing ones).

    Trained copies (``modules_to_save``, trained biases: `TrainedCopy`) and token deltas
    (`TokenDelta`) are combined, whatever the method, as the weighted sums ``Σᵢ wᵢ vᵢ`` of the
    copies (weights summing to 1 average the heads) and of the deltas (on the union of their
    rows); every set must hold them at the same paths.

    Adapters with carried axes (kernels stacked by ``nn.scan`` / ``nnx.scan``,
    `LoraWeights.layer_axes`; expert kernels, `LoraWeights.expert_axes`; or both) are combined
    per carried index (each layer, each expert), each exactly as the adapter of that index's own
    kernel (the SVD per index; dare draws a mask per index; magnitude pruning keeps the largest
    entries of each index); the result adapts the union of the inputs' ``layers``.

    Example:
      >>> both = lora.combine([adapters_a, adapters_b], [0.7, 0.3], method="cat")
      >>> low = lora.combine([adapters_a, adapters_b], [1.0, -1.0], method="svd", rank=8)
      >>> dare = lora.combine([adapters_a, adapters_b], [1.0, 1.0], "dare_ties", density=0.5,
      ...                     key=jax.random.key(0))
      >>> y = lora.wrap(model.apply)(params, both, x)

    Args:
      adapter_list: adapter sets (from `lora.init`, `lora.load`, ...) of the same model, adapting
        the same kernels with the same layouts.
      weights: one weight per adapter set (floats or an array; may be negative, may be traced
        for the methods without pruning); finite in float32 (concrete weights are checked).
      method: one of ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"``, ``"magnitude_prune"``, ``"ties_svd"``, ``"dare_linear_svd"``,
        ``"dare_ties_svd"``, ``"magnitude_prune_svd"``.
      rank: the rank of the result for the SVD methods (default: the largest input rank at each
        kernel); an error for other methods.
      density: the fraction of entries kept, in (0, 1], for the ties / dare / magnitude_prune
        methods (required by them).
      key: a PRNG key, required by the dare methods (each kernel and factor draws its own mask).
      majority_sign_method: ``"total"`` or ``"frequency"``, for the ties methods.

    Returns:
      One adapter set with the same tree structure as the inputs: nested dicts of `LoraWeights`
      with scale 1, in the inputs' (promoted) dtype.

    Raises:
      ValueError: the adapter sets adapt different kernels or disagree on a kernel's shape, input
        axes, kind or layer axes (naming the path); DoRA adapters; ``weights`` has the wrong
        length or a NaN / infinite entry (naming its index); an unknown method; unequal ranks
        for a ``linear``-family method (naming the path); a missing or out-of-range
        ``density``; a missing ``key`` for dare; ``rank`` for a non-SVD method, or below 1.
      TypeError: ``adapter_list`` is not a list of adapter sets; ``density`` is a bool or a
        string.
    """
    if method not in METHODS:
        raise ValueError(f"lora.combine: method must be one of {METHODS}; got {method!r}.")
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
    base = method.removesuffix("_svd")
    needs_density = base in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density:
        if isinstance(density, bool | np.bool_ | str | bytes):
            raise TypeError(
                f"lora.combine: density must be a real number in (0, 1]; got {density!r} "
                f"({type(density).__name__})."
            )
        if density is None or not 0.0 < float(density) <= 1.0:
            raise ValueError(
                f"lora.combine(method={method!r}) needs density in (0, 1] (the fraction of "
                f"entries kept); got {density!r}."
            )
        density = float(density)
    elif density is not None:
        raise ValueError(
            f"lora.combine: density applies to ties, dare and magnitude_prune methods only; "
            f"got density={density!r} with method={method!r}."
        )
    if base.startswith("dare") and key is None:
        raise ValueError(
            f"lora.combine(method={method!r}) draws random masks: pass key=jax.random.key(...)."
        )
    if base.endswith("ties") and majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            f"lora.combine: majority_sign_method must be one of {SIGN_METHODS}; got "
            f"{majority_sign_method!r}."
        )
    if rank is not None:
        if method not in DELTA_METHODS:
            raise ValueError(
                f"lora.combine: rank applies to the SVD methods {DELTA_METHODS} only; got "
                f"rank={rank!r} with method={method!r}."
            )
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
            raise ValueError(f"lora.combine: rank must be an int >= 1; got {rank!r}.")

    if method in FACTOR_METHODS:
        for path in tables[0]:
            ranks = [t[path].rank for t in tables]
            if len(set(ranks)) != 1:
                raise ValueError(
                    f"lora.combine(method={method!r}) combines the factors a and b separately, "
                    f"so all adapters need one rank at each kernel; {path!r} has ranks {ranks}. "
                    "Use 'cat' or 'svd' for adapters of different ranks."
                )
    out = _combine_tables(tables, w, key, method, rank, density, majority_sign_method)
    extras = extra_tables(adapter_list)
    extras = combine_extras(extras, w) if any(extras) else {}
    return nest([*out.items(), *extras.items()])


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _combine_tables(
    tables: list[dict[str, LoraWeights]],
    w: jax.Array,
    key: jax.Array | None,
    method: Method,
    rank: int | None,
    density: float | None,
    sign_method: SignMethod,
) -> dict[str, LoraWeights]:
    """The per-kernel work of `combine`, compiled once per structure and method."""
    base = method.removesuffix("_svd")
    out = {}
    for p_index, path in enumerate(tables[0]):
        ws = [t[path] for t in tables]
        k = None if key is None else jax.random.fold_in(key, p_index)

        def one(ws: list[LoraWeights], k: jax.Array | None) -> LoraWeights:
            if method == "cat":
                return _cat(ws, w)
            if method in FACTOR_METHODS:
                return _factors(ws, w, method, density, k, sign_method)
            return _svd(ws, w, base, rank, density, k, sign_method)

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
    picked = (
        None if any(x.layers is None for x in ws) else sorted(set().union(*(x.layers for x in ws)))
    )
    return out.replace(
        a=out.a.reshape((*lead, *out.a.shape[1:])),
        b=out.b.reshape((*lead, *out.b.shape[1:])),
        kernel_shape=tuple(w0.kernel_shape),
        in_axes=tuple(w0.in_axes),
        layer_axes=w0.layer_axes,
        expert_axes=tuple(w0.expert_axes),
        layers=None if picked is None else tuple(picked),
    )


def _cat(ws: list[LoraWeights], weights: jax.Array) -> LoraWeights:
    flats = [_flat(x) for x in ws]
    a = jnp.concatenate(
        [fa * (wi * x.scale) for (fa, _), wi, x in zip(flats, weights, ws, strict=True)], -1
    )
    b = jnp.concatenate([fb for _, fb in flats], 0)
    return _result(ws[0], a, b, factor_dtype(ws))


def _factors(
    ws: list[LoraWeights],
    weights: jax.Array,
    method: FactorMethod,
    density: float | None,
    key: jax.Array | None,
    sign_method: SignMethod,
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
    a = _merge_tensors(method, a_stack, weights_a, density, ka, sign_method)
    b = _merge_tensors(method, b_stack, root, density, kb, sign_method)
    return _result(ws[0], a, b, factor_dtype(ws))


def _svd(
    ws: list[LoraWeights],
    weights: jax.Array,
    base: str,
    rank: int | None,
    density: float | None,
    key: jax.Array | None,
    sign_method: SignMethod,
) -> LoraWeights:
    deltas = []
    for x in ws:
        fa, fb = _flat(x)
        deltas.append(jnp.matmul(fa, fb, precision=_HIGHEST) * x.scale)
    m = _merge_tensors(base, jnp.stack(deltas), weights, density, key, sign_method)
    k = min(rank or max(x.rank for x in ws), *m.shape)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[:k])
    return _result(ws[0], u[:, :k] * root, root[:, None] * vt[:k], factor_dtype(ws))
