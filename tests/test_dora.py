"""DoRA (``LoraConfig(dora=True)``) against a float64 numpy reference (against real PEFT:
tests/test_dora_peft.py).

The reference is the formula of Liu et al. 2024 as PEFT computes it, written here in numpy:
``W = m * V / ||V||`` with ``V = W0 + scale * a @ b`` and the norm taken over the kernel's input
axes, one value per output unit. Gradients are derived by hand for a linear loss
``L = sum(c * y)`` of one layer: with ``G = dL/dW`` (known in closed form for each layer) and the
norm detached, ``dL/dV = G * m / ||V||``, ``dL/dm = sum_in(G * V) / ||V||``,
``dL/da = scale * dL/dV @ b.T`` and ``dL/db = scale * a.T @ dL/dV``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.compare import rel_err
from support.jaxprs import all_eqns
from support.refs import as_matrix, from_matrix
from support.trees import adapter_entries, is_lora

import flax_lora as lora

F32_TOL = 2e-5  # relative, for float32 computations against float64
GRAD_TOL = 1e-4  # relative, for float32 gradients against float64
MODES = ("merged", "factored", "auto")


# -- the float64 reference -------------------------------------------------------------------
def reference(w0: np.ndarray, ad: Any) -> dict[str, np.ndarray]:
    """The DoRA kernel and the pieces of its gradient, in float64, from the numpy formula."""
    in_axes = tuple(ad.in_axes)
    r = ad.a.shape[-1]
    a = np.asarray(ad.a, np.float64).reshape(-1, r)
    b = np.asarray(ad.b, np.float64).reshape(r, -1)
    m = np.asarray(ad.m, np.float64).reshape(-1)
    v = as_matrix(np.asarray(w0, np.float64), in_axes) + ad.scale * a @ b
    norm = np.sqrt((v**2).sum(axis=0))
    w = v * (m / norm)[None, :]
    return dict(w=from_matrix(w, w0.shape, in_axes), v=v, norm=norm, a=a, b=b, m=m)


def reference_grads(ref: dict[str, np.ndarray], g_kernel: np.ndarray, ad: Any) -> dict:
    """Gradients w.r.t. a, b, m (norm detached) given ``G = dL/dW`` in kernel layout."""
    g = as_matrix(g_kernel, tuple(ad.in_axes))
    dv = g * (ref["m"] / ref["norm"])[None, :]
    return dict(
        a=(ad.scale * dv @ ref["b"].T).reshape(ad.a.shape),
        b=(ad.scale * ref["a"].T @ dv).reshape(ad.b.shape),
        m=((g * ref["v"]).sum(axis=0) / ref["norm"]).reshape(ad.m.shape),
    )


# -- one-layer cases: the layer, its input, and numpy's y = f(x, W) and G = dL/dW for L = sum(c*y)
def _patches(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """``P[n, i, j, p, q, c] = x[n, i + p, j + q, c]`` (VALID, stride 1)."""
    n, h, w, c = x.shape
    out = np.empty((n, h - kh + 1, w - kw + 1, kh, kw, c))
    for p in range(kh):
        for q in range(kw):
            out[:, :, :, p, q, :] = x[:, p : p + h - kh + 1, q : q + w - kw + 1, :]
    return out


def _embed_grad(ids: np.ndarray, c: np.ndarray, vocab: int) -> np.ndarray:
    g = np.zeros((vocab, c.shape[-1]))
    np.add.at(g, ids.reshape(-1), c.reshape(-1, c.shape[-1]))
    return g


class Attend(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Embed(11, 6, name="e").attend(x)


CASES: dict[str, dict[str, Any]] = {
    "dense": dict(
        module=nn.Dense(5, use_bias=False),
        x=lambda: np.random.default_rng(0).normal(size=(2, 3, 4)),
        in_axes=(0,),
        y=lambda x, w: np.einsum("bti,io->bto", x, w),
        g=lambda x, c: np.einsum("bti,bto->io", x, c),
    ),
    "dense_general_qkv": dict(  # (d, heads, head_dim)
        module=nn.DenseGeneral((2, 3), use_bias=False),
        x=lambda: np.random.default_rng(1).normal(size=(2, 3, 4)),
        in_axes=(0,),
        y=lambda x, w: np.einsum("bti,ihk->bthk", x, w),
        g=lambda x, c: np.einsum("bti,bthk->ihk", x, c),
    ),
    "dense_general_out": dict(  # (heads, head_dim, d)
        module=nn.DenseGeneral(5, axis=(-2, -1), use_bias=False),
        x=lambda: np.random.default_rng(2).normal(size=(2, 3, 2, 3)),
        in_axes=(0, 1),
        y=lambda x, w: np.einsum("bthk,hko->bto", x, w),
        g=lambda x, c: np.einsum("bthk,bto->hko", x, c),
    ),
    "embed": dict(
        module=nn.Embed(11, 6),
        x=lambda: np.random.default_rng(3).integers(0, 11, size=(2, 5)),
        in_axes=(0,),
        y=lambda ids, w: w[ids],
        g=lambda ids, c: _embed_grad(ids, c, 11),
    ),
    "embed_attend": dict(  # the table contracted on its output axis (tied output embedding)
        module=Attend(),
        x=lambda: np.random.default_rng(4).normal(size=(2, 3, 6)),
        in_axes=(0,),
        y=lambda x, w: np.einsum("btd,vd->btv", x, w),
        g=lambda x, c: np.einsum("btv,btd->vd", c, x),
    ),
    "conv": dict(
        module=nn.Conv(5, (3, 3), padding="VALID", use_bias=False),
        x=lambda: np.random.default_rng(5).normal(size=(2, 6, 6, 4)),
        in_axes=(0, 1, 2),
        y=lambda x, w: np.einsum("nijpqc,pqco->nijo", _patches(x, 3, 3), w),
        g=lambda x, c: np.einsum("nijpqc,nijo->pqco", _patches(x, 3, 3), c),
    ),
}


def _as_input(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x) if x.dtype.kind in "iu" else jnp.asarray(x, jnp.float32)


@functools.cache
def _case(name: str, init: str = "random") -> tuple[Any, Any, Any, str, np.ndarray]:
    """(apply, params, adapters, kernel path, x) for a case; m is moved off its init value."""
    case = CASES[name]
    x = case["x"]()
    xj = _as_input(x)
    module = case["module"]
    shapes = jax.eval_shape(module.init, jax.random.key(0), xj)
    rng = np.random.default_rng(10)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
    probe = lambda p: module.apply(p, xj)
    config = lora.LoraConfig(rank=2, alpha=3.0, init=init, dora=True)
    adapters = lora.init(jax.random.key(1), params, config, probe=probe)
    (path,) = adapter_entries(adapters)
    if init == "random":
        adapters = jax.tree.map(
            lambda w: w.replace(m=w.m * (1.0 + 0.3 * jnp.asarray(rng.normal(size=w.m.shape)))),
            adapters,
            is_leaf=is_lora,
        )
    return module.apply, params, adapters, path, x


def _entry(adapters: Any) -> Any:
    (w,) = jax.tree.leaves(adapters, is_leaf=is_lora)
    return w


def _kernel_of(params: Any, path: str) -> np.ndarray:
    node = params
    for part in path.split("/"):
        node = node[part]
    return np.asarray(node, np.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_gradients_match_float64_reference(name: str, mode: str) -> None:
    apply, params, adapters, path, x = _case(name)
    case = CASES[name]
    ad = _entry(adapters)
    assert tuple(ad.in_axes) == case["in_axes"]
    assert ad.m.shape == ad.out_shape
    ref = reference(_kernel_of(params, path), ad)
    x64 = x if x.dtype.kind in "iu" else np.asarray(np.asarray(x, np.float32), np.float64)
    y_ref = case["y"](x64, ref["w"])
    fn = jax.jit(lora.wrap(apply, mode=mode))
    xj = _as_input(x)
    y = fn(params, adapters, xj)
    assert rel_err(y, y_ref) < F32_TOL
    base = case["y"](x64, _kernel_of(params, path))
    assert np.abs(y_ref - base).max() > 0.1 * np.abs(base).max()  # DoRA changes the layer

    c = np.random.default_rng(20).normal(size=y_ref.shape)
    grads = jax.jit(jax.grad(lambda ad: jnp.sum(fn(params, ad, xj) * jnp.asarray(c, y.dtype))))(
        adapters
    )
    g_ref = reference_grads(ref, case["g"](x64, c), ad)
    got = _entry(grads)
    for leaf in ("a", "b", "m"):
        assert rel_err(getattr(got, leaf), g_ref[leaf]) < GRAD_TOL, leaf


@pytest.mark.parametrize("init", ["lora", "gaussian"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_identity_at_init(name: str, init: str) -> None:
    apply, params, adapters, path, x = _case(name, init)
    ad = _entry(adapters)
    w0 = _kernel_of(params, path)
    norm = np.sqrt((as_matrix(w0, tuple(ad.in_axes)) ** 2).sum(axis=0)).reshape(ad.out_shape)
    np.testing.assert_allclose(np.asarray(ad.m), norm, rtol=1e-6)  # m = ||W0|| per output
    xj = _as_input(x)
    base = np.asarray(apply(params, xj))
    for mode in MODES:
        y = lora.wrap(apply, mode=mode)(params, adapters, xj)
        np.testing.assert_allclose(np.asarray(y), base, rtol=1e-5, atol=1e-5 * np.abs(base).max())


# -- a tied-embedding model: one table gathered and attended, with the other kinds ---------------
class Tiny(nn.Module):
    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        embed = nn.Embed(13, 8)
        h = embed(ids)  # (B, T, 8)
        h = h + nn.Conv(8, (3,), name="conv")(h)
        h = h + nn.MultiHeadDotProductAttention(2, qkv_features=8, name="attn")(h)  # q, k, v
        q = nn.DenseGeneral((2, 4), name="q")(h)
        h = h + nn.DenseGeneral(8, axis=(-2, -1), name="o")(jnp.tanh(q))
        h = nn.Dense(8, name="mlp")(nn.gelu(h))
        return embed.attend(h)


TINY_IDS = np.random.default_rng(30).integers(0, 13, size=(3, 6))


@functools.cache
def _tiny() -> tuple[Any, Any]:
    model = Tiny()
    params = model.init(jax.random.key(0), TINY_IDS)
    config = lora.LoraConfig(rank=3, alpha=5.0, init="random", dora=True)
    adapters = lora.init(
        jax.random.key(2), params, config, probe=lambda p: model.apply(p, TINY_IDS)
    )
    rng = np.random.default_rng(31)
    adapters = jax.tree.map(
        lambda w: w.replace(m=w.m * (1.0 + 0.3 * jnp.asarray(rng.normal(size=w.m.shape)))),
        adapters,
        is_leaf=is_lora,
    )
    return params, adapters


def test_whole_model_modes_agree_and_factored_forms_no_kernel() -> None:
    model = Tiny()
    params, adapters = _tiny()
    ref = model.apply(lora.merge(params, adapters), TINY_IDS)
    loss = lambda fn: lambda ad: jnp.sum(jnp.sin(fn(params, ad, TINY_IDS)))
    g_ref = jax.grad(lambda ad: jnp.sum(jnp.sin(model.apply(lora.merge(params, ad), TINY_IDS))))(
        adapters
    )
    for mode in MODES:
        fn = lora.wrap(model.apply, mode=mode)
        assert rel_err(jax.jit(fn)(params, adapters, TINY_IDS), np.asarray(ref, np.float64)) < 1e-5
        g = jax.jit(jax.grad(loss(fn)))(adapters)
        for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
            assert rel_err(u, np.asarray(v, np.float64)) < 1e-4

    kernels = {w.kernel_shape for w in jax.tree.leaves(adapters, is_leaf=is_lora)}

    def shapes(mode: str, ad: Any = adapters) -> set[tuple[int, ...]]:
        jaxpr = jax.make_jaxpr(jax.grad(loss(lora.wrap(model.apply, mode=mode))))(ad)
        return {tuple(v.aval.shape) for e in all_eqns(jaxpr.jaxpr) for v in e.outvars} & kernels

    # no kernel-sized array beyond plain LoRA's: that is only the conv's W0 flipped (`rev`) for
    # the gradient of its input, which is no adapted kernel
    plain = jax.tree.map(lambda w: w.replace(m=None), adapters, is_leaf=is_lora)
    assert shapes("factored") == shapes("factored", plain) == {(3, 8, 8)}
    assert shapes("merged") == kernels  # the check does see a formed kernel


def test_unfactorable_use_merges_in_auto_and_raises_in_factored() -> None:
    fn = lambda p, x: x @ (p["w"] * 2.0)  # arithmetic on the kernel itself
    rng = np.random.default_rng(35)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    config = lora.LoraConfig(rank=2, init="random", dora=True, targets="w")
    adapters = lora.init(jax.random.key(0), params, config)
    adapters = {"w": adapters["w"].replace(m=adapters["w"].m * 1.7)}
    with pytest.raises(ValueError, match=r"'w'.*`mul`"):
        lora.wrap(fn, mode="factored")(params, adapters, x)
    ref = np.asarray(x, np.float64) @ (2.0 * reference(np.asarray(params["w"]), adapters["w"])["w"])
    assert rel_err(lora.wrap(fn)(params, adapters, x), ref) < F32_TOL


def test_dropout_follows_peft() -> None:
    """With LoRA dropout PEFT computes ``x @ W0 + (g - 1) * (drop(x) @ W0) + g * low(drop(x))``
    (``g = m / ||V||``): its mean is the model without dropout, and its variance per output
    unit is ``p / (1 - p) * sum_i x_i**2 * C_ij**2`` with ``C = (g - 1) * W0 + g * scale * a @ b``
    (float64 reference from the formula)."""
    rate, n, d_in, d_out = 0.3, 20000, 16, 3
    model = nn.Dense(d_out)
    row = np.random.default_rng(40).normal(size=(1, d_in)).astype(np.float32)
    params = model.init(jax.random.key(0), row)
    config = lora.LoraConfig(rank=4, alpha=8.0, init="random", dropout=rate, dora=True)
    adapters = lora.init(jax.random.key(1), params, config)
    adapters = jax.tree.map(lambda w: w.replace(m=w.m * 1.5), adapters, is_leaf=is_lora)
    fn = jax.jit(lora.wrap(model.apply, mode="factored"))
    x = jnp.tile(row, (n, 1))
    y = np.asarray(fn(params, adapters, x, lora_rng=jax.random.key(5)), np.float64)
    ad = _entry(adapters)
    w0 = np.asarray(params["params"]["kernel"], np.float64)
    ref = reference(w0, ad)
    xr = row[0].astype(np.float64)
    mean = xr @ ref["w"] + np.asarray(params["params"]["bias"], np.float64)
    g = ref["m"] / ref["norm"]
    c = (g - 1.0)[None, :] * w0 + g[None, :] * (ad.scale * ref["a"] @ ref["b"])
    var = rate / (1.0 - rate) * (xr**2) @ (c**2)
    assert np.all(np.abs(y.mean(0) - mean) < 5 * np.sqrt(var / n))
    np.testing.assert_allclose(y.var(0), var, rtol=0.08)
    # without a key: no dropout, as merged
    assert rel_err(fn(params, adapters, x[:2]), np.stack([mean, mean])) < F32_TOL


# -- the adapter tree ------------------------------------------------------------------------
def test_leaves_trainable_and_summary() -> None:
    params, adapters = _tiny()
    table = adapter_entries(adapters)
    leaves = jax.tree.leaves(adapters)
    assert len(leaves) == 3 * len(table)  # a, b and m; never a base weight
    plain = jax.tree.map(lambda w: w.replace(m=None), adapters, is_leaf=is_lora)
    assert len(jax.tree.leaves(plain)) == 2 * len(table)
    for w in table.values():
        assert w.m.shape == w.out_shape and w.m.dtype == jnp.float32

    mask = lora.trainable({"params": params, "lora": adapters})
    assert all(jax.tree.leaves(mask["lora"]))
    assert not any(jax.tree.leaves(mask["params"]))
    tree = {"params": params, "lora": adapters}
    tx = lora.freeze_base(optax.sgd(0.1), tree)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    for w in jax.tree.leaves(updates["lora"], is_leaf=is_lora):
        np.testing.assert_array_equal(np.asarray(w.m), np.float32(-0.1))

    s = lora.summary(params, adapters, show=False)
    expected = sum(w.a.size + w.b.size + w.m.size for w in table.values())
    assert s.trainable_params == expected


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    _, adapters = _tiny()
    lora.save(tmp_path / "ckpt", adapters)
    back = lora.load(tmp_path / "ckpt")
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    plain = jax.tree.map(lambda w: w.replace(m=None), adapters, is_leaf=is_lora)
    lora.save(tmp_path / "plain", plain)
    assert jax.tree.structure(lora.load(tmp_path / "plain")) == jax.tree.structure(plain)


def test_unmerge_combine_refuse_dora() -> None:
    params, adapters = _tiny()
    merged = lora.merge(params, adapters)
    with pytest.raises(ValueError, match=r"lora.unmerge: .*params/Embed_0/embedding.*DoRA"):
        lora.unmerge(merged, adapters)
    with pytest.raises(ValueError, match="DoRA"):
        lora.combine([adapters, adapters], [0.5, 0.5])
    # lora.stack takes DoRA adapters: tests/support/check_routing.py (the capability matrix)


def test_wrong_magnitude_shape_names_the_path() -> None:
    params, adapters = _tiny()
    bad = jax.tree.map(
        lambda w: w.replace(m=jnp.ones((2,))) if w.kernel_shape == (8, 8) else w,
        adapters,
        is_leaf=is_lora,
    )
    with pytest.raises(ValueError, match=r"params/mlp/kernel.*magnitude"):
        lora.merge(params, bad)
    with pytest.raises(ValueError, match=r"params/mlp/kernel.*magnitude"):
        lora.wrap(Tiny().apply)(params, bad, TINY_IDS)


def test_config_field() -> None:
    assert lora.LoraConfig().dora is False
    c = lora.LoraConfig(dora=True)
    assert lora.LoraConfig.from_dict(c.to_dict()) == c


def test_save_peft_refuses_mixed_dora_and_plain(tmp_path: Path) -> None:
    _, adapters = _tiny()
    mixed = jax.tree.map(
        lambda w: w.replace(m=None) if w.kernel_shape == (8, 8) else w,
        adapters,
        is_leaf=is_lora,
    )
    with pytest.raises(ValueError, match="use_dora"):
        lora.save_peft(tmp_path, mixed)


# -- kernels stacked by nn.scan (factored per layer; more in support/check_dora.py) --------
class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return jnp.tanh(nn.Dense(4)(h)), None


class _Stacked(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scan = nn.scan(
            _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return scan()(x, None)[0]


@pytest.mark.parametrize("layers", [None, (0, 2)])
def test_stacked_kernel_merges_per_layer(layers: Any) -> None:
    model = _Stacked()
    x = jnp.asarray(np.random.default_rng(70).normal(size=(2, 4)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    config = lora.LoraConfig(rank=2, init="random", layers=layers)
    adapters = lora.init(jax.random.key(1), params, config, probe=lambda p: model.apply(p, x))
    # magnitudes != the column norms (lora.init's), different on each layer
    rng = np.random.default_rng(71)
    adapters = jax.tree.map(
        lambda w: w.replace(m=jnp.asarray(rng.uniform(1.0, 2.0, size=w.a.shape[:1] + w.out_shape))),
        adapters,
        is_leaf=is_lora,
    )
    w = _entry(adapters)
    (path,) = adapter_entries(adapters)
    kernel = _kernel_of(params, path)
    bias = _kernel_of(params, path.replace("kernel", "bias"))
    h = np.asarray(x, np.float64)
    for layer in range(3):
        k = kernel[layer]
        if layers is None or layer in layers:
            v = k + w.scale * np.asarray(w.a[layer], np.float64) @ np.asarray(
                w.b[layer], np.float64
            )
            k = v * np.asarray(w.m[layer], np.float64) / np.sqrt((v**2).sum(axis=0))
        h = np.tanh(h @ k + bias[layer])
    assert rel_err(model.apply(lora.merge(params, adapters), x), h) < F32_TOL
    assert rel_err(lora.wrap(model.apply)(params, adapters, x), h) < F32_TOL
    assert rel_err(lora.wrap(model.apply, mode="factored")(params, adapters, x), h) < F32_TOL


def test_magnitude_takes_the_sharding_of_the_output_axes() -> None:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    kernel = jax.device_put(jnp.ones((4, 6)), NamedSharding(mesh, P(None, "x")))
    config = lora.LoraConfig(rank=2, dora=True, targets="w")
    w = lora.init(jax.random.key(0), {"w": kernel}, config)["w"]
    assert w.m.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 1)
    np.testing.assert_allclose(np.asarray(w.m), 2.0)  # ||ones(4)|| per output unit


def test_zero_column_stays_zero_without_nan() -> None:
    """A column of ``V = W0 + s a@b`` that is all zeros (a zero-initialised head) has no
    direction: it stays zero in every mode and in a routed stack that mixes DoRA with plain
    LoRA, and nothing is NaN (``m / ||V||`` would be 0/0)."""
    model = nn.Dense(3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    kernel = np.asarray(params["params"]["kernel"]).copy()
    kernel[:, 1] = 0.0
    params = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(3)}}
    dora = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2, dora=True))
    plain = lora.init(jax.random.key(2), params, lora.LoraConfig(rank=2))
    w = _entry(dora)
    b = np.asarray(np.random.default_rng(3).normal(size=w.b.shape), np.float32)
    b[:, 1] = 0.0
    assert list(adapter_entries(dora)) == ["params/kernel"]
    dora = {"params": {"kernel": w.replace(b=jnp.asarray(b), m=w.m * 1.5)}}
    v = kernel + w.scale * np.asarray(w.a, np.float64) @ b
    norm = np.linalg.norm(v, axis=0)
    merged = np.where(norm > 0, v * (1.5 * np.asarray(w.m)) / np.where(norm > 0, norm, 1), 0)
    want = np.asarray(x, np.float64) @ merged
    for mode in ("auto", "factored", "merged"):
        fn = jax.jit(lora.wrap(model.apply, mode=mode))
        y = np.asarray(fn(params, dora, x))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda ad, fn=fn: jnp.sum(fn(params, ad, x) ** 2))(dora)
        assert all(np.all(np.isfinite(np.asarray(t))) for t in jax.tree.leaves(g))
        stacked = lora.stack([dora, plain])
        y = np.asarray(fn(params, stacked, x, lora_ids=jnp.array([0, 1, -1, 0])))
        assert np.all(np.isfinite(y)) and np.all(y[:, 1] == 0.0), mode
        np.testing.assert_allclose(y[[0, 3]], want[[0, 3]], rtol=1e-5, atol=1e-6)
