"""The JAX-version module (`flax_lora._jaxpr`) against the JAX that is installed.

One model uses every construct the probe and the interpreter read: ``jit``, ``jax.checkpoint``
with a policy, a ``scan`` with consts, carry and xs, a nested ``scan``, a ``custom_jvp``
activation, ``cond`` and ``while``. The test knows how it built each construct (how many
consts, carries and xs each scan has, its length, the remat policy) and checks that the version
module reads exactly that from the traced equations; an equation whose parameters are not the
known ones must raise an error naming the primitive. The same model, adapted with
``lora.wrap``, must equal the model run on kernels merged in float64 numpy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.internal import _jaxpr as jx  # the internal module under test
from support.jaxprs import all_eqns
from support.trees import adapter_entries

import flax_lora as lora

D, L_OUT, L_IN = 8, 3, 2
POLICY = jax.checkpoint_policies.dots_saveable


@jax.custom_jvp
def soft_act(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


@soft_act.defjvp
def _soft_act_jvp(primals: Any, tangents: Any) -> Any:
    (x,), (t,) = primals, tangents
    s = jax.nn.sigmoid(x)
    return soft_act(x), t * (s + x * s * (1 - s))


def model(params: dict[str, Any], x: jax.Array) -> jax.Array:
    bias = params["bias"]

    @jax.jit
    def embed_in(h: jax.Array) -> jax.Array:
        return h @ params["w_in"]

    h = jax.checkpoint(lambda h: soft_act(embed_in(h)), policy=POLICY)(x)

    def outer(h: jax.Array, layer: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        def inner(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
            return jnp.tanh(h @ w + bias), None  # consts: bias

        h, _ = jax.lax.scan(inner, h, layer["inner"])  # nested scan: xs (L_IN, D, D)
        h = soft_act(h @ layer["w"] + bias)
        return h, h.sum()

    h, _ = jax.lax.scan(outer, h, params["stack"])  # consts: bias; carry: h; xs: the stack
    h = jax.lax.cond(
        h.sum() > 0, lambda h: h @ params["w_out"], lambda h: -(h @ params["w_out"]), h
    )
    h, _ = jax.lax.while_loop(
        lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0] @ params["w_loop"]), c[1] + 1), (h, 0)
    )
    return h


def make_params(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
    return {
        "bias": n(D),
        "w_in": n(4, D),
        "stack": {"inner": n(L_OUT, L_IN, D, D), "w": n(L_OUT, D, D)},
        "w_out": n(D, D),
        "w_loop": n(D, D),
    }


def traced() -> list[Any]:
    """Every equation of the traced model, found without the module under test."""
    return all_eqns(jax.make_jaxpr(model)(make_params(), jnp.ones((5, 4))).jaxpr)


def test_every_construct_is_recognised() -> None:
    eqns = traced()
    names = {e.primitive.name for e in eqns}
    assert names & {"jit", "pjit"}
    assert names & {"remat2", "checkpoint"}
    assert {"scan", "cond", "while", "custom_jvp_call", "dot_general"} <= names

    scans = sorted(
        (s.length, s.num_consts, s.num_carry, s.num_xs)
        for s in (jx.scan(e) for e in eqns if e.primitive.name == "scan")
    )
    # the inner scan (length 2) closes over bias and, within the outer body, nothing else;
    # the outer one (length 3) over bias; each has one carry (h); xs: w, or the two stacks
    assert scans == [(L_IN, 1, 1, 1), (L_OUT, 1, 1, 2)]
    for e in eqns:
        view = jx.construct(e)
        name = e.primitive.name
        if name in ("jit", "pjit"):
            assert isinstance(view, jx.Call) and len(view.body.jaxpr.invars) == len(e.invars)
        elif name in ("remat2", "checkpoint"):
            assert isinstance(view, jx.Remat) and view.policy is POLICY
        elif name == "custom_jvp_call":
            assert isinstance(view, jx.CustomCall)
            assert len(view.body.jaxpr.invars) == len(e.invars)
        elif name == "scan":
            assert isinstance(view, jx.Scan)
        elif name == "cond":
            assert isinstance(view, jx.Cond) and len(view.branches) == 2
        elif name == "while":
            assert isinstance(view, jx.While)
            # carry (h, i); the body closes over w_loop, the cond over nothing
            assert (view.cond_nconsts, view.body_nconsts) == (0, 1)
        elif name == "dot_general":
            assert isinstance(view, jx.Dot) and view.lhs_contract == (e.invars[0].aval.ndim - 1,)
        else:
            assert view is None


@pytest.mark.parametrize("name", ["scan", "cond", "while", "jit", "remat", "custom_jvp_call"])
def test_changed_equation_names_the_primitive(name: str) -> None:
    """A JAX release that changes a primitive's parameters fails in the version module, with an
    error naming the primitive (simulated: the equation's parameters replaced)."""
    eqns = traced()
    names = {"jit": ("jit", "pjit"), "remat": ("remat2", "checkpoint")}.get(name, (name,))
    eqn = next(e for e in eqns if e.primitive.name in names)
    changed = eqn.replace(params={"renamed_by_a_future_jax": 1})
    with pytest.raises(jx.UnsupportedJaxError, match=f"`{eqn.primitive.name}` equation"):
        jx.construct(changed)


def test_missing_first_order_parameter_names_it() -> None:
    eqn = next(e for e in traced() if e.primitive.name == "dot_general")
    with pytest.raises(jx.UnsupportedJaxError, match=r"`dot_general`.*dimension_numbers"):
        jx.dot(eqn.replace(params={}))


def merged64(params: dict[str, Any], adapters: Any) -> dict[str, Any]:
    """Every adapted kernel as ``W0 + scale * a @ b`` in float64 numpy (layer by layer for the
    stacked ones: the factors carry the kernel's leading layer axes)."""
    out = jax.tree.map(np.asarray, params)
    for path, w in adapter_entries(adapters).items():
        keys = path.split("/")
        node = out
        for k in keys[:-1]:
            node = node[k]
        a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
        node[keys[-1]] = (node[keys[-1]].astype(np.float64) + w.scale * (a @ b)).astype(np.float32)
    return out


@pytest.mark.parametrize("mode", ["auto", "merged"])
def test_model_with_every_construct_adapts(mode: str) -> None:
    params = make_params()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)), jnp.float32)
    cfg = lora.LoraConfig(rank=2, alpha=4.0, init="random")
    adapters = lora.init(jax.random.key(0), params, cfg, probe=lambda p: model(p, x))
    table = adapter_entries(adapters)
    assert sorted(table) == ["stack/inner", "stack/w", "w_in", "w_loop", "w_out"]
    assert table["stack/inner"].a.shape == (L_OUT, L_IN, D, 2)  # one adapter per layer
    got = jax.jit(lora.wrap(model, mode=mode))(params, adapters, x)
    want = model(merged64(params, adapters), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    base = model(params, x)
    assert float(jnp.max(jnp.abs(got - base))) > 1e-3  # the adapters do change the output


def test_probe_sees_through_shard_map() -> None:
    """A kernel used inside ``jax.shard_map`` (any primitive whose ``jaxpr`` takes its operands)
    is found by the probe, and mode "auto" merges it there (no factored rule for shard_map)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    spec = jax.sharding.PartitionSpec()

    def f(params: dict[str, Any], x: jax.Array) -> jax.Array:
        body = lambda w, h: jnp.tanh(h @ w)
        return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(params["w"], x)

    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (4, 6)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    cfg = lora.LoraConfig(rank=2, init="random")
    adapters = lora.init(jax.random.key(0), params, cfg, probe=lambda p: f(p, x))
    assert adapter_entries(adapters)["w"].a.shape == (4, 2)  # rows are the input axis
    got = jax.jit(lora.wrap(f))(params, adapters, x)
    want = f(merged64(params, adapters), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
