"""Several adapters on one base: `combine` (weighted merging) and `stack` (per-example routing).

`combine` follows the meanings of PEFT's ``LoraModel.add_weighted_adapter`` (``linear``, ``cat``,
``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and the ``*_svd``
variants), defined below as formulas over the deltas ``Δᵢ = sᵢ · aᵢ @ bᵢ``; `stack` puts N adapters
of any ranks and scales into one tree of `StackedLoraWeights` that a routed forward gathers from
per example (``a[ids]``, ``b[ids]``): ``lora.wrap(f)(params, stacked, x, lora_ids=ids)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters import LoraWeights, adapter_table, layer_mask
from flax_lora._paths import describe, flatten, nest

PyTree = Any

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *DELTA_METHODS)
SIGN_METHODS = ("total", "frequency")
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------
def _tables(adapter_list: Any, fn: str, dora_ok: bool = False) -> list[dict[str, LoraWeights]]:
    """The `adapter_table` of each adapter set, checked to share paths and kernel layouts
    (DoRA adapters refused unless ``dora_ok``)."""
    if isinstance(adapter_list, Mapping) or not isinstance(adapter_list, Sequence):
        raise TypeError(
            f"lora.{fn} takes a list of adapter sets (e.g. [adapters_a, adapters_b]); got "
            f"{type(adapter_list).__name__}. For a dict of tasks pass list(tasks.values())."
        )
    if not adapter_list:
        raise ValueError(f"lora.{fn}: adapter_list is empty; pass at least one adapter set.")
    tables = [adapter_table(ad) for ad in adapter_list]
    dora = [f"set {i}: {p}" for i, t in enumerate(tables) for p, w in t.items() if w.m is not None]
    if dora and not dora_ok:  # m / ||W0 + delta|| does not combine linearly
        raise ValueError(
            f"lora.{fn} does not support DoRA adapters (with a magnitude m), found at "
            f"{describe(dora)}: a DoRA kernel m * V / ||V|| is not linear in the adapters. "
            "Merge each DoRA adapter into its own params (lora.merge) instead."
        )
    first = tables[0]
    if not first:
        raise ValueError(f"lora.{fn}: adapter set 0 holds no adapters.")
    for i, table in enumerate(tables[1:], start=1):
        missing = [p for p in first if p not in table]
        extra = [p for p in table if p not in first]
        if missing or extra:
            raise ValueError(
                f"lora.{fn}: all adapter sets must adapt the same kernels. Adapter set {i} lacks "
                f"{describe(missing)} and has extra {describe(extra)} compared with set 0."
            )
        for path, w in table.items():
            w0 = first[path]
            for field in ("kernel_shape", "layer_axes", "in_axes", "kind"):
                if getattr(w, field) != getattr(w0, field):
                    raise ValueError(
                        f"lora.{fn}: adapters for {path!r} disagree on {field}: set 0 has "
                        f"{getattr(w0, field)!r}, set {i} has {getattr(w, field)!r}. Were they "
                        "made for different models?"
                    )
            if w.a.shape[-1] != w.b.shape[w.layer_axes]:
                raise ValueError(
                    f"lora.{fn}: adapter set {i} at {path!r} has a of shape {tuple(w.a.shape)} "
                    f"and b of shape {tuple(w.b.shape)}: their ranks differ."
                )
    return tables


def _flat(w: LoraWeights) -> tuple[jax.Array, jax.Array]:
    """``a`` as an ``(prod I, r)`` and ``b`` as an ``(r, prod O)`` float32 matrix."""
    r = w.a.shape[-1]
    a = jnp.asarray(w.a, jnp.float32).reshape(math.prod(w.in_shape), r)
    b = jnp.asarray(w.b, jnp.float32).reshape(r, math.prod(w.out_shape))
    return a, b


def _dtype(ws: Sequence[LoraWeights]) -> Any:
    return jnp.result_type(*[w.a.dtype for w in ws], *[w.b.dtype for w in ws])


def _result(w0: LoraWeights, a: jax.Array, b: jax.Array, dtype: Any) -> LoraWeights:
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


def _disjoint_merge(ts: jax.Array, weights: jax.Array, sign_method: str) -> jax.Array:
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
    sign_method: str,
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


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------
def combine(
    adapter_list: Sequence[PyTree],
    weights: Sequence[float] | jax.Array,
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    key: jax.Array | None = None,
    majority_sign_method: str = "total",
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

    Adapters of kernels stacked by ``nn.scan`` / ``nnx.scan`` (`LoraWeights.layer_axes`) are
    combined layer by layer, each layer exactly as an unstacked adapter of that layer's kernel
    (the SVD per layer; dare draws a mask per layer); the result adapts the union of the inputs'
    ``layers``.

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
        for the methods without pruning).
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
        length; an unknown method; unequal ranks for a ``linear``-family method (naming the
        path); a missing or out-of-range ``density``; a missing ``key`` for dare; ``rank`` for a
        non-SVD method.
      TypeError: ``adapter_list`` is not a list of adapter sets.
    """
    if method not in METHODS:
        raise ValueError(f"lora.combine: method must be one of {METHODS}; got {method!r}.")
    tables = _tables(adapter_list, "combine")
    n = len(tables)
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != (n,):
        raise ValueError(
            f"lora.combine: weights must hold one weight per adapter set ({n}); got shape "
            f"{tuple(w.shape)}."
        )
    base = method.removesuffix("_svd")
    needs_density = base in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density:
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
    from flax_lora._extras import combine_extras

    extra_tables = _extra_tables(adapter_list)
    extras = combine_extras(extra_tables, w) if any(extra_tables) else {}
    return nest([*out.items(), *extras.items()])


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _combine_tables(
    tables: list[dict[str, LoraWeights]],
    w: jax.Array,
    key: jax.Array | None,
    method: str,
    rank: int | None,
    density: float | None,
    sign_method: str,
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

        out[path] = _per_layer(one, ws, k) if ws[0].layer_axes else one(ws, k)
    return out


def _per_layer(
    one: Callable[[list[LoraWeights], jax.Array | None], LoraWeights],
    ws: list[LoraWeights],
    key: jax.Array | None,
) -> LoraWeights:
    """``one`` (the combination of one kernel's adapters) on each layer of scan-stacked adapters.

    Each layer's adapters are those of the layer's own kernel (the ``vmap``-ed function sees an
    unstacked `LoraWeights`); random pruning draws its own key per layer. The result covers the
    layers any input adapts (``layers`` is their union, ``None`` if one adapts all).
    """
    w0 = ws[0]
    n = w0.layer_axes
    lead = tuple(w0.kernel_shape[:n])
    views = [  # the layers flattened to one mapped axis
        x.unstacked(
            n,
            a=x.a.reshape((math.prod(lead), *x.a.shape[n:])),
            b=x.b.reshape((math.prod(lead), *x.b.shape[n:])),
        )
        for x in ws
    ]
    keys = None if key is None else jax.random.split(key, math.prod(lead))
    out = jax.vmap(one, in_axes=(0, None if keys is None else 0))(views, keys)
    picked = (
        None if any(x.layers is None for x in ws) else sorted(set().union(*(x.layers for x in ws)))
    )
    return out.replace(
        a=out.a.reshape((*lead, *out.a.shape[1:])),
        b=out.b.reshape((*lead, *out.b.shape[1:])),
        kernel_shape=tuple(w0.kernel_shape),
        in_axes=tuple(w0.in_axes),
        layer_axes=n,
        layers=None if picked is None else tuple(picked),
    )


def _cat(ws: list[LoraWeights], weights: jax.Array) -> LoraWeights:
    flats = [_flat(x) for x in ws]
    a = jnp.concatenate(
        [fa * (wi * x.scale) for (fa, _), wi, x in zip(flats, weights, ws, strict=True)], -1
    )
    b = jnp.concatenate([fb for _, fb in flats], 0)
    return _result(ws[0], a, b, _dtype(ws))


def _factors(
    ws: list[LoraWeights],
    weights: jax.Array,
    method: str,
    density: float | None,
    key: jax.Array | None,
    sign_method: str,
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
    return _result(ws[0], a, b, _dtype(ws))


def _svd(
    ws: list[LoraWeights],
    weights: jax.Array,
    base: str,
    rank: int | None,
    density: float | None,
    key: jax.Array | None,
    sign_method: str,
) -> LoraWeights:
    deltas = []
    for x in ws:
        fa, fb = _flat(x)
        deltas.append(jnp.matmul(fa, fb, precision=_HIGHEST) * x.scale)
    m = _merge_tensors(base, jnp.stack(deltas), weights, density, key, sign_method)
    k = min(rank or max(x.rank for x in ws), *m.shape)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[:k])
    return _result(ws[0], u[:, :k] * root, root[:, None] * vt[:k], _dtype(ws))


# --------------------------------------------------------------------------------------------
# stack / unstack / routing
# --------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedLoraWeights:
    """N adapters of one kernel, stacked for per-example routing (made by `lora.stack`).

    Adapter ``k``'s delta is ``a[k] @ b[k]`` (no scale: each adapter's scale is folded into its
    ``b``), reshaped to the kernel's layout exactly as for `LoraWeights`. Adapters of rank
    ``rₖ < R`` are padded with zeros: ``a[k, ..., rₖ:] == 0`` and ``b[k, rₖ:] == 0``.

    A routed forward gathers per example: for ``ids`` of shape ``(B,)``, ``a[ids]`` has shape
    ``(B, *I, R)`` and ``b[ids]`` shape ``(B, R, *O)``; ``ids == -1`` (the base model) needs a zero
    update, which `gather` gives (it maps ``-1`` out of range and fills with zeros).

    For a kernel stacked by ``nn.scan`` / ``nnx.scan`` (``layer_axes > 0``, kernel
    ``(*L, *rest)``) the adapter axis comes first and the layer axes next: ``a`` has shape
    ``(N, *L, *I, R)`` and ``b`` shape ``(N, *L, R, *O)``, adapter ``k``'s delta at layer ``l``
    being ``a[k, l] @ b[k, l]``. Layers an adapter does not adapt (``LoraConfig(layers=...)``)
    hold zero factors for it.

    DoRA: when some adapters carry a magnitude, ``m`` stacks them, shape ``(N, *O)``
    (``(N, *L, *O)``), and the static ``dora`` says per adapter which entries are DoRA. A plain
    adapter in the stack (``dora[k] is False``) behaves as a DoRA adapter whose magnitude is
    ``||W0 + a[k] @ b[k]||`` (its factor ``g = m / ||V||`` is 1): its ``m[k]`` holds zeros and
    is not read. A routed call computes ``g`` per adapter from ``W0`` (the detached factored norm;
    zero-padded ranks leave the norm unchanged) and gathers it per example (``g = 1`` for ``-1``).

    Attributes:
      a: shape ``(N, *I, R)`` (``(N, *L, *I, R)`` for a scan-stacked kernel).
      b: shape ``(N, R, *O)`` (``(N, *L, R, *O)``), each ``b[k]`` multiplied by adapter ``k``'s
        scale.
      ranks: the original rank of each adapter (static), so ``a[k, ..., :ranks[k]]`` is its own.
      in_axes: the kernel's input axes, in order.
      kernel_shape: the shape of the adapted kernel (the whole stack for a scan-stacked one).
      kind: ``"dense"``, ``"conv"`` or ``"embed"``.
      dropout: the dropout rate of the LoRA branch (of adapter 0).
      layer_axes: the number of leading layer axes of a scan-stacked kernel (0 otherwise), as
        `LoraWeights.layer_axes`.
      m: DoRA magnitudes ``(N, *O)`` (``(N, *L, *O)``), zeros for plain adapters; ``None`` (no
        leaf) when no stacked adapter is DoRA.
      dora: static, with ``m``: per adapter ``False`` (plain LoRA), ``True`` (DoRA) or, for a
        scan-stacked DoRA adapter adapted on some layers only, the tuple of its ``layers``
        (the other layers behave as plain: ``g = 1``); ``None`` without ``m``.
    """

    a: Any
    b: Any
    ranks: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    in_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kernel_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kind: str = dataclasses.field(default="dense", metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    layer_axes: int = dataclasses.field(default=0, metadata=dict(static=True))
    m: Any = None
    dora: tuple[bool | tuple[int, ...], ...] | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )

    stacked = True  # class attribute: an unmistakable marker for code that dispatches on it

    def dora_keep(self) -> np.ndarray:
        """Where ``m`` is read: a boolean array ``(N, *L)``, True for DoRA adapters (on the
        layers they adapt), False for plain ones (their ``g`` is 1)."""
        n, lead = self.num_adapters, self.layer_shape
        keep = np.zeros((n, *lead), bool)
        for k, d in enumerate(self.dora or (False,) * n):
            if d is True:
                keep[k] = True
            elif d is not False:  # picked positions on the first layer axis
                keep[k, np.asarray(d, int)] = True
        return keep

    @property
    def num_adapters(self) -> int:
        """``N``, the number of stacked adapters."""
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """The padded rank ``R``."""
        return int(self.a.shape[-1])

    @property
    def out_axes(self) -> tuple[int, ...]:
        """The kernel's output axes (neither input nor layer axes), in order."""
        return tuple(
            i for i in range(self.layer_axes, len(self.kernel_shape)) if i not in self.in_axes
        )

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The sizes of the leading layer axes of a scan-stacked kernel (``()`` otherwise)."""
        return tuple(self.kernel_shape[: self.layer_axes])

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The sizes of the kernel's input axes ``I``."""
        return tuple(self.kernel_shape[i] for i in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The sizes of the kernel's output axes ``O``."""
        return tuple(self.kernel_shape[i] for i in self.out_axes)

    def replace(self, **changes: Any) -> StackedLoraWeights:
        """A copy with the given fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


def is_stacked(x: Any) -> bool:
    return isinstance(x, StackedLoraWeights)


def stacked_table(stacked: PyTree) -> dict[str, StackedLoraWeights]:
    """Maps each adapted kernel's path to its `StackedLoraWeights`.

    Raises:
      TypeError: ``stacked`` holds anything besides `StackedLoraWeights` (e.g. plain adapters).
    """
    from flax_lora._extras import STACKED_TYPES, is_extra

    table = flatten(
        stacked, is_leaf=lambda x: is_stacked(x) or isinstance(x, LoraWeights) or is_extra(x)
    )
    extras = [p for p, v in table.items() if isinstance(v, STACKED_TYPES)]
    table = {p: v for p, v in table.items() if p not in extras}
    stray = [p for p, v in table.items() if not is_stacked(v) and v is not None]
    if stray or not (table or extras):
        raise TypeError(
            "Expected a stacked adapter tree as returned by lora.stack (StackedLoraWeights "
            f"entries only); found other entries at {describe(stray)}. Stack adapter sets with "
            "lora.stack([adapters_0, adapters_1, ...])."
        )
    return {p: v for p, v in table.items() if v is not None}


def num_stacked(stacked: PyTree) -> int:
    """``N``, the number of adapters of a stacked tree (from its factors or trained copies)."""
    from flax_lora._extras import StackedCopy, split

    table = stacked_table(stacked)
    if table:
        return next(iter(table.values())).num_adapters
    node = next(iter(split(stacked, is_stacked)[1].values()))
    return int((node.values if isinstance(node, StackedCopy) else node.delta).shape[0])


def _extra_tables(adapter_list: Sequence[PyTree]) -> list[dict[str, Any]]:
    """The trained copies / token deltas (`flax_lora._extras`) of each adapter set."""
    from flax_lora._extras import split

    return [split(ad, lambda x: isinstance(x, LoraWeights))[1] for ad in adapter_list]


def stack(adapter_list: Sequence[PyTree]) -> PyTree:
    """Stacks N adapter sets of one model into one tree for per-example routing.

    Each kernel's `LoraWeights` become one `StackedLoraWeights` with ``a`` of shape
    ``(N, *I, R)`` and ``b`` of shape ``(N, R, *O)``, ``R`` the largest rank: smaller ranks are
    padded with zeros, and each adapter's scale is folded into its ``b``, so adapter ``k``'s
    delta is exactly ``a[k] @ b[k]`` whatever the ranks and scales (rsLoRA included).

    Trained copies (``modules_to_save``, trained biases) and token deltas stack too (each
    adapter its own head: `flax_lora._extras.StackedCopy`, `StackedTokenDelta` on the union of
    the token rows); every set must hold them at the same paths. A routed call with them runs
    each example as a batch of one (see `lora.wrap`).

    Adapters of kernels stacked by ``nn.scan`` / ``nnx.scan`` (`LoraWeights.layer_axes`) stack
    with the adapter axis first and the layer axes next: ``a`` ``(N, *L, *I, R)``, ``b``
    ``(N, *L, R, *O)``; layers an adapter does not adapt (``LoraConfig(layers=...)``) get zero
    factors for it. A routed call slices them per layer inside the scan, keeping the per-example
    axis, so each layer's uses are routed as in an unstacked model.

    DoRA adapters (with a magnitude ``m``) stack too, mixed with plain ones in any order: the
    magnitudes go to `StackedLoraWeights.m` (zeros for plain adapters, flagged by
    `StackedLoraWeights.dora`), and a routed call scales example ``j``'s output at each DoRA
    kernel by ``g = m / ||W0 + a @ b||`` of its adapter (1 for plain adapters and ``-1``).

    Example:
      >>> stacked = lora.stack([adapters_a, adapters_b, adapters_c])
      >>> y = lora.wrap(model.apply)(params, stacked, x, lora_ids=jnp.array([0, 2, -1, 1]))
      >>> lora.unstack(stacked, 1)  # adapters_b again (scale folded into b)

    Args:
      adapter_list: adapter sets of the same model that adapt the same kernels with the same
        layouts (any ranks, scales and dtypes).

    Returns:
      Nested dicts with the same structure as the inputs, each entry a `StackedLoraWeights`, in
      the inputs' promoted dtype.

    Raises:
      ValueError: the adapter sets adapt different kernels or disagree on a kernel's shape,
        input axes, kind, layer axes or dropout rate (naming the path).
      TypeError: ``adapter_list`` is not a list of adapter sets.
    """
    tables = _tables(adapter_list, "stack", dora_ok=True)
    for path in tables[0]:
        rates = [float(t[path].dropout) for t in tables]
        if len(set(rates)) > 1:
            raise ValueError(
                f"lora.stack: the adapters for {path!r} have different dropout rates {rates}; "
                "a routed call applies one rate per kernel. Give them one rate (e.g. "
                "w.replace(dropout=...)) before stacking."
            )
    from flax_lora._extras import stack_extras

    extras = stack_extras(_extra_tables(adapter_list), "stack")
    return nest([*_stack_tables(tables).items(), *extras.items()])


@jax.jit
def _stack_tables(tables: list[dict[str, LoraWeights]]) -> dict[str, StackedLoraWeights]:
    out = {}
    for path, w0 in tables[0].items():
        ws = [t[path] for t in tables]
        dtype = _dtype(ws)
        r_max = max(x.rank for x in ws)
        a_list, b_list = [], []
        n = w0.layer_axes  # scan-stacked: (*L, *I, r) and (*L, r, *O)
        for x in ws:
            pad = r_max - x.rank
            a = jnp.pad(x.a, [(0, 0)] * (x.a.ndim - 1) + [(0, pad)])
            b = x.b.astype(jnp.promote_types(x.b.dtype, jnp.float32)) * x.scale
            b = jnp.pad(b, [(0, 0)] * n + [(0, pad)] + [(0, 0)] * (x.b.ndim - n - 1))
            mask = layer_mask(x)
            if mask is not None:  # layers this adapter does not adapt: zero factors
                a = a * jnp.asarray(mask, a.dtype).reshape(mask.shape + (1,) * (a.ndim - 1))
                b = b * jnp.asarray(mask, b.dtype).reshape(mask.shape + (1,) * (b.ndim - 1))
            a_list.append(a.astype(dtype))
            b_list.append(b.astype(dtype))
        m, dora = None, None
        if any(x.m is not None for x in ws):  # DoRA: plain adapters get zeros, flagged False
            m_dtype = jnp.result_type(*[x.m.dtype for x in ws if x.m is not None])
            m_shape = (*w0.layer_shape, *w0.out_shape)
            m = jnp.stack(
                [jnp.zeros(m_shape, m_dtype) if x.m is None else x.m.astype(m_dtype) for x in ws]
            )
            dora = tuple(
                x.m is not None and (x.layers is None or not n or tuple(x.layers)) for x in ws
            )
        out[path] = StackedLoraWeights(
            a=jnp.stack(a_list),
            b=jnp.stack(b_list),
            ranks=tuple(x.rank for x in ws),
            in_axes=w0.in_axes,
            kernel_shape=w0.kernel_shape,
            kind=w0.kind,
            dropout=w0.dropout,
            layer_axes=n,
            m=m,
            dora=dora,
        )
    return out


def unstack(stacked: PyTree, index: int) -> PyTree:
    """Adapter set ``index`` of a stacked tree, as ordinary adapters.

    The padding is cut off (each kernel gets its original rank back) and the scale stays folded
    into ``b``: the result has scale 1 and the same delta as the original adapter (to one
    rounding of ``b * scale`` in the factors' dtype). A scan-stacked adapter comes back with its
    layer axes and ``layers=None``: layers the original did not adapt hold zero factors. A DoRA
    adapter comes back with its ``m`` (and, scan-stacked, its ``layers``, which DoRA needs).

    Example:
      >>> adapters_b = lora.unstack(lora.stack([adapters_a, adapters_b]), 1)

    Args:
      stacked: a tree from `lora.stack`.
      index: which adapter set, ``0 <= index < N`` (negative counts from the end).

    Returns:
      Nested dicts of `LoraWeights`.

    Raises:
      ValueError: ``index`` is out of range.
    """
    from flax_lora._extras import split, unstack_extras

    table = stacked_table(stacked)
    n = num_stacked(stacked)
    i = int(index)
    if not -n <= i < n:
        raise ValueError(f"lora.unstack: index {index} is out of range for {n} stacked adapters.")
    i %= n
    out = []
    for path, w in table.items():
        r = w.ranks[i]
        lead = (slice(None),) * w.layer_axes
        one = _one(w, w.a[i, ..., :r], w.b[(i, *lead, slice(None, r))])
        d = False if w.dora is None else w.dora[i]
        if d is not False:
            one = one.replace(m=w.m[i], layers=None if d is True else d)
        out.append((path, one))
    out += list(unstack_extras(split(stacked, is_stacked)[1], i).items())
    return nest(out)


def _one(w: StackedLoraWeights, a: Any, b: Any, m: Any = None) -> LoraWeights:
    """One adapter's `LoraWeights` (scale 1) of kernel ``w`` with factors ``a``, ``b``."""
    return LoraWeights(
        a=a,
        b=b,
        scale=1.0,
        in_axes=w.in_axes,
        kernel_shape=w.kernel_shape,
        kind=w.kind,
        dropout=w.dropout,
        m=m,
        layer_axes=w.layer_axes,
    )


def check_ids(ids: Any, num_adapters: int, batch: int | None = None) -> jax.Array:
    """Validates routing ids and returns them as an int32 array.

    Concrete ids must lie in ``[-1, num_adapters)``; traced ids cannot be checked without a host
    sync, and `gather` treats any out-of-range traced id like ``-1`` (the base model).

    Raises:
      TypeError: ``ids`` is not an integer array.
      ValueError: ``ids`` is not 1-D, its length is not ``batch``, or a concrete id is out of range.
    """
    arr = ids if isinstance(ids, jax.Array) else np.asarray(ids)
    if arr.dtype == bool or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"lora_ids must be integers (adapter indices, -1 = base); got {arr.dtype}.")
    if arr.ndim != 1:
        raise ValueError(f"lora_ids must be 1-D (one id per example); got shape {arr.shape}.")
    if batch is not None and arr.shape[0] != batch:
        raise ValueError(
            f"lora_ids has {arr.shape[0]} ids but the inputs have a batch (axis 0) of {batch}."
        )
    if not isinstance(arr, jax.core.Tracer):
        host = np.asarray(arr)
        bad = host[(host < -1) | (host >= num_adapters)]
        if bad.size:
            raise ValueError(
                f"lora_ids must lie in [-1, {num_adapters}) for {num_adapters} stacked adapters "
                f"(-1 = base model); got {sorted(set(bad.tolist()))}."
            )
    return jnp.asarray(arr, jnp.int32)


def gather(w: StackedLoraWeights, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example factors: ``(a[ids], b[ids])`` with zeros where ``ids == -1``.

    For ``ids`` of shape ``(B,)`` returns ``a`` of shape ``(B, *I, R)`` and ``b`` of shape
    ``(B, R, *O)`` (``(B, *L, *I, R)`` and ``(B, *L, R, *O)`` for a scan-stacked kernel);
    example ``j``'s delta is ``a[j] @ b[j]`` (the scale is already in ``b``).
    Ids outside ``[0, N)`` (``-1``, or out-of-range traced ids) give zero factors. A scalar id
    gives ``(*I, R)`` and ``(R, *O)``.
    """
    n = w.a.shape[0]
    idx = jnp.where(ids < 0, n, ids)
    a = jnp.take(w.a, idx, axis=0, mode="fill", fill_value=0)
    b = jnp.take(w.b, idx, axis=0, mode="fill", fill_value=0)
    return a, b


def select(stacked: PyTree, index: jax.Array, params: PyTree = None) -> PyTree:
    """The adapters of one (possibly traced) index as ordinary adapters; ``-1`` gives zeros.

    Unlike `unstack`, the padded rank ``R`` is kept, so this works with a traced ``index``.
    A kernel whose stack holds DoRA adapters comes back as a DoRA adapter whatever ``index``
    is, with the magnitude that gives the indexed adapter's kernel (``||W0 + a @ b||``, so
    ``g = 1``, for a plain adapter or ``-1``): that needs the base ``params``.

    Raises:
      ValueError: a DoRA stack without ``params``, or a DoRA kernel missing from them.
    """
    from flax_lora._stack_dora import gather_dora

    kernels = None if params is None else flatten(params)
    out = []
    for path, w in stacked_table(stacked).items():
        a, b = gather(w, index)
        m = None
        if w.m is not None:
            if kernels is None or path not in kernels:
                raise ValueError(
                    f"select: the stacked adapters for {path!r} include DoRA ones, whose "
                    "magnitude depends on the base kernel; pass params holding that kernel."
                )
            m = gather_dora(w, kernels[path], jnp.asarray(index, jnp.int32))[1]
        out.append((path, _one(w, a, b, m)))
    from flax_lora._extras import select_extras, split

    out += list(select_extras(split(stacked, is_stacked)[1], index, params).items())
    return nest(out)
