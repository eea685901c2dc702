"""`lora.stack` / `lora.unstack` and the per-example gather behind routing, across the model kinds:
kernels stacked by ``nn.scan`` (``scan-linen``), the tiny models with DoRA and plain adapters
mixed (``tiny-linen``), expert kernels (``moe-*``).

References: per-layer or per-carried-index deltas in float64 (`support.refs.ref_delta64`,
`support.moe_models.merged64`), the merged model of each set (`lora.merge`, checked against
float64 numpy in tests/test_merge.py and tests/test_dora.py), zeros where padding or unpicked
layers must be.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_lora as lora

from .cases import check
from .compare import assert_close
from .internal import gather, select
from .moe_adapters import einsum_case as _case
from .moe_adapters import expert_adapters
from .moe_adapters import two_sets as _moe_sets
from .moe_models import E, merged64, random_factors
from .moe_models import L as MOE_L
from .refs import ref_delta64
from .routing_models import dora_sets, linen_tiny, scan_model_and_sets, tiny_tokens
from .scan_models import D, L
from .trees import adapter_entries

BATCH = 5  # examples (the tiny models' own batch is 6)
_merge = jax.jit(lora.merge)


@check
def stack_of_stacked_adapters_layout_padding_and_unstack() -> None:
    _, _, sets = scan_model_and_sets("linen")
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


@check
def stack_mismatched_layer_layouts_are_clear_errors() -> None:
    ad = _weights(1, (3, 4, 5), (1,))
    with pytest.raises(ValueError, match=r"'params/layers/fc/kernel' disagree on kernel_shape"):
        lora.stack([ad, _weights(1, (2, 4, 5), (1,))])
    with pytest.raises(ValueError, match=r"'params/layers/fc/kernel' disagree on layer_axes"):
        lora.stack([ad, _weights(0, (3, 4, 5), (1,))])
    with pytest.raises(ValueError, match=r"'params/layers/fc/kernel' disagree on layer_axes"):
        lora.stack([ad, _weights(2, (3, 4, 5), (2,))])


@check
def stack_representation_and_unstack_round_trip() -> None:
    apply_fn, params = linen_tiny()
    sets = dora_sets(apply_fn, params, BATCH)
    stacked = lora.stack(sets)
    for path, w in adapter_entries(sets[0]).items():
        st = adapter_entries(stacked)[path]
        assert st.dora == (True, False, True)
        assert st.m.shape == (3, *w.out_shape)
        np.testing.assert_array_equal(np.asarray(st.m[1]), 0.0)
    for k, s in enumerate(sets):
        back = lora.unstack(stacked, k)
        x = tiny_tokens(BATCH)
        for path, w in adapter_entries(back).items():
            assert (w.m is not None) == (k != 1), path
        np.testing.assert_allclose(
            np.asarray(apply_fn(lora.merge(params, back), x)),
            np.asarray(apply_fn(lora.merge(params, s), x)),
            rtol=2e-5,
            atol=2e-5,
        )


@check
def stack_keeps_expert_axes(stacked: bool, transposed: bool) -> None:
    case, f, sets = _moe_sets(stacked, transposed, ranks=(2, 3))
    st = lora.stack(sets)
    for path, w in adapter_entries(st).items():
        w0 = adapter_entries(sets[0])[path]
        assert (w.layer_axes, w.expert_axes, w.carried_axes) == (
            w0.layer_axes,
            w0.expert_axes,
            w0.carried_axes,
        )
        assert w.a.shape == (2, *w0.a.shape[:-1], 3)
        nc = len(w0.carried_axes)
        assert w.b.shape == (2, *w0.b.shape[:nc], 3, *w0.b.shape[nc + 1 :])
    for k in (0, 1):
        merged = _merge(case.params, lora.unstack(st, k))
        ref = merged64(case, case.params, f[k])
        for path, kernel in merged64(case, merged).items():
            assert_close(kernel, ref[path], 2e-6)
        picked = jax.jit(lambda s, i, p: lora.merge(p, select(s, i)))(st, jnp.int32(k), case.params)
        for path, kernel in merged64(case, picked).items():
            assert_close(kernel, ref[path], 2e-6)
    base = jax.jit(lambda s, p: lora.merge(p, select(s, jnp.int32(-1))))(st, case.params)
    for path, kernel in merged64(case, base).items():
        assert_close(kernel, merged64(case, case.params)[path], 0)


@check
def gather_per_example_expert_factors() -> None:
    _, f, sets = _moe_sets(True, False, ranks=(2, 3))
    path = "params/layers/moe/experts/w_in"
    w = adapter_entries(lora.stack(sets))[path]
    a, b = gather(w, jnp.array([1, -1, 0], jnp.int32))
    assert a.shape == (3, MOE_L, E, *w.a.shape[3:]) and b.shape == (3, MOE_L, E, *w.b.shape[3:])
    assert not np.any(np.asarray(a[1])) and not np.any(np.asarray(b[1]))
    assert np.array_equal(np.asarray(a[0]), np.asarray(f[1][path][0]))
    assert_close(b[2, ..., :2, :], f[0][path][1] * f[0][path][2], 1e-7)
    assert not np.any(np.asarray(b[2, ..., 2:, :]))


@check
def stack_some_layers_zeroes_the_others() -> None:
    case = _case(True)
    f = random_factors(case)
    st = lora.stack([expert_adapters(case, f, layers=(1,)), expert_adapters(case, f)])
    w = adapter_entries(st)["params/layers/moe/experts/w_out"]
    assert not np.any(np.asarray(w.a[0, 0])) and np.all(np.asarray(w.a[0, 1]) != 0)
    assert np.all(np.asarray(w.a[1, 0]) != 0)
