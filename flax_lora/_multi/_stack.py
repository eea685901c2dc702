"""Adapter stacks for per-example routing: `lora.stack`, `lora.unstack`, and what a routed call
reads from a stack: `num_stacked`, `check_ids`, `gather` (per-example factors), `gather_dora`
(per-example DoRA factors) and `select` (one, possibly traced, index as ordinary adapters). A
stack's table is `flax_lora._adapters._tables.stacked_table`.

`stack` puts N adapter sets of any ranks and scales into one tree of `StackedLoraWeights`, the
adapter axis leading their factors (``a (N, *C, *I, R)``, ``b (N, *C, R, *O)``); a routed
forward gathers from it per example (``a[ids]``, ``b[ids]``):
``lora.wrap(f)(params, stacked, x, lora_ids=ids)``.

DoRA in a stack: a `StackedLoraWeights` with DoRA holds the magnitudes ``m`` ``(N, *C, *O)`` and
the static flags `StackedLoraWeights.dora`. For routing, ``g = m / ||V||`` of every stacked
adapter is computed once per call from the base kernel and the stacked factors (the factored
norm of `flax_lora._adapters._dora`, mapped over the adapters and the carried axes, layers and
experts: no kernel-sized array per adapter), plus one row for the base model (``ids == -1``:
zero factors, ``g = 1``), then gathered per example. A plain adapter's ``g`` is 1, i.e. it behaves
as a DoRA adapter whose magnitude is ``||W0 + a @ b||``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from flax_lora._adapters._delta import masked_factor
from flax_lora._adapters._dora import layered_factor
from flax_lora._adapters._extras import Extra
from flax_lora._adapters._tables import adapter_tables, extra_tables, split_stacked, stacked_table
from flax_lora._adapters._weights import LoraWeights, StackedLoraWeights, factor_dtype
from flax_lora._multi._stack_extras import select_extras, stack_extras, unstack_extras
from flax_lora._paths import flatten, nest
from flax_lora._typing import PyTree


def num_stacked(stacked: PyTree) -> int:
    """``N``, the number of adapters of a stacked tree (from its factors or trained copies)."""
    table = stacked_table(stacked)
    if table:
        return next(iter(table.values())).num_adapters
    return next(iter(split_stacked(stacked)[1].values())).num_adapters


def stack(adapter_list: Sequence[PyTree]) -> PyTree:
    """Stacks N adapter sets of one model into one tree for per-example routing.

    Each kernel's `LoraWeights` become one `StackedLoraWeights` with ``a`` of shape
    ``(N, *C, *I, R)`` and ``b`` of shape ``(N, *C, R, *O)`` (``C`` the carried layer and expert
    axes, ``R`` the largest rank): smaller ranks are padded with zeros, and each adapter's scale
    is folded into its ``b``, so adapter ``k``'s delta is exactly ``a[k] @ b[k]`` whatever the
    ranks and scales (rsLoRA included). Layers an adapter does not adapt get zero factors for
    it. DoRA adapters stack too, mixed with plain ones (`StackedLoraWeights.m`), and so do
    trained copies and token deltas (each adapter its own head); every set must hold them at
    the same paths. Guide: `docs/guides/multi_adapter.md`.

    Sharp edge: a routed call on a stack holding trained copies or token deltas runs each
    example as a batch of one (layers that mix examples then see one example).

    Examples:
      >>> model, x = nn.Dense(4), jnp.ones((4, 3))
      >>> params, config = model.init(jax.random.key(0), x), lora.LoraConfig(rank=2, init="random")
      >>> sets = [lora.init(jax.random.key(i), params, config) for i in (1, 2, 3)]
      >>> stacked, fn = lora.stack(sets), lora.wrap(model.apply)
      >>> y = fn(params, stacked, x, lora_ids=jnp.array([0, 2, -1, 1]))  # -1: the base
      >>> bool(jnp.allclose(y[1], fn(params, sets[2], x)[1], atol=1e-5))
      True
      >>> again = lora.unstack(stacked, 1)  # sets[1], its scale folded into b

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
    tables = adapter_tables(adapter_list, "stack", dora_ok=True)
    for path in tables[0]:
        rates = [float(t[path].dropout) for t in tables]
        if len(set(rates)) > 1:
            raise ValueError(
                f"lora.stack: the adapters for {path!r} have different dropout rates {rates}; "
                "a routed call applies one rate per kernel. Give them one rate (e.g. "
                "w.replace(dropout=...)) before stacking."
            )
    extras = stack_extras(extra_tables(adapter_list, "stack"), "stack")
    return nest([*_stack_tables(tables).items(), *extras.items()])


@jax.jit
def _stack_tables(tables: list[dict[str, LoraWeights]]) -> dict[str, StackedLoraWeights]:
    out = {}
    for path, w0 in tables[0].items():
        ws = [t[path] for t in tables]
        dtype = factor_dtype(ws)
        r_max = max(x.rank for x in ws)
        a_list, b_list = [], []
        n = len(w0.carried_axes)  # (*C, *I, r) and (*C, r, *O)
        for x in ws:
            pad = r_max - x.rank
            a = jnp.pad(x.a, [(0, 0)] * (x.a.ndim - 1) + [(0, pad)])
            b = x.b.astype(jnp.promote_types(x.b.dtype, jnp.float32)) * x.scale
            b = jnp.pad(b, [(0, 0)] * n + [(0, pad)] + [(0, 0)] * (x.b.ndim - n - 1))
            # layers this adapter does not adapt: zero factors
            a_list.append(masked_factor(x, a).astype(dtype))
            b_list.append(masked_factor(x, b).astype(dtype))
        m, dora = None, None
        if any(x.m is not None for x in ws):  # DoRA: plain adapters get zeros, flagged False
            m_dtype = jnp.result_type(*[x.m.dtype for x in ws if x.m is not None])
            m_shape = (*w0.carried_shape, *w0.out_shape)
            m = jnp.stack(
                [jnp.zeros(m_shape, m_dtype) if x.m is None else x.m.astype(m_dtype) for x in ws]
            )
            dora = tuple(
                x.m is not None and (x.layers is None or not x.layer_axes or tuple(x.layers))
                for x in ws
            )
        out[path] = StackedLoraWeights(
            a=jnp.stack(a_list),
            b=jnp.stack(b_list),
            ranks=tuple(x.rank for x in ws),
            in_axes=w0.in_axes,
            kernel_shape=w0.kernel_shape,
            kind=w0.kind,
            dropout=w0.dropout,
            layer_axes=w0.layer_axes,
            expert_axes=w0.expert_axes,
            m=m,
            dora=dora,
            layer_at=w0.layer_at,
        )
    return out


def unstack(stacked: PyTree, index: int) -> PyTree:
    """Adapter set ``index`` of a stacked tree, as ordinary adapters.

    The padding is cut off (each kernel gets its original rank back) and the scale stays folded
    into ``b``: the result has scale 1 and the same delta as the original adapter (to one
    rounding of ``b * scale`` in the factors' dtype). A layered adapter comes back with its
    layer axes and ``layers=None``: layers the original did not adapt hold zero factors. A DoRA
    adapter comes back with its ``m`` (and, layered, its ``layers``, which DoRA needs).

    Examples:
      >>> params, config = {"kernel": jnp.ones((3, 4))}, lora.LoraConfig(rank=2, init="random")
      >>> sets = [lora.init(jax.random.key(i), params, config) for i in (0, 1)]
      >>> w = lora.unstack(lora.stack(sets), 1)["kernel"]  # sets[1], its scale folded into b
      >>> w.scale, bool(jnp.allclose(lora.delta(w), lora.delta(sets[1]["kernel"]), atol=1e-6))
      (1.0, True)

    Args:
      stacked: a tree from `lora.stack`.
      index: which adapter set, ``0 <= index < N`` (negative counts from the end).

    Returns:
      Nested dicts of `LoraWeights`.

    Raises:
      ValueError: ``index`` is out of range.
      TypeError: ``index`` is not an integer (a float such as 1.5 is not rounded).
    """
    table = stacked_table(stacked)
    n = num_stacked(stacked)
    integral = isinstance(index, int | np.integer) or (
        isinstance(index, np.ndarray | jax.Array)
        and index.ndim == 0
        and jnp.issubdtype(index.dtype, jnp.integer)
    )
    if isinstance(index, bool | np.bool_) or not integral:
        raise TypeError(
            f"lora.unstack: index must be an int in [-{n}, {n}); got {index!r} "
            f"({type(index).__name__})."
        )
    i = int(index)
    if not -n <= i < n:
        raise ValueError(f"lora.unstack: index {index} is out of range for {n} stacked adapters.")
    i %= n
    out: list[tuple[str, LoraWeights | Extra]] = []
    for path, w in table.items():
        r = w.ranks[i]
        lead = (slice(None),) * len(w.carried_axes)
        one = w.entry(w.a[i, ..., :r], w.b[(i, *lead, slice(None, r))])
        d = False if w.dora is None or w.m is None else w.dora[i]
        if d is not False and w.m is not None:
            one = one.replace(m=w.m[i], layers=None if d is True else d)
        out.append((path, one))
    out += list(unstack_extras(split_stacked(stacked)[1], i).items())
    return nest(out)


def check_ids(
    ids: ArrayLike | Sequence[int], num_adapters: int, batch: int | None = None
) -> jax.Array:
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
    ``(B, R, *O)`` (``(B, *C, *I, R)`` and ``(B, *C, R, *O)`` with carried axes ``C``: layers of
    a layered kernel, experts); example ``j``'s delta is ``a[j] @ b[j]`` (the scale is
    already in ``b``).
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
    kernels = None if params is None else flatten(params)
    out: list[tuple[str, LoraWeights | Extra]] = []
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
        out.append((path, w.entry(a, b, m)))
    out += list(select_extras(split_stacked(stacked)[1], index, params).items())
    return nest(out)


def stacked_dora(w: StackedLoraWeights, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(g, m_eff)`` for every adapter of ``w`` (a DoRA `StackedLoraWeights`) and the base.

    Both have shape ``(N + 1, *C, *O)``, row ``N`` being the base model. ``g = m / ||V||`` (the
    norm detached) where the adapter is DoRA (`StackedLoraWeights.dora_keep`), else 1;
    ``m_eff`` is the magnitude that gives that ``g``: ``m`` where DoRA, else ``||V||`` (detached),
    for code that forms the DoRA kernel (`lora.merge`, `materialize`).
    """
    c = w.carried_axes  # layer and expert axes: one norm per carried index
    inner = w.layout.carried_slice()  # the layout at one carried index
    lead = jnp.moveaxis(w.to_scan(kernel), c, tuple(range(len(c))))  # carried axes first
    with_base = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:1])])  # row N: the base
    keep = with_base(jnp.asarray(w.dora_keep()))
    one = lambda a, b, m, k: layered_factor(lead, inner, a, b, m, len(c), k)
    g, m_eff = jax.vmap(one)(with_base(w.a), with_base(w.b), with_base(w.m), keep)
    return g, m_eff  # (N + 1, *C, *O)


def gather_dora(
    w: StackedLoraWeights, kernel: jax.Array, ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`stacked_dora` gathered by ``ids`` (``(B,)`` or a scalar): ids outside ``[0, N)``
    (``-1``, or out-of-range traced ids) take the base row (``g = 1``)."""
    n = w.num_adapters
    idx = jnp.where((ids < 0) | (ids >= n), n, ids)
    g, m_eff = stacked_dora(w, kernel)
    return jnp.take(g, idx, axis=0), jnp.take(m_eff, idx, axis=0)
