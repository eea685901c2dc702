"""Expert kernels whose expert axis is free in the einsum, and probes over sub-jaxprs that return
constants (issue 29, part A).

A tiny MaxText-like MoE block, written here in plain JAX with both of MaxText's paths over the same
params:

- dense (``sparse_matmul=False``): ``jnp.einsum("BSM,EMH->BSEH", x, wi_0)`` (and ``wi_1``): the
  expert axis ``E`` is free in the product (neither contracted nor batched), then
  ``silu(h0) * h1`` and ``"BSEH,EHM->BSEM"`` with ``wo``, which batches ``E``;
- sparse (``sparse_matmul=True, megablox=False``): tokens sorted by expert and
  ``jax.lax.ragged_dot`` with the expert as group axis, inside a ``jax.jit`` whose body returns a
  constant beside the products (a ``Literal`` among the sub-jaxpr's outvars, which crashed the
  probe with ``TypeError: unhashable type: 'Literal'``).

Every reference is float64 numpy written without flax_lora: per-expert kernels
``W_e = W0_e + scale * a_e @ b_e`` and a token-by-token loop over each token's top-k experts.
Checked: the probe gives one LoRA per expert on both paths with the same structure
(``a (E, M, r)``, ``b (E, r, H)``); every mode of `lora.wrap` equals the merged model and the
float64 reference; gradients agree across modes and paths; an adapter trained on one path runs
on the other; merge / unmerge, `save_peft` / `load_peft`; DoRA and routing; layered stacks
(``lax.scan`` and Linen ``nn.scan``); the dense path respelled (kernel first, transposes, a
reshape). Free axes that meet no kernel's batch dimension stay output axes (attention's heads,
Gemma's ``q`` and fused ``kv_einsum``; an expert axis summed away).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.compare import rel_err
from support.jaxprs import jaxpr_shapes, walk
from support.trees import adapter_entries, kernel_deltas, leaves_by_path

import flax_lora as lora

B, S, M, E, H, K, L, R = (
    2,
    3,
    8,
    4,
    6,
    2,
    2,
    2,
)  # batch, seq, model, experts, hidden, top-k, layers, rank
RNG = np.random.default_rng(29)
X = RNG.normal(size=(B, S, M)).astype(np.float32)
EXPERT_KERNELS = ("moe/wi_0", "moe/wi_1", "moe/wo")


# -- the block ----------------------------------------------------------------------------------
def _route(gate: jax.Array, xt: jax.Array) -> tuple[jax.Array, jax.Array]:
    top, idx = jax.lax.top_k(xt @ gate, K)
    return jax.nn.softmax(top, axis=-1), idx


def dense_block(p: Any, x: jax.Array) -> jax.Array:
    """MaxText's dense path: every token through every expert, the expert axis free in wi."""
    w, idx = _route(p["gate"]["kernel"], x.reshape(-1, M))
    comb = jnp.einsum("tk,tke->te", w, jax.nn.one_hot(idx, E, dtype=w.dtype)).reshape(
        *x.shape[:2], E
    )
    h0 = jnp.einsum("BSM,EMH->BSEH", x, p["wi_0"])
    h1 = jnp.einsum("BSM,EMH->BSEH", x, p["wi_1"])
    out = jnp.einsum("BSEH,EHM->BSEM", jax.nn.silu(h0) * h1, p["wo"])
    return jnp.einsum("BSEM,BSE->BSM", out, comb)


def dense_block_respelled(p: Any, x: jax.Array) -> jax.Array:
    """The dense path spelled otherwise: ``wi_0`` as the lhs of its ``dot_general`` (the output
    ``(E, H, B, S)``, transposed), ``wi_1``'s output transposed, and ``h`` reshaped to
    ``(tokens, E, H)`` before ``wo``: the free expert axis is followed through each."""
    w, idx = _route(p["gate"]["kernel"], x.reshape(-1, M))
    comb = jnp.einsum("tk,tke->te", w, jax.nn.one_hot(idx, E, dtype=w.dtype))
    h0 = jax.lax.dot_general(p["wi_0"], x, (((1,), (2,)), ((), ())))  # (E, H, B, S)
    h0 = jnp.transpose(h0, (2, 3, 0, 1))
    h1 = jnp.transpose(jnp.einsum("EMH,BSM->EBSH", p["wi_1"], x), (1, 2, 0, 3))
    h = (jax.nn.silu(h0) * h1).reshape(-1, E, H)
    out = jnp.einsum("EHM,TEH->TEM", p["wo"], h)
    return jnp.einsum("TEM,TE->TM", out, comb).reshape(x.shape)


@jax.jit
def _grouped(xs: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, gs: jax.Array) -> Any:
    h = jax.nn.silu(jax.lax.ragged_dot(xs, wi_0, gs)) * jax.lax.ragged_dot(xs, wi_1, gs)
    return jax.lax.ragged_dot(h, wo, gs), 0.0  # a constant beside the product: a Literal outvar


def sparse_block(p: Any, x: jax.Array) -> jax.Array:
    """MaxText's sparse path without megablox: assignments sorted by expert, ``ragged_dot``."""
    xt = x.reshape(-1, M)
    w, idx = _route(p["gate"]["kernel"], xt)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat)
    gs = jnp.bincount(flat, length=E).astype(jnp.int32)
    out, _ = _grouped(xt[order // K], p["wi_0"], p["wi_1"], p["wo"], gs)
    out = out * w.reshape(-1)[order][:, None]
    return jnp.zeros_like(xt).at[order // K].add(out).reshape(x.shape)


BLOCKS = {"dense": dense_block, "sparse": sparse_block}
RESPELLED = {**BLOCKS, "respelled": dense_block_respelled}


def model(block: str, params: Any, x: jax.Array) -> jax.Array:
    return RESPELLED[block](params["moe"], x)


def layered_model(block: str, params: Any, x: jax.Array) -> jax.Array:
    """``L`` residual blocks as one ``lax.scan`` over kernels with a leading layer axis."""

    def layer(h: jax.Array, p: Any) -> tuple[jax.Array, None]:
        return h + BLOCKS[block](p, h), None

    return jax.lax.scan(layer, x, params["moe"])[0]


def make_params(layers: int | None = None) -> Any:
    lead = () if layers is None else (layers,)
    shapes = {"wi_0": (E, M, H), "wi_1": (E, M, H), "wo": (E, H, M)}
    moe: dict[str, Any] = {k: RNG.normal(size=(*lead, *s)) * 0.3 for k, s in shapes.items()}
    moe["gate"] = {"kernel": RNG.normal(size=(*lead, M, E))}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), {"moe": moe})


PARAMS = make_params()
LAYERED = make_params(L)


def _init(params: Any, probe: Any, seed: int = 0) -> Any:
    config = lora.LoraConfig(rank=R, alpha=4.0, init="random")
    return lora.init(jax.random.key(seed), params, config, probe=probe)


# -- the float64 references ---------------------------------------------------------------------
def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def merged64(params: Any, adapters: Any, layered: bool = False) -> dict[str, np.ndarray]:
    """Each kernel merged in float64: ``W_e = W0_e + scale * a_e @ b_e`` per expert (and layer)
    for ``(E, in, out)`` kernels, ``W0 + scale * a @ b`` for the gate."""
    entries = adapter_entries(adapters)
    out = {}
    for path, w0 in leaves_by_path(params).items():
        w = np.asarray(w0, np.float64)
        if path in entries:
            a, b = (np.asarray(t, np.float64) for t in (entries[path].a, entries[path].b))
            eq = "...ir,...ro->...io"  # leading layer / expert axes: one product per index
            w = w + entries[path].scale * np.einsum(eq, a, b)
        out[path] = w
    return out


def _block64(k: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    xt = x.reshape(-1, M)
    logits = xt @ k["gate"]
    out = np.zeros_like(xt)
    for t in range(xt.shape[0]):
        top = np.argsort(-logits[t])[:K]
        w = np.exp(logits[t, top] - logits[t, top].max())
        w = w / w.sum()
        for j, e in enumerate(top):
            h = _silu(xt[t] @ k["wi_0"][e]) * (xt[t] @ k["wi_1"][e])
            out[t] += w[j] * (h @ k["wo"][e])
    return out.reshape(x.shape)


def ref64(kernels: dict[str, np.ndarray], x: np.ndarray, layered: bool = False) -> np.ndarray:
    """The block (or the layered stack) in float64 numpy, token by token, expert by expert."""
    names = {"gate": "moe/gate/kernel", "wi_0": "moe/wi_0", "wi_1": "moe/wi_1", "wo": "moe/wo"}
    x = np.asarray(x, np.float64)
    if not layered:
        return _block64({k: kernels[p] for k, p in names.items()}, x)
    for i in range(L):
        x = x + _block64({k: kernels[p][i] for k, p in names.items()}, x)
    return x


# -- 1. probes over sub-jaxprs that return a constant ---------------------------------------------
def _body(w: jax.Array, x: jax.Array) -> tuple[jax.Array, float]:
    return x @ w, 1.0


@jax.custom_jvp
def _custom(w: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x @ w, jnp.float32(1.0)


@_custom.defjvp
def _custom_jvp(primals: Any, tangents: Any) -> Any:
    (w, x), (dw, dx) = primals, tangents
    return _custom(w, x), (x @ dw + dx @ w, jnp.float32(0.0))


CONSTANT_OUT = {
    "jit": lambda w, x: jax.jit(_body)(w, x)[0],
    "remat": lambda w, x: jax.checkpoint(_body)(w, x)[0],
    "custom_jvp": lambda w, x: _custom(w, x)[0],
    "cond": lambda w, x: jax.lax.cond(jnp.sum(x) > -1e9, _body, _body, w, x)[0],
    "scan": lambda w, x: jax.lax.scan(lambda c, _: (c, _body(w, x)), 0.0, None, length=2)[1][0][1],
}
FACTORABLE = {
    "jit",
    "remat",
    "scan",
}  # custom derivatives and cond are merged (docs/guides/wrap.md)


def _literal_outvars(jaxpr: Any) -> list[str]:
    """The primitives of the equations whose sub-jaxprs return a literal."""
    found = []
    for eqn, _ in walk(jaxpr):
        for value in eqn.params.values():
            for v in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "outvars") and any(
                    isinstance(o, jax.extend.core.Literal) for o in inner.outvars
                ):
                    found.append(eqn.primitive.name)
    return found


@pytest.mark.parametrize("construct", list(CONSTANT_OUT))
def test_probe_through_a_sub_jaxpr_returning_a_constant(construct: str) -> None:
    f = CONSTANT_OUT[construct]
    params = {"dense": {"kernel": jnp.asarray(RNG.normal(size=(M, H)), jnp.float32)}}
    apply = lambda p, x: f(p["dense"]["kernel"], x)
    x = jnp.asarray(X[0])
    assert _literal_outvars(jax.make_jaxpr(apply)(params, x).jaxpr), "no Literal outvar built"
    adapters = _init(params, lambda p: apply(p, x))
    w = adapter_entries(adapters)["dense/kernel"]
    assert (w.a.shape, w.b.shape, w.in_axes) == ((M, R), (R, H), (0,))
    kernel = merged64(params, adapters)["dense/kernel"]
    want = np.asarray(x, np.float64) @ kernel
    merged = apply(lora.merge(params, adapters), x)
    assert rel_err(merged, want) < 1e-5
    for mode in ("auto", "merged", *(("factored",) if construct in FACTORABLE else ())):
        got = lora.wrap(apply, mode=mode)(params, adapters, x)
        assert rel_err(got, want) < 1e-5, mode
        assert rel_err(got, merged) < 1e-5, mode


def test_sparse_path_probe_sees_a_literal_outvar() -> None:
    """The sparse block's grouped products are in a ``jit`` whose body returns a Literal (on
    every JAX this runs on), which the probe and the interpreter must not hash."""
    jaxpr = jax.make_jaxpr(lambda p: model("sparse", p, jnp.asarray(X)))(PARAMS).jaxpr
    assert "jit" in _literal_outvars(jaxpr) or "pjit" in _literal_outvars(jaxpr)
    _init(PARAMS, lambda p: model("sparse", p, jnp.asarray(X)))  # no TypeError


# -- 2. and 3. one LoRA per expert on both paths, the same structure -----------------------------
def _structure(adapters: Any) -> dict[str, Any]:
    return {
        p: (w.a.shape, w.b.shape, w.in_axes, w.expert_axes, w.kernel_shape)
        for p, w in adapter_entries(adapters).items()
    }


def test_both_paths_give_one_lora_per_expert_of_the_same_structure() -> None:
    found = {
        block: _structure(_init(PARAMS, functools.partial(model, block, x=jnp.asarray(X))))
        for block in RESPELLED
    }
    assert found["dense"] == found["sparse"] == found["respelled"]
    s = found["dense"]
    assert s["moe/wi_0"] == ((E, M, R), (E, R, H), (1,), (0,), (E, M, H))
    assert s["moe/wi_1"] == s["moe/wi_0"]
    assert s["moe/wo"] == ((E, H, R), (E, R, M), (1,), (0,), (E, H, M))
    assert s["moe/gate/kernel"] == ((M, R), (R, E), (0,), (), (M, E))


def test_layered_stack_gives_one_lora_per_layer_and_expert() -> None:
    found = {
        block: _structure(_init(LAYERED, functools.partial(layered_model, block, x=jnp.asarray(X))))
        for block in BLOCKS
    }
    assert found["dense"] == found["sparse"]
    w = adapter_entries(_init(LAYERED, functools.partial(layered_model, "dense", x=X)))
    assert w["moe/wi_0"].a.shape == (L, E, M, R) and w["moe/wi_0"].b.shape == (L, E, R, H)
    assert w["moe/wi_0"].layer_axes == 1 and w["moe/wi_0"].expert_axes == (1,)
    assert w["moe/wo"].a.shape == (L, E, H, R) and w["moe/wo"].b.shape == (L, E, R, M)


CASES = [*((block, False) for block in RESPELLED), *((block, True) for block in BLOCKS)]


def _case(block: str, layered: bool) -> tuple[Any, Any]:
    fn = functools.partial(layered_model if layered else model, block)
    return (LAYERED if layered else PARAMS), fn


@pytest.mark.parametrize(("block", "layered"), CASES)
def test_every_mode_equals_the_merged_model_and_a_float64_reference(
    block: str, layered: bool
) -> None:
    params, fn = _case(block, layered)
    x = jnp.asarray(X)
    adapters = _init(params, lambda p: fn(p, x))
    want = ref64(merged64(params, adapters), X, layered)
    assert rel_err(ref64(merged64(params, {}), X, layered), want) > 1e-2  # deltas matter
    merged = fn(lora.merge(params, adapters), x)
    assert rel_err(merged, want) < 2e-5
    for mode in ("factored", "auto", "merged"):
        got = jax.jit(lora.wrap(fn, mode=mode))(params, adapters, x)
        assert rel_err(got, want) < 2e-5, mode
        assert rel_err(got, merged) < 2e-5, mode


def _grads(fn: Any, params: Any, adapters: Any, mode: str) -> dict[str, tuple[Any, Any]]:
    cot = jnp.asarray(np.random.default_rng(1).normal(size=X.shape), jnp.float32)
    loss = lambda ad: jnp.sum(lora.wrap(fn, mode=mode)(params, ad, jnp.asarray(X)) * cot)
    g = jax.jit(jax.grad(loss))(adapters)
    return {p: (w.a, w.b) for p, w in adapter_entries(g).items()}


@pytest.mark.parametrize("layered", [False, True])
def test_gradients_agree_across_modes_and_paths(layered: bool) -> None:
    params, dense_fn = _case("dense", layered)
    adapters = _init(params, lambda p: dense_fn(p, jnp.asarray(X)))
    want = _grads(dense_fn, params, adapters, "merged")
    for block in BLOCKS:
        fn = _case(block, layered)[1]
        for mode in ("factored", "auto", "merged"):
            got = _grads(fn, params, adapters, mode)
            for path, (ga, gb) in want.items():
                assert rel_err(got[path][0], ga) < 1e-4, (block, mode, path)
                assert rel_err(got[path][1], gb) < 1e-4, (block, mode, path)


def test_factored_dense_path_forms_no_expert_kernel() -> None:
    """Forward and backward of the dense path in factored mode hold no ``(E, M, H)``-like array
    (the base kernels enter as inputs; no adapted kernel, no kernel-sized gradient)."""
    fn = functools.partial(model, "dense")
    adapters = _init(PARAMS, lambda p: fn(p, jnp.asarray(X)))
    loss = lambda ad: jnp.sum(lora.wrap(fn, mode="factored")(PARAMS, ad, jnp.asarray(X)))
    shapes = jaxpr_shapes(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr)
    kernel_like = [s for s in shapes if sorted(s) == sorted((E, M, H))]
    assert not kernel_like, kernel_like


def test_adapter_trained_on_one_path_runs_on_the_other() -> None:
    x = jnp.asarray(X)
    target = jnp.asarray(np.random.default_rng(2).normal(size=X.shape), jnp.float32)
    for src, dst in (("dense", "sparse"), ("sparse", "dense")):
        fn = functools.partial(model, src)
        adapters = _init(PARAMS, lambda p, fn=fn: fn(p, x))
        loss = lambda ad, fn=fn: jnp.mean((lora.wrap(fn)(PARAMS, ad, x) - target) ** 2)
        step = jax.jit(
            lambda ad, loss=loss: jax.tree.map(lambda w, g: w - 0.02 * g, ad, jax.grad(loss)(ad))
        )
        trained = adapters
        for _ in range(3):
            trained = step(trained)
        assert loss(trained) < loss(adapters)
        want = ref64(merged64(PARAMS, trained), X)
        for block in (src, dst):
            got = lora.wrap(functools.partial(model, block), mode="factored")(PARAMS, trained, x)
            assert rel_err(got, want) < 2e-5, (src, block)


def test_merge_and_unmerge_per_expert() -> None:
    adapters = _init(PARAMS, lambda p: model("dense", p, jnp.asarray(X)))
    merged = lora.merge(PARAMS, adapters)
    want = merged64(PARAMS, adapters)
    for path, w in leaves_by_path(merged).items():
        assert rel_err(w, want[path]) < 1e-6, path
    back = leaves_by_path(lora.unmerge(merged, adapters))
    for path, w in leaves_by_path(PARAMS).items():
        assert np.max(np.abs(np.asarray(back[path]) - np.asarray(w))) < 1e-5, path


def test_save_peft_and_load_peft_on_either_path(tmp_path: Any) -> None:
    """Written from the dense path's adapters, read back with the sparse path's probe (and the
    other way round): the same per-expert deltas (PEFT's ``target_parameters``)."""
    probes = {b: functools.partial(model, b, x=jnp.asarray(X)) for b in BLOCKS}
    order = ("wi_0", "wi_1", "wo")
    for src, dst in (("dense", "sparse"), ("sparse", "dense")):
        adapters = _init(PARAMS, probes[src], seed=3)
        config = lora.LoraConfig(rank=R, alpha=4.0)
        d = lora.save_peft(tmp_path / src, adapters, config, params=PARAMS, param_order=order)
        loaded = lora.load_peft(d, PARAMS, probe=probes[dst], param_order=order)
        assert _structure(loaded) == _structure(adapters)
        want, got = kernel_deltas(PARAMS, adapters), kernel_deltas(PARAMS, loaded)
        for path in EXPERT_KERNELS:
            assert rel_err(got[path], want[path]) < 1e-6, (src, path)


# -- free axes that are not expert axes ----------------------------------------------------------
def _attention(p: Any, x: jax.Array) -> jax.Array:
    """Gemma-like attention: ``q (D, N, Hd)`` and the fused ``kv (2, N, D, Hd)``, whose head
    axes are free and meet only each other (activations) as batch dimensions."""
    q = jnp.einsum("BTD,DNH->BTNH", x, p["q_einsum"]["w"])
    k, v = jnp.einsum("BTD,SKDH->SBTKH", x, p["kv_einsum"]["w"])
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)
    probs = jax.nn.softmax(logits, axis=-1)
    enc = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    return jnp.einsum("BTNH,NHD->BTD", enc, p["attn_vec_einsum"]["w"])


def test_attention_heads_stay_output_axes() -> None:
    n, hd = 2, 4
    params = {
        "q_einsum": {"w": RNG.normal(size=(M, n, hd))},
        "kv_einsum": {"w": RNG.normal(size=(2, n, M, hd))},
        "attn_vec_einsum": {"w": RNG.normal(size=(n, hd, M))},
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(X)
    adapters = _init(params, lambda p: _attention(p, x))
    s = _structure(adapters)
    assert s["q_einsum/w"] == ((M, R), (R, n, hd), (0,), (), (M, n, hd))
    assert s["kv_einsum/w"] == ((M, R), (R, 2, n, hd), (2,), (), (2, n, M, hd))
    assert s["attn_vec_einsum/w"] == ((n, hd, R), (R, M), (0, 1), (), (n, hd, M))
    merged = _attention(lora.merge(params, adapters), x)
    got = lora.wrap(_attention, mode="factored")(params, adapters, x)
    assert rel_err(got, merged) < 1e-5


def _summed(p: Any, x: jax.Array) -> jax.Array:
    """Every token through every expert, summed over the experts, then a kernel whose batch
    dimension meets only the token axis: ``E`` never meets a kernel's batch dimension."""
    h = jnp.einsum("td,edf->etf", x, p["w_in"]).sum(0)  # (T, F)
    return jnp.einsum("tf,tfd->td", h, p["w_tok"])  # the token axis batched with a kernel's


def test_a_free_axis_reduced_away_stays_an_output_axis() -> None:
    t, f = 5, 3
    params = {"w_in": RNG.normal(size=(E, M, f)), "w_tok": RNG.normal(size=(t, f, M))}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(X.reshape(-1, M)[:t])
    adapters = _init(params, lambda p: _summed(p, x))
    s = _structure(adapters)
    assert s["w_in"] == ((M, R), (R, E, f), (1,), (), (E, M, f))
    assert s["w_tok"][3] == (0,)  # its own batch dimension is an expert axis, as before
    want = _summed(lora.merge(params, adapters), x)
    assert rel_err(lora.wrap(_summed, mode="factored")(params, adapters, x), want) < 1e-5


@pytest.mark.parametrize("block", list(BLOCKS))
def test_dora_and_routing_over_free_expert_axes(block: str) -> None:
    """DoRA per expert (factored: norms per expert and output unit) and a routing stack
    (``lora_ids``, one example at a time in mode ``"auto"``) equal the merged models."""
    x = jnp.asarray(X)
    fn = functools.partial(model, block)
    probe = lambda p: fn(p, x)
    config = lora.LoraConfig(rank=R, init="random", dora=True)
    dora = jax.tree.map(
        lambda t: 1.3 * t, lora.init(jax.random.key(4), PARAMS, config, probe=probe)
    )
    assert adapter_entries(dora)["moe/wi_0"].m.shape == (E, H)
    want = fn(lora.merge(PARAMS, dora), x)
    for mode in ("factored", "auto"):
        assert rel_err(lora.wrap(fn, mode=mode)(PARAMS, dora, x), want) < 2e-5, mode
    adapters = [_init(PARAMS, probe, seed) for seed in (5, 6)]
    got = lora.wrap(fn)(PARAMS, lora.stack(adapters), x, lora_ids=jnp.arange(B))
    for i, a in enumerate(adapters):
        assert rel_err(got[i], fn(lora.merge(PARAMS, a), x)[i]) < 2e-5, i


# -- a Linen nn.scan stack, as MaxText builds its decoder ---------------------------------------
class _MoeLayer(nn.Module):
    block: str

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        init = nn.initializers.normal(0.3)
        p = {
            "gate": {"kernel": self.param("gate", nn.initializers.normal(1.0), (M, E))},
            "wi_0": self.param("wi_0", init, (E, M, H)),
            "wi_1": self.param("wi_1", init, (E, M, H)),
            "wo": self.param("wo", init, (E, H, M)),
        }
        return x + RESPELLED[self.block](p, x), None


class _Decoder(nn.Module):
    block: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = nn.scan(
            _MoeLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
        )
        return layers(self.block, name="layers")(x, None)[0]


def test_linen_scan_stack_on_either_path() -> None:
    """``nn.scan`` over MoE layers whose params are ``self.param`` leaves: the same layered,
    per-expert adapters on both paths, and every mode equals the float64 reference."""
    x = jnp.asarray(X)
    variables = _Decoder("dense").init(jax.random.key(7), x)
    found = {}
    for block in BLOCKS:
        apply = _Decoder(block).apply
        adapters = _init(variables, lambda v, apply=apply: apply(v, x))
        found[block] = _structure(adapters)
        k = {
            p.replace("params/layers", "moe").replace("moe/gate", "moe/gate/kernel"): w
            for p, w in merged64(variables, adapters).items()
        }
        want = ref64(k, X, layered=True)
        for mode in ("factored", "auto", "merged"):
            got = jax.jit(lora.wrap(apply, mode=mode))(variables, adapters, x)
            assert rel_err(got, want) < 2e-5, (block, mode)
    assert found["dense"] == found["sparse"]
    assert found["dense"]["params/layers/wi_0"] == (
        (L, E, M, R),
        (L, E, R, H),
        (2,),
        (1,),
        (L, E, M, H),
    )
