"""LoRA on expert kernels (issue 16): one adapter per expert, against float64 references.

The models are tests/support/moe_models.py (Linen and NNX; einsum, ragged_dot and loop dispatch;
one block or an ``L``-layer scan stack; ``w_out`` laid out ``(E, F, D)`` or, ``transposed_out``,
PyTorch's ``(E, D, F)``). Every reference is float64 numpy written without flax_lora:

- `lora.init` learns the expert axes: ``a (*C, *I, r)`` and ``b (*C, r, *O)`` with the carried
  axes ``C`` (scan layer, then expert) of the hand-written `ExpertAxes`;
- the wrapped model (modes factored, auto and merged; float32 and bfloat16) equals
  `ref_output` with the adapters' own factors (per-expert deltas merged in float64);
- `lora.merge` / `lora.unmerge` give `merged64`'s kernels and back;
- the gradients w.r.t. ``a`` and ``b`` (factored mode) equal the chain rule applied in float64
  to the gradient of the base model w.r.t. its merged kernels (JAX's own autodiff of the model,
  no flax_lora in it), and the jaxpr of that gradient holds no expert-kernel-sized array;
- scan stacks with ``layers=``, ``rank_pattern``, remat, DoRA (merged at expert uses), the loop
  dispatch (merged at its slices in auto; factored mode says why), routing over ragged kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.compare import rel_err
from support.internal import _jaxpr
from support.jaxprs import all_eqns, jaxpr_shapes
from support.moe_models import D, E, F, L, build, merged64, ref_block64, ref_output, with_kernels
from support.trees import adapter_entries, leaves_by_path

import flax_lora as lora

CASES = [
    (fw, dispatch, stacked)
    for fw in ("linen", "nnx")
    for dispatch in ("einsum", "ragged")
    for stacked in (False, True)
]


def _factors(adapters: Any) -> dict[str, tuple[Any, Any, float]]:
    return {p: (w.a, w.b, w.scale) for p, w in adapter_entries(adapters).items()}


def _init(case: Any, **config: Any) -> Any:
    cfg = lora.LoraConfig(**{"rank": 2, "init": "random", **config})
    return lora.init(jax.random.key(0), case.params, cfg, probe=case.probe)


def _expected_shapes(case: Any, path: str, rank: int) -> tuple[tuple, tuple]:
    shape = np.shape(leaves_by_path(case.params)[path])
    axes = case.kernels[path]
    outs = [i for i in range(len(shape)) if i not in axes.carried and i not in axes.inputs]
    c = tuple(shape[i] for i in axes.carried)
    return (
        (*c, *(shape[i] for i in axes.inputs), rank),
        (*c, rank, *(shape[i] for i in outs)),
    )


@pytest.mark.parametrize("framework,dispatch,stacked", CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_init_one_lora_per_expert(framework, dispatch, stacked, transposed):
    case = build(framework, dispatch, stacked=stacked, transposed_out=transposed)
    entries = adapter_entries(_init(case, rank=3))
    assert set(entries) == set(case.kernels)
    for path, w in entries.items():
        a_shape, b_shape = _expected_shapes(case, path, 3)
        assert (w.a.shape, w.b.shape) == (a_shape, b_shape), path
        n_layer = int(stacked)
        assert w.carried_axes == case.kernels[path].carried, path
        assert w.layer_axes == n_layer


@pytest.mark.parametrize("framework,dispatch,stacked", CASES)
@pytest.mark.parametrize("mode", ["factored", "auto", "merged"])
def test_forward_matches_float64_reference(framework, dispatch, stacked, mode):
    case = build(framework, dispatch, stacked=stacked)
    adapters = _init(case)
    out = jax.jit(lora.wrap(case.apply, mode))(case.params, adapters, case.x)
    ref = ref_output(case, case.params, _factors(adapters))
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("dispatch", ["einsum", "ragged"])
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_transposed_layout_factored(framework, dispatch):
    case = build(framework, dispatch, transposed_out=True)
    adapters = _init(case)
    out = lora.wrap(case.apply, "factored")(case.params, adapters, case.x)
    assert rel_err(out, ref_output(case, case.params, _factors(adapters))) < 2e-5


@pytest.mark.parametrize("dispatch", ["einsum", "ragged"])
@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_bfloat16(dispatch, mode):
    case = build("linen", dispatch, param_dtype=jnp.bfloat16)
    adapters = _init(case, dtype=jnp.bfloat16)
    out = lora.wrap(case.apply, mode)(case.params, adapters, case.x)
    ref = ref_output(case, case.params, _factors(adapters))
    assert rel_err(out, ref) < 3e-2


@pytest.mark.parametrize("framework,dispatch,stacked", CASES[:4] + CASES[6:7])
def test_merge_unmerge(framework, dispatch, stacked):
    case = build(framework, dispatch, stacked=stacked)
    adapters = _init(case)
    merged = lora.merge(case.params, adapters)
    want = merged64(case, case.params, _factors(adapters))
    got = leaves_by_path(merged)
    for path, w in want.items():
        assert rel_err(got[path], w) < 1e-6, path
    back = leaves_by_path(lora.unmerge(merged, adapters))
    for path, w0 in leaves_by_path(case.params).items():
        np.testing.assert_allclose(np.asarray(back[path]), np.asarray(w0), atol=1e-5)


def _chain_rule(g: np.ndarray, a: Any, b: Any, scale: float, axes: Any) -> tuple:
    """``dL/da``, ``dL/db`` in float64 from ``G = dL/dW`` (kernel layout), ``W = W0 + s a @ b``
    per carried index."""
    g = np.asarray(g, np.float64)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    outs = [i for i in range(g.ndim) if i not in axes.carried and i not in axes.inputs]
    gt = np.transpose(g, [*axes.carried, *axes.inputs, *outs])
    nc = len(axes.carried)
    c, r = gt.shape[:nc], a64.shape[-1]
    gm = gt.reshape(math.prod(c), math.prod(gt.shape[nc : nc + len(axes.inputs)]), -1)
    am = a64.reshape(math.prod(c), -1, r)
    bm = b64.reshape(math.prod(c), r, -1)
    da = scale * np.einsum("cio,cro->cir", gm, bm)
    db = scale * np.einsum("cir,cio->cro", am, gm)
    return da.reshape(a64.shape), db.reshape(b64.shape)


@pytest.mark.parametrize(
    "framework,dispatch,stacked", [*CASES, ("linen", "loop", False), ("nnx", "loop", True)]
)
def test_gradients_match_chain_rule(framework, dispatch, stacked):
    case = build(framework, dispatch, stacked=stacked)
    adapters = _init(case)
    cot = np.random.default_rng(5).normal(size=ref_output(case, case.params).shape)
    cot = jnp.asarray(cot, jnp.float32)
    wrapped = lora.wrap(case.apply, "factored")
    grads = jax.grad(lambda ad: jnp.sum(wrapped(case.params, ad, case.x) * cot))(adapters)
    factors = _factors(adapters)
    merged = with_kernels(case.params, merged64(case, case.params, factors))
    g_kernels = leaves_by_path(jax.grad(lambda p: jnp.sum(case.apply(p, case.x) * cot))(merged))
    for path, g in adapter_entries(grads).items():
        da, db = _chain_rule(g_kernels[path], *factors[path], case.kernels[path])
        assert rel_err(g.a, da) < 1e-4, path
        assert rel_err(g.b, db) < 1e-4, path


@pytest.mark.parametrize("dispatch", ["einsum", "ragged"])
@pytest.mark.parametrize("stacked", [False, True])
def test_no_expert_kernel_in_gradient(dispatch, stacked):
    case = build("linen", dispatch, stacked=stacked)
    adapters = _init(case)
    wrapped = lora.wrap(case.apply, "factored")
    loss = lambda ad: jnp.sum(wrapped(case.params, ad, case.x))
    shapes = set(jaxpr_shapes(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr))
    lead = (L,) if stacked else ()
    kernel_like = {(*lead, E, D, F), (*lead, E, F, D), (E, D, F), (E, F, D)}
    assert not shapes & kernel_like, shapes & kernel_like
    # the merged mode does form them (the check can see a kernel-sized array)
    merged = lora.wrap(case.apply, "merged")
    shapes_m = jaxpr_shapes(
        jax.make_jaxpr(jax.grad(lambda ad: jnp.sum(merged(case.params, ad, case.x))))(
            adapters
        ).jaxpr
    )
    assert set(shapes_m) & kernel_like


@pytest.mark.parametrize("dispatch", ["einsum", "ragged"])
def test_stacked_layers_rank_pattern_remat(dispatch):
    case = build("linen", dispatch, stacked=True)
    w_in = "params/layers/moe/experts/w_in"
    adapters = _init(case, layers=[1], rank_pattern={".*w_in": 3})
    entries = adapter_entries(adapters)
    assert entries[w_in].a.shape == (L, E, D, 3)
    factors = _factors(adapters)
    # layers=[1]: layer 0 keeps its base kernel
    factors = {p: (np.asarray(a).copy(), b, s) for p, (a, b, s) in factors.items()}
    for a, _, _ in factors.values():
        a[0] = 0.0
    ref = ref_output(case, case.params, factors)
    remat_apply = jax.checkpoint(case.apply)
    for mode in ("factored", "merged"):
        out = lora.wrap(remat_apply, mode)(case.params, adapters, case.x)
        assert rel_err(out, ref) < 2e-5, mode


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_loop_dispatch(framework, stacked):
    """A Python loop over experts: the probe takes the axis of ``w[e]`` (``slice`` + ``squeeze``)
    for an expert axis; each slice cuts the factors with the kernel, so every mode runs."""
    case = build(framework, "loop", stacked=stacked)
    adapters = _init(case)
    for path, w in adapter_entries(adapters).items():
        assert w.carried_axes == case.kernels[path].carried, path
    ref = ref_output(case, case.params, _factors(adapters))
    for mode in ("factored", "auto", "merged"):
        assert rel_err(lora.wrap(case.apply, mode)(case.params, adapters, case.x), ref) < 2e-5


def test_traced_expert_index():
    """``w[i]`` with a traced ``i`` (``dynamic_slice``): factored, vs float64 numpy."""
    rng = np.random.default_rng(11)
    params = {"w": jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(3, D)), jnp.float32)
    order = jnp.array([2, 0, 3])

    def apply(p: Any, x: Any) -> Any:
        return sum(x[j] @ p["w"][order[j]] for j in range(3))

    adapters = lora.init(jax.random.key(0), params, _config(), probe=lambda p: apply(p, x))
    w = adapter_entries(adapters)["w"]
    assert w.a.shape == (E, D, 2) and w.expert_axes == (0,)
    wm = np.asarray(params["w"], np.float64) + w.scale * np.einsum(
        "edr,erf->edf", np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    )
    ref = sum(np.asarray(x[j], np.float64) @ wm[int(order[j])] for j in range(3))
    out = jax.jit(lora.wrap(apply, "factored"))(params, adapters, x)
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize(
    "dispatch,transposed,stacked",
    [
        ("einsum", False, False),
        ("einsum", True, True),
        ("ragged", True, False),
        ("ragged", False, True),
    ],
)
def test_dora_experts(dispatch, transposed, stacked):
    """DoRA per expert and output unit (factored, auto, merged), float64 reference."""
    case = build("linen", dispatch, transposed_out=transposed, stacked=stacked)
    cfg = lora.LoraConfig(rank=2, init="random", dora=True)
    adapters = lora.init(jax.random.key(0), case.params, cfg, probe=case.probe)
    entries = adapter_entries(adapters)
    rng = np.random.default_rng(7)
    kernels = {}
    merged = merged64(case, case.params, _factors(adapters))
    for path, w in entries.items():
        m = np.asarray(w.m, np.float64) * (1.0 + 0.1 * rng.normal(size=w.m.shape))
        entries[path] = w.replace(m=jnp.asarray(m, w.m.dtype))
        axes = case.kernels[path]
        v = merged[path]
        norm = np.sqrt(np.sum(v * v, axis=axes.inputs, keepdims=True))
        kernels[path] = np.expand_dims(m, axes.inputs) * v / norm
    adapters = _rebuild(adapters, entries)
    ref = ref_output(case, with_kernels(case.params, kernels))
    for mode in ("factored", "auto", "merged"):
        assert rel_err(lora.wrap(case.apply, mode)(case.params, adapters, case.x), ref) < 2e-5


def _rebuild(adapters: Any, entries: dict[str, Any]) -> Any:
    def walk(node: Any, prefix: str) -> Any:
        if prefix in entries:
            return entries[prefix]
        return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}

    return walk(adapters, "")


def test_dropout_on_branch_only():
    """Dropout at rate 1 leaves the base model: the branch input is masked, W0's is not."""
    case = build("linen", "ragged")
    adapters = _init(case, dropout=0.999999)
    out = lora.wrap(case.apply, "factored")(
        case.params, adapters, case.x, lora_rng=jax.random.key(3)
    )
    assert rel_err(out, ref_output(case, case.params)) < 1e-4


def test_reference_block_is_the_model():
    """Sanity of the reference used above on the expert path alone."""
    case = build("linen", "einsum")
    p = {k: np.asarray(v, np.float64) for k, v in leaves_by_path(case.params).items()}
    ref = ref_block64(
        np.asarray(case.x, np.float64),
        p["params/router/kernel"],
        p["params/experts/w_in"],
        p["params/experts/w_out"],
    )
    assert rel_err(case.apply(case.params, case.x), ref) < 1e-5


@pytest.mark.parametrize("dispatch", ["einsum", "ragged"])
def test_routing_stack_over_experts(dispatch):
    """``lora.stack`` + ``lora_ids``: auto and merged run example ``j`` with adapter ``ids[j]``
    (per example: the expert axis is no example axis); factored says why it cannot route."""
    case = build("linen", dispatch)
    sets = [_init(case), lora.init(jax.random.key(9), case.params, _config(), probe=case.probe)]
    stacked = lora.stack(sets)
    ids = jnp.array([1, 0])
    refs = []
    for j, i in enumerate([1, 0]):
        one = dataclasses.replace(case, x=case.x[j : j + 1])
        refs.append(ref_output(one, case.params, _factors(sets[i])))
    ref = np.concatenate(refs)
    for mode in ("auto", "merged"):
        out = lora.wrap(case.apply, mode)(case.params, stacked, case.x, lora_ids=ids)
        assert rel_err(out, ref) < 2e-5, mode
    with pytest.raises(ValueError, match="cannot be routed"):
        lora.wrap(case.apply, "factored")(case.params, stacked, case.x, lora_ids=ids)


def _config() -> Any:
    return lora.LoraConfig(rank=2, init="random")


@pytest.mark.parametrize("transposed", [False, True])
def test_ragged_dot_accessor(transposed):
    """`_jaxpr.ragged_dot` reads the expert (group) axis and the contracted axes of the
    installed JAX's ``ragged_dot_general``, as the probe and the rule use them."""
    case = build("linen", "ragged", transposed_out=transposed)
    closed = jax.make_jaxpr(case.probe)(case.params)
    found = [
        _jaxpr.ragged_dot(e)
        for e in all_eqns(closed.jaxpr)
        if e.primitive.name == "ragged_dot_general"
    ]
    assert [(f.rhs_group, f.dot.rhs_contract, f.lhs_ragged) for f in found] == [
        ((0,), (1,), (0,)),
        ((0,), (2 if transposed else 1,), (0,)),
    ]


@pytest.mark.parametrize("transposed", [False, True])
def test_pissa_per_expert(transposed):
    """PiSSA factors each expert's ``W0_e`` (the expert axis need not be the SVD's): the
    residual plus ``scale * a_e @ b_e`` is the kernel, and ``a_e @ b_e`` has rank ``r``."""
    case = build("nnx", "einsum", transposed_out=transposed)
    cfg = lora.LoraConfig(rank=2, init="pissa", targets=".*w_out")
    adapters, residual = lora.init(jax.random.key(0), case.params, cfg, probe=case.probe)
    ((path, w),) = adapter_entries(adapters).items()
    axes = case.kernels[path]
    back = merged64(case, residual, {path: (w.a, w.b, w.scale)})[path]
    w0 = np.asarray(leaves_by_path(case.params)[path], np.float64)
    assert rel_err(back, w0) < 1e-5
    for e in range(E):  # the top-2 singular values of each expert's matrix
        mat = w0[e].T if axes.inputs == (2,) else w0[e]
        s = np.linalg.svd(mat, compute_uv=False)[:2]
        ab = np.asarray(w.a[e], np.float64) @ np.asarray(w.b[e], np.float64) * w.scale
        assert np.allclose(np.linalg.svd(ab, compute_uv=False)[:2], s, rtol=1e-4)


def test_lora_init_per_expert_kaiming():
    """``init="lora"``: ``b = 0``; each expert's ``a`` kaiming-uniform with fan-in ``D`` (bound
    ``1/sqrt(D)``), the experts drawn independently."""
    case = build("linen", "ragged")
    w = adapter_entries(_init(case, init="lora", rank=4))["params/experts/w_in"]
    a = np.asarray(w.a)
    assert np.all(np.asarray(w.b) == 0)
    assert np.abs(a).max() <= 1 / math.sqrt(D) and np.abs(a).max() > 0.5 / math.sqrt(D)
    assert not np.allclose(a[0], a[1])
