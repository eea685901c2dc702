"""`lora.combine` across the model kinds: adapters of kernels stacked by ``nn.scan`` /
``nnx.scan`` (``scan-*``) and of expert kernels (``moe-*``: a LoRA per expert, and per layer in a
scan stack).

References are independent float64 numpy, per layer or carried index: the weighted sum of the
deltas ``scale * a[l] @ b[l]`` (``"cat"``), its truncated SVD (``"svd"``), PEFT's ``linear``
factor formula; the pruning methods are checked index by index against `lora.combine` of
unstacked adapters of that index's kernel (whose rules `tests/test_combine.py` checks against
hand-built references and PEFT).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_lora as lora

from .cases import check
from .compare import assert_close
from .moe_adapters import einsum_case as _case
from .moe_adapters import expert_adapters, kernel_shapes
from .moe_adapters import two_sets as _moe_sets
from .moe_models import carried_delta64, merged64, random_factors
from .refs import ref_delta64
from .scan_models import CONFIG, X, in_axes_of, init_adapters, is_layered, scan_model
from .trees import adapter_entries, leaves_by_path

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


@check
def cat_is_the_per_layer_weighted_sum(model: str) -> None:
    name = model.split("-", 1)[1]  # scan-<name>
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


@check
def layer_subsets_combine_to_their_union() -> None:
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


@check
def svd_is_the_per_layer_truncated_svd(rank: int) -> None:
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


@check
def linear_is_peft_formula_per_layer() -> None:
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


@check
def pruning_methods_act_layer_by_layer(method: str) -> None:
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


@check
def dare_draws_a_mask_per_layer() -> None:
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


@check
def stacked_and_unstacked_sets_do_not_combine() -> None:
    _, _, sets = _two_sets("linen")
    flat = {
        p: _layer_view(w, 0) if is_layered(p) else w for p, w in adapter_entries(sets[1]).items()
    }
    with pytest.raises(ValueError, match="disagree on kernel_shape"):
        lora.combine([sets[0], flat], WEIGHTS, "cat")
    with pytest.raises(ValueError, match="disagree on kernel_shape"):
        lora.stack([sets[0], flat])


def _flat(a: Any, b: Any, nc: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``a (*C, *I, r)``, ``b (*C, r, *O)`` as float64 ``(prod C, prod I, r)`` and
    ``(prod C, r, prod O)``."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = math.prod(a64.shape[:nc])
    r = a64.shape[-1]
    return a64.reshape(c, -1, r), b64.reshape(c, r, -1)


_merge = jax.jit(lora.merge)


# -- expert kernels ------------------------------------------------------------------------------


def _ncarried(case: Any, path: str) -> int:
    return len(case.kernels[path].carried)


@check
def experts_cat_is_the_weighted_sum_per_expert(stacked: bool, transposed: bool) -> None:
    case, f, sets = _moe_sets(stacked, transposed, ranks=(2, 3))
    out = adapter_entries(lora.combine(sets, WEIGHTS, "cat"))
    for path, w in out.items():
        ax = case.kernels[path]
        ref = sum(
            wi * carried_delta64(*fi[path], ax.carried, ax.inputs)
            for wi, fi in zip(WEIGHTS, f, strict=True)
        )
        assert w.rank == 5 and w.scale == 1.0
        assert_close(carried_delta64(w.a, w.b, 1.0, ax.carried, ax.inputs), ref, 2e-6)


@check
def experts_svd_per_expert(stacked: bool, transposed: bool) -> None:
    case, f, sets = _moe_sets(stacked, transposed, ranks=(2, 3))
    out = adapter_entries(lora.combine(sets, WEIGHTS, "svd", rank=1))
    for path, w in out.items():
        nc = _ncarried(case, path)
        flats = [_flat(fi[path][0], fi[path][1], nc) for fi in f]
        got_a, got_b = _flat(w.a, w.b, nc)
        assert w.a.shape[:nc] == tuple(np.shape(f[0][path][0])[:nc])
        for c in range(got_a.shape[0]):
            m = sum(
                wi * fi[path][2] * fa[c] @ fb[c]
                for wi, fi, (fa, fb) in zip(WEIGHTS, f, flats, strict=True)
            )
            u, s, vt = np.linalg.svd(m)
            assert_close(got_a[c] @ got_b[c], s[0] * np.outer(u[:, 0], vt[0]), 2e-5)


@check
def experts_linear_per_expert(stacked: bool, transposed: bool) -> None:
    case, f, sets = _moe_sets(stacked, transposed)
    out = adapter_entries(lora.combine(sets, WEIGHTS, "linear"))
    for path, w in out.items():
        nc = _ncarried(case, path)
        ws = [wi * fi[path][2] for wi, fi in zip(WEIGHTS, f, strict=True)]
        flats = [_flat(fi[path][0], fi[path][1], nc) for fi in f]
        a = sum(np.sign(v) * np.sqrt(abs(v)) * fa for v, (fa, _) in zip(ws, flats, strict=True))
        b = sum(np.sqrt(abs(v)) * fb for v, (_, fb) in zip(ws, flats, strict=True))
        got_a, got_b = _flat(w.a, w.b, nc)
        assert_close(got_a, a, 2e-6)
        assert_close(got_b, b, 2e-6)


def _index_adapter(w: Any, case: Any, path: str, c: int) -> Any:
    """The plain adapter of carried index ``c`` (flattened) of ``w``, built by hand."""
    ax = case.kernels[path]
    shape = kernel_shapes(case)[path]
    kept = [i for i in range(len(shape)) if i not in ax.carried]
    nc = len(ax.carried)
    a = np.asarray(w.a).reshape(-1, *w.a.shape[nc:])[c]
    b = np.asarray(w.b).reshape(-1, *w.b.shape[nc:])[c]
    return lora.LoraWeights(
        jnp.asarray(a),
        jnp.asarray(b),
        scale=w.scale,
        in_axes=tuple(kept.index(i) for i in ax.inputs),
        kernel_shape=tuple(shape[i] for i in kept),
    )


@check
def experts_pruning_per_expert(method: str, stacked: bool, transposed: bool) -> None:
    case, _, sets = _moe_sets(stacked, transposed)
    out = adapter_entries(lora.combine(sets, WEIGHTS, method, density=0.5))
    tables = [adapter_entries(s) for s in sets]
    for path, w in out.items():
        nc = _ncarried(case, path)
        got_a, got_b = _flat(w.a, w.b, nc)
        for c in range(got_a.shape[0]):
            one = [{"k": _index_adapter(t[path], case, path, c)} for t in tables]
            ref = lora.combine(one, WEIGHTS, method, density=0.5)["k"]
            ref_a, ref_b = np.asarray(ref.a, np.float64), np.asarray(ref.b, np.float64)
            rr = ref_a.shape[-1]
            assert_close(got_a[c] @ got_b[c], ref_a.reshape(-1, rr) @ ref_b.reshape(rr, -1), 2e-5)


@check
def experts_dare_draws_per_expert(stacked: bool, transposed: bool) -> None:
    case, f, sets = _moe_sets(stacked, transposed)
    d = 0.5
    out = adapter_entries(
        lora.combine(sets, WEIGHTS, "dare_linear", density=d, key=jax.random.key(1))
    )
    path = "params/layers/moe/experts/w_in" if stacked else "params/experts/w_in"
    nc = _ncarried(case, path)
    v = [
        np.sign(wi * fi[path][2]) * np.sqrt(abs(wi * fi[path][2]))
        for wi, fi in zip(WEIGHTS, f, strict=True)
    ]
    a1, a2 = (_flat(fi[path][0], fi[path][1], nc)[0] / d for fi in f)
    got = _flat(out[path].a, out[path].b, nc)[0]
    # every entry: the kept subset of the two weighted factors
    options = np.stack([np.zeros_like(a1), v[0] * a1, v[1] * a2, v[0] * a1 + v[1] * a2])
    assert np.min(np.abs(options - got[None]), axis=0).max() <= 1e-5
    zero = np.isclose(got, 0.0, atol=1e-7)
    assert 0.05 < zero.mean() < 0.5  # about (1 - d)^2 dropped by both
    assert len({z.tobytes() for z in zero}) == zero.shape[0]  # a mask per carried index


@check
def experts_keeps_the_expert_layout(method: str) -> None:
    case = _case(True)
    f = random_factors(case)
    sets = [expert_adapters(case, f, layers=(0,)), expert_adapters(case, f, layers=(1,))]
    out = lora.combine(sets, [1.0, 1.0], method)
    if method == "cat":  # layer 0 from set 0, layer 1 from set 1: together, f on every layer
        ref = merged64(case, case.params, f)
        for path, kernel in merged64(case, _merge(case.params, out)).items():
            assert_close(kernel, ref[path], 2e-6)
    for path, w in adapter_entries(out).items():
        w0 = adapter_entries(sets[0])[path]
        assert (w.kernel_shape, w.in_axes, w.layer_axes, w.expert_axes) == (
            w0.kernel_shape,
            w0.in_axes,
            w0.layer_axes,
            w0.expert_axes,
        )
        assert w.layers == (0, 1)
