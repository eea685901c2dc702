"""`lora.combine` of adapters of kernels stacked by ``nn.scan`` / ``nnx.scan``.

References are independent float64 numpy, layer by layer: the weighted sum of the layers'
deltas ``scale * a[l] @ b[l]`` (``"cat"``), its truncated SVD (``"svd"``), PEFT's ``linear``
factor formula; the pruning methods are checked layer by layer against `lora.combine` of
unstacked adapters of the layer kernels (whose rules `tests/test_combine.py` checks against
hand-built references and PEFT).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import pytest
from support.compare import assert_close
from support.refs import ref_delta64
from support.scan_models import CONFIG, MODELS, X, in_axes_of, init_adapters, is_layered, scan_model
from support.trees import adapter_entries, leaves_by_path

import flax_lora as lora

WEIGHTS = (0.7, -0.4)


def _two_sets(name: str, layers: tuple[Any, Any] = (None, None)) -> tuple[Any, Any, list[Any]]:
    apply, params = scan_model(name)
    sets = [
        init_adapters(apply, params, dataclasses.replace(CONFIG, layers=layers[0])),
        lora.init(
            jax.random.key(7),
            params,
            dataclasses.replace(CONFIG, layers=layers[1]),
            probe=lambda p: apply(p, X),
        ),
    ]
    return apply, params, sets


def _layer_deltas(w: Any, path: str) -> list[np.ndarray]:
    """float64 ``scale * a[l] @ b[l]`` of each layer in the layer kernel's layout (masked
    layers, outside ``w.layers``, give zero)."""
    per_layer = tuple(d - 1 for d in in_axes_of(path))
    a, b = np.asarray(w.a), np.asarray(w.b)
    out = []
    for i in range(a.shape[0]):
        d = ref_delta64(a[i], b[i], per_layer, w.scale)
        out.append(d if w.layers is None or i in w.layers else np.zeros_like(d))
    return out


def _merged_deltas(params: Any, adapters: Any) -> dict[str, np.ndarray]:
    merged = leaves_by_path(lora.merge(params, adapters))
    base = leaves_by_path(params)
    return {
        p: np.asarray(merged[p], np.float64) - np.asarray(base[p], np.float64)
        for p in adapter_entries(adapters)
    }


@pytest.mark.parametrize("name", MODELS)
def test_cat_is_the_per_layer_weighted_sum(name: str) -> None:
    apply, params, sets = _two_sets(name)
    both = lora.combine(sets, WEIGHTS, "cat")
    got = _merged_deltas(params, both)
    tables = [adapter_entries(s) for s in sets]
    for path, w in adapter_entries(both).items():
        assert w.a.shape[-1] == 4 and w.scale == 1.0  # ranks 2 + 2, scales folded in
        if not is_layered(path):
            continue
        assert w.layer_axes == 1 and tuple(w.in_axes) == in_axes_of(path)
        want = sum(
            wt * np.stack(_layer_deltas(t[path], path))
            for wt, t in zip(WEIGHTS, tables, strict=True)
        )
        assert_close(got[path], want, 1e-6)
    y = jax.jit(lora.wrap(apply))(params, both, X)
    y_merged = jax.jit(apply)(lora.merge(params, both), X)
    assert_close(y, y_merged)


def test_layer_subsets_combine_to_their_union() -> None:
    _, params, sets = _two_sets("linen", layers=((0,), (2,)))
    both = lora.combine(sets, WEIGHTS, "cat")
    got = _merged_deltas(params, both)
    tables = [adapter_entries(s) for s in sets]
    for path, w in adapter_entries(both).items():
        if not is_layered(path):
            continue
        assert tuple(w.layers) == (0, 2)
        want = sum(
            wt * np.stack(_layer_deltas(t[path], path))
            for wt, t in zip(WEIGHTS, tables, strict=True)
        )
        assert not np.any(got[path][1])  # neither set adapts layer 1
        assert_close(got[path], want, 1e-6)
    all_layers = {p: w.replace(layers=None) for p, w in tables[1].items()}
    one_all = lora.combine([sets[0], all_layers], WEIGHTS, "cat")
    assert all(w.layers is None for w in adapter_entries(one_all).values())


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_is_the_per_layer_truncated_svd(rank: int) -> None:
    _, params, sets = _two_sets("linen")
    low = lora.combine(sets, WEIGHTS, "svd", rank=rank)
    got = _merged_deltas(params, low)
    tables = [adapter_entries(s) for s in sets]
    for path, w in adapter_entries(low).items():
        if not is_layered(path):
            continue
        per_layer = tuple(d - 1 for d in in_axes_of(path))
        sums = sum(
            wt * np.stack(_layer_deltas(t[path], path))
            for wt, t in zip(WEIGHTS, tables, strict=True)
        )
        for i in range(sums.shape[0]):
            m = sums[i]  # in the layer kernel's layout: rows = its input axes, flattened
            outs = [d for d in range(m.ndim) if d not in per_layer]
            mat = np.transpose(m, (*per_layer, *outs)).reshape(
                int(np.prod([m.shape[d] for d in per_layer])), -1
            )
            u, s, vt = np.linalg.svd(mat, full_matrices=False)
            k = min(rank, *mat.shape)
            ref = (u[:, :k] * s[:k]) @ vt[:k]
            g = got[path][i]
            g_mat = np.transpose(g, (*per_layer, *outs)).reshape(mat.shape)
            assert_close(g_mat, ref, 2e-5)
        assert w.a.shape[-1] <= rank


def test_linear_is_peft_formula_per_layer() -> None:
    _, _, sets = _two_sets("linen")
    lin = lora.combine(sets, WEIGHTS, "linear")
    tables = [adapter_entries(s) for s in sets]
    for path, w in adapter_entries(lin).items():
        srcs = [t[path] for t in tables]
        ws = [wt * s.scale for wt, s in zip(WEIGHTS, srcs, strict=True)]
        a_ref = sum(
            np.sign(v) * np.sqrt(abs(v)) * np.asarray(s.a, np.float64)
            for v, s in zip(ws, srcs, strict=True)
        )
        b_ref = sum(
            np.sqrt(abs(v)) * np.asarray(s.b, np.float64) for v, s in zip(ws, srcs, strict=True)
        )
        assert_close(w.a, a_ref, 1e-6)
        assert_close(w.b, b_ref, 1e-6)


def _layer_view(w: Any, i: int) -> Any:
    """Layer ``i`` of a stacked adapter as an unstacked adapter of the layer's kernel."""
    return w.replace(
        a=w.a[i],
        b=w.b[i],
        kernel_shape=tuple(w.kernel_shape[1:]),
        in_axes=tuple(d - 1 for d in w.in_axes),
        layer_axes=0,
        layers=None,
    )


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "ties_svd"])
def test_pruning_methods_act_layer_by_layer(method: str) -> None:
    _, _, sets = _two_sets("linen")
    got = adapter_entries(lora.combine(sets, WEIGHTS, method, density=0.5))
    tables = [adapter_entries(s) for s in sets]
    for path, w in got.items():
        if not is_layered(path):
            continue
        for i in range(w.kernel_shape[0]):
            one = lora.combine(
                [{"k": _layer_view(t[path], i)} for t in tables], WEIGHTS, method, density=0.5
            )["k"]
            if method.endswith("_svd"):  # SVD factors are unique only up to signs: the delta
                a_i, b_i = np.asarray(w.a[i], np.float64), np.asarray(w.b[i], np.float64)
                a_1, b_1 = np.asarray(one.a, np.float64), np.asarray(one.b, np.float64)
                k = a_i.shape[-1]
                assert_close(
                    a_i.reshape(-1, k) @ b_i.reshape(k, -1), a_1.reshape(-1, k) @ b_1.reshape(k, -1)
                )
            else:
                assert_close(w.a[i], one.a, 1e-6)
                assert_close(w.b[i], one.b, 1e-6)


def test_dare_draws_a_mask_per_layer() -> None:
    _, _, sets = _two_sets("linen")
    # the same adapter on every layer: identical layers would give identical masks if the
    # key were shared across layers
    same = []
    for s in sets:
        entries = adapter_entries(s)
        same.append(
            {
                p: w.replace(
                    a=np.broadcast_to(w.a[:1], w.a.shape), b=np.broadcast_to(w.b[:1], w.b.shape)
                )
                if is_layered(p)
                else w
                for p, w in entries.items()
            }
        )
    out = adapter_entries(
        lora.combine(same, WEIGHTS, "dare_linear", density=0.5, key=jax.random.key(3))
    )
    a = np.asarray(out["params/layers/fc1/kernel"].a)
    assert not np.array_equal(a[0] == 0, a[1] == 0)
    kept = np.mean(a != 0)  # nonzero where either set's entry survived: 1 - 0.5**2
    assert 0.6 < kept < 0.9


def test_stacked_and_unstacked_sets_do_not_combine() -> None:
    _, _, sets = _two_sets("linen")
    flat = {
        p: _layer_view(w, 0) if is_layered(p) else w for p, w in adapter_entries(sets[1]).items()
    }
    with pytest.raises(ValueError, match="disagree on kernel_shape"):
        lora.combine([sets[0], flat], WEIGHTS, "cat")
    with pytest.raises(ValueError, match="disagree on kernel_shape"):
        lora.stack([sets[0], flat])
