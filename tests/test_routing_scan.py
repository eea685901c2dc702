"""Per-example routing (`lora.stack` + ``lora_ids``) of adapters of scan-stacked kernels.

References are independent of the routed code: each example run alone (a batch of one) through
the un-routed model with its own adapter merged in, ``apply(lora.merge(params, adapters_k),
x[j:j+1])`` (or the base params for ``-1``), and for a scan of scans a float64 numpy forward
whose per-layer kernels are ``W0[l] + scale * a[l] @ b[l]`` written out here; gradients are
compared with those of ``apply(lora.merge(...))`` on each adapter's own examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.compare import assert_close
from support.jaxprs import jaxpr_shapes
from support.models import NestedStack, fill_abstract
from support.refs import ref_delta64
from support.scan_models import D, L, X, scan_model
from support.trees import adapter_entries, leaves_by_path

import flax_lora as lora

IDS = [0, 2, -1, 1, 0]
KERNELS = r".*kernel"


def _union(x: Any, y: Any) -> Any:
    """Two adapter trees (nested dicts) with disjoint leaves, as one."""
    if not isinstance(x, dict):
        return x
    return {k: _union(x[k], y[k]) if k in x and k in y else x.get(k, y.get(k)) for k in {*x, *y}}


def _sets(apply: Callable, params: Any, x: Any, stacked: str) -> list[Any]:
    """Three adapter sets of ranks 2, 4 (rsLoRA) and 3, all random (nonzero ``b``). Set 1 adapts
    only layers 0 and 2 of the kernels matching ``stacked`` (its other kernels get their own
    adapters, as `LoraConfig(layers=...)` leaves out kernels without a layer index)."""
    probe = lambda p: apply(p, x)
    init = lambda i, c: lora.init(jax.random.key(10 + i), params, c, probe=probe)
    sets = [
        init(0, lora.LoraConfig(rank=2, alpha=3.0, init="random", targets=KERNELS)),
        init(1, lora.LoraConfig(rank=4, alpha=2.0, init="random", rslora=True, targets=stacked)),
        init(2, lora.LoraConfig(rank=3, alpha=6.0, init="random", targets=KERNELS)),
    ]
    picked = init(
        1,
        lora.LoraConfig(
            rank=4, alpha=2.0, init="random", rslora=True, targets=stacked, layers=(0, 2)
        ),
    )
    others = {p for p in adapter_entries(sets[0]) if p not in adapter_entries(picked)}
    sets[1] = picked
    if others:
        rest = init(3, lora.LoraConfig(rank=4, alpha=2.0, init="random", targets=[*others]))
        sets[1] = _union(picked, rest)
    assert adapter_entries(sets[1]).keys() == adapter_entries(sets[0]).keys()
    return sets


def _reference(apply: Callable, params: Any, sets: list[Any], x: Any, ids: list[int]) -> Any:
    single = jax.jit(lambda p, xi: apply(p, xi))
    rows = [
        single(params if k < 0 else lora.merge(params, sets[k]), x[j : j + 1])[0]
        for j, k in enumerate(ids)
    ]
    return np.stack([np.asarray(r) for r in rows])


def _changed(want: np.ndarray, base: Any) -> float:
    """The smallest, over the examples routed to an adapter, of how far it moves the output."""
    diff = np.abs(np.asarray(want) - np.asarray(base)).reshape(len(IDS), -1).max(axis=1)
    return float(diff[np.array(IDS) >= 0].min())


def _model(name: str) -> tuple[Callable, Any, list[Any]]:
    apply, params = scan_model(name)
    return apply, params, _sets(apply, params, X, r".*layers.*kernel")


# -- stacking --------------------------------------------------------------------------------
def test_stack_of_stacked_adapters_layout_padding_and_unstack() -> None:
    _, _, sets = _model("linen")
    stacked = lora.stack(sets)
    entries = adapter_entries(stacked)
    originals = [adapter_entries(s) for s in sets]
    fc1 = entries["params/layers/fc1/kernel"]
    assert isinstance(fc1, lora.StackedLoraWeights)
    assert (fc1.a.shape, fc1.b.shape, fc1.layer_axes) == ((3, L, D, 4), (3, L, 4, 16), 1)
    assert entries["params/head/kernel"].layer_axes == 0
    for path, w in entries.items():
        assert w.ranks == (2, 4, 3), path
        a, b = np.asarray(w.a), np.asarray(w.b)
        n = w.layer_axes
        for k, r in enumerate(w.ranks):  # padding is zeros
            pad_b = b[(k, *[slice(None)] * n, slice(r, None))]
            assert not np.any(a[k, ..., r:]) and not np.any(pad_b)
        if n:  # layer 1 is not adapted by set 1: zero factors there
            assert not np.any(a[1, 1]) and not np.any(b[1, 1])
            assert np.any(a[1, 0]) and np.any(b[1, 2])
    # unstack gives each set back: same per-layer deltas (float64, by hand), layers= included
    for i, original in enumerate(originals):
        back = adapter_entries(lora.unstack(stacked, i))
        for path, w in original.items():
            u = back[path]
            assert u.layer_axes == w.layer_axes and u.rank == w.rank, path
            if not w.layer_axes:
                want = ref_delta64(w.a, w.b, w.in_axes, w.scale)
                got = ref_delta64(u.a, u.b, u.in_axes, u.scale)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=path)
                continue
            per_layer = tuple(d - 1 for d in w.in_axes)
            for layer in range(L):
                adapted = w.layers is None or layer in w.layers
                want = ref_delta64(w.a[layer], w.b[layer], per_layer, w.scale * adapted)
                got = ref_delta64(u.a[layer], u.b[layer], per_layer, u.scale)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=path)


def _weights(layer_axes: int, kernel_shape: tuple[int, ...], in_axes: tuple[int, ...]) -> Any:
    lead = kernel_shape[:layer_axes]
    n_in = [kernel_shape[d] for d in in_axes]
    n_out = [kernel_shape[d] for d in range(layer_axes, len(kernel_shape)) if d not in in_axes]
    w = lora.LoraWeights(
        a=jnp.ones((*lead, *n_in, 2)),
        b=jnp.ones((*lead, 2, *n_out)),
        scale=1.0,
        in_axes=in_axes,
        kernel_shape=kernel_shape,
        layer_axes=layer_axes,
    )
    return {"params": {"layers": {"fc": {"kernel": w}}}}


def test_stack_mismatched_layer_layouts_are_clear_errors() -> None:
    ad = _weights(1, (3, 4, 5), (1,))
    with pytest.raises(ValueError, match=r"'params/layers/fc/kernel' disagree on kernel_shape"):
        lora.stack([ad, _weights(1, (2, 4, 5), (1,))])
    with pytest.raises(ValueError, match=r"'params/layers/fc/kernel' disagree on layer_axes"):
        lora.stack([ad, _weights(0, (3, 4, 5), (1,))])
    with pytest.raises(ValueError, match=r"'params/layers/fc/kernel' disagree on layer_axes"):
        lora.stack([ad, _weights(2, (3, 4, 5), (2,))])


# -- routed forward --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linen", "nnx"])
@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
def test_routed_scan_equals_each_example_through_its_own_merged_model(name: str, mode: str) -> None:
    """Mode "factored" raises rather than fall back, so there the routing runs inside the scan:
    each layer's uses get per-example factors, no example runs alone."""
    apply, params, sets = _model(name)
    want = _reference(apply, params, sets, X, IDS)
    fn = jax.jit(lora.wrap(apply, mode=mode))
    stacked = lora.stack(sets)
    got = fn(params, stacked, X, lora_ids=jnp.array(IDS))
    assert_close(got, want, 1e-5)
    base = np.asarray(jax.jit(apply)(params, X))
    assert _changed(want, base) > 1e-3  # the adapters matter
    # other ids, same compilation; all -1 is the base model
    assert_close(fn(params, stacked, X, lora_ids=jnp.array([-1] * len(IDS))), base, 1e-5)
    assert fn._cache_size() == 1


def test_routed_factored_scan_forms_no_per_example_kernel() -> None:
    """Inside the scan only the rank-R branch is per example: no array of a layer kernel's shape
    with an example axis (forward or backward), which mode "merged" does form."""
    apply, params, sets = _model("linen")
    stacked = lora.stack(sets)
    per_example = set()
    for w in adapter_entries(stacked).values():
        per_example |= {(len(IDS), *w.kernel_shape), (len(IDS), *w.kernel_shape[w.layer_axes :])}
    ids = jnp.array(IDS)

    def count(mode: str, grad: bool) -> int:
        fn = lambda st: jnp.sum(lora.wrap(apply, mode=mode)(params, st, X, lora_ids=ids))
        shapes = jaxpr_shapes(jax.make_jaxpr(jax.grad(fn) if grad else fn)(stacked).jaxpr)
        return sum(s in per_example for s in shapes)

    assert count("factored", False) == 0 and count("factored", True) == 0
    assert count("merged", False) > 0  # the check sees per-example kernels where they exist


def _nested_numpy(params: Any, sets: list[Any], x: np.ndarray, ids: list[int]) -> np.ndarray:
    """`NestedStack` in float64 numpy: ``h = tanh(h @ W[l, i] + bias[l, i])`` for each outer layer
    ``l`` and inner layer ``i``, with ``W = W0 + scale * a @ b`` on the adapted outer layers."""
    leaves = {p: np.asarray(v, np.float64) for p, v in leaves_by_path(params).items()}
    w0 = leaves["params/outer/inner/fc/kernel"]
    bias = leaves["params/outer/inner/fc/bias"]
    rows = []
    for j, k in enumerate(ids):
        w = w0.copy()
        if k >= 0:
            ad = adapter_entries(sets[k])["params/outer/inner/fc/kernel"]
            a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
            for l_ in range(w.shape[0]):
                if ad.layers is None or l_ in ad.layers:
                    w[l_] += ad.scale * np.einsum("jir,jro->jio", a[l_], b[l_])
        h = np.asarray(x[j], np.float64)
        for l_ in range(w.shape[0]):
            for i in range(w.shape[1]):
                h = np.tanh(h @ w[l_, i] + bias[l_, i])
        rows.append(h)
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
def test_routed_nested_scans_equal_a_float64_numpy_forward(mode: str) -> None:
    """A scan of scans (kernels ``(L, 2, D, D)``, two layer axes), set 1 on outer layers 0, 2."""
    model = NestedStack(width=D, layers=L)
    params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 4, 0.4)
    sets = _sets(model.apply, params, X, KERNELS)
    w = adapter_entries(sets[1])["params/outer/inner/fc/kernel"]
    assert (w.layer_axes, w.layers) == (2, (0, 2))
    want = _nested_numpy(params, sets, X, IDS)
    fn = jax.jit(lora.wrap(model.apply, mode=mode))
    got = fn(params, lora.stack(sets), X, lora_ids=jnp.array(IDS))
    assert_close(got, want, 1e-5)
    base = _nested_numpy(params, sets, X, [-1] * len(IDS))
    assert _changed(want, base) > 1e-3


# -- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["factored"])  # "auto" takes the same path when none falls back
def test_routed_scan_gradients_reach_only_the_adapters_used(mode: str) -> None:
    apply, params, sets = _model("linen")
    stacked = lora.stack(sets)
    ids = [1, 0, -1, 1, 0]  # adapter 2 unused
    loss = lambda st: jnp.sum(lora.wrap(apply, mode=mode)(params, st, X, lora_ids=jnp.array(ids)))
    grads = jax.jit(jax.grad(loss))(stacked)
    for path, g in adapter_entries(grads).items():
        ga, gb = np.asarray(g.a), np.asarray(g.b)
        assert not np.any(ga[2]) and not np.any(gb[2]), path
        assert np.abs(ga[0]).max() > 0 and np.abs(gb[1]).max() > 0, path
        if g.layer_axes:  # layer 1 is not adapted by set 1: no gradient there
            assert not np.any(ga[1, 1]) and not np.any(gb[1, 1]), path
    merged_loss = lambda ad, xs: jnp.sum(apply(lora.merge(params, ad), xs))
    for k in (0, 1):
        mine = np.array([i for i, j in enumerate(ids) if j == k])
        ref = jax.grad(merged_loss)(lora.unstack(stacked, k), X[mine])
        got = lora.unstack(grads, k)
        for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            assert_close(g, r, 5e-5)
