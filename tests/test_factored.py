"""Factored execution (`lora.wrap(mode="factored" | "auto")`) against the merged model.

The reference is always ``apply(lora.merge(params, adapters), ...)``: the plain model run on
merged weights, which does not use the factored code at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.compare import rel_err
from support.jaxprs import all_eqns
from support.models import LinenTiedEmbed, NnxTiedEmbed, fill_abstract
from support.trees import is_lora

import flax_lora as lora

F32, BF16 = jnp.float32, jnp.bfloat16
CONFIG = lora.LoraConfig(rank=2, alpha=3.0, init="random")


# -- models (values drawn with numpy: eager JAX ops would each compile, and CPU is scarce) ----
def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _tokens(*shape: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, vocab, shape).astype(np.int32)


def _fill(tree: Any, seed: int, std: float = 0.5) -> Any:
    return fill_abstract(tree, seed, std)


def _linen(module: nn.Module, *args: Any) -> tuple[Callable, Any, tuple]:
    return module.apply, _fill(jax.eval_shape(module.init, jax.random.key(1), *args), 1), args


def _nnx(make: Callable[[nnx.Rngs], nnx.Module], *args: Any) -> tuple[Callable, Any, tuple]:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(1))))
    return (lambda s, *a: nnx.merge(graphdef, s)(*a)), _fill(state, 1), args


def _adapters(params: Any, config: lora.LoraConfig, probe: Callable | None = None) -> Any:
    """`lora.init`'s adapters (abstractly: no compiles), filled with nonzero values."""
    shapes = jax.eval_shape(lambda p: lora.init(jax.random.key(2), p, config, probe), params)
    return _fill(shapes, 2, std=0.3)


LAYERS: dict[str, Callable[[Any], tuple[Callable, Any, tuple]]] = {
    "linen_dense": lambda dt: _linen(nn.Dense(5, dtype=dt), _x(2, 3, 4)),
    "linen_dense_general": lambda dt: _linen(
        nn.DenseGeneral((3, 4), axis=(-2, -1), dtype=dt), _x(2, 5, 2, 6)
    ),
    "linen_mha": lambda dt: _linen(
        nn.MultiHeadDotProductAttention(2, qkv_features=8, out_features=6, dtype=dt),
        _x(2, 5, 6),
    ),
    "linen_einsum": lambda dt: _linen(nn.Einsum((6, 2, 3), "btd,dhk->bthk", dtype=dt), _x(2, 5, 6)),
    "linen_embed": lambda dt: _linen(LinenTiedEmbed(13, 6, dtype=dt), _tokens(2, 5, vocab=13)),
    "linen_conv1d": lambda dt: _linen(nn.Conv(7, (3,), dtype=dt), _x(2, 9, 4)),
    "linen_conv2d": lambda dt: _linen(
        nn.Conv(7, (3, 2), strides=2, padding="VALID", dtype=dt), _x(2, 8, 7, 4)
    ),
    "nnx_linear": lambda dt: _nnx(lambda r: nnx.Linear(6, 5, dtype=dt, rngs=r), _x(2, 3, 6)),
    "nnx_linear_general": lambda dt: _nnx(
        lambda r: nnx.LinearGeneral((2, 6), (3, 4), axis=(-2, -1), dtype=dt, rngs=r),
        _x(2, 5, 2, 6),
    ),
    "nnx_einsum": lambda dt: _nnx(
        lambda r: nnx.Einsum("btd,dhk->bthk", (6, 2, 3), dtype=dt, rngs=r), _x(2, 5, 6)
    ),
    "nnx_embed": lambda dt: _nnx(
        lambda r: NnxTiedEmbed(r, 13, 6, dtype=dt), _tokens(2, 5, vocab=13)
    ),
    "nnx_conv": lambda dt: _nnx(lambda r: nnx.Conv(4, 7, (3, 3), dtype=dt, rngs=r), _x(2, 6, 6, 4)),
    "nnx_mha": lambda dt: _nnx(
        lambda r: nnx.MultiHeadAttention(
            2, 6, qkv_features=8, dtype=dt, decode=False, deterministic=True, rngs=r
        ),
        _x(2, 5, 6),
    ),
}


def _setup(name: str, dtype: Any, config: lora.LoraConfig = CONFIG) -> tuple:
    apply, params, args = LAYERS[name](dtype)
    return apply, params, _adapters(params, config, lambda p: apply(p, *args)), args


# -- comparison helpers -----------------------------------------------------------------------
def _both(fn: Callable[[Any], jax.Array], ref_fn: Callable[[Any], jax.Array], adapters: Any):
    """Outputs and adapter gradients (of a fixed random projection) of both, in one jit."""

    def value_and_grad(f: Callable) -> Callable:
        def loss(ad: Any) -> tuple[jax.Array, jax.Array]:
            y = f(ad)
            cot = jax.random.normal(jax.random.key(9), y.shape, F32)
            return jnp.sum(y.astype(F32) * cot), y

        def run(ad: Any) -> tuple:
            (_, y), g = jax.value_and_grad(loss, has_aux=True)(ad)
            return y, g

        return run

    return jax.jit(lambda ad: (value_and_grad(fn)(ad), value_and_grad(ref_fn)(ad)))(adapters)


F32_TOL, BF16_TOL = 5e-6, 3e-2  # max error relative to the largest reference value


def _assert_close(pair: tuple, tol: float = F32_TOL) -> None:
    """Outputs within ``tol``, adapter gradients within ``2 * tol`` (relative to their max)."""
    (y, g), (y_ref, g_ref) = pair
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol, rel_err(y, y_ref)
    assert jax.tree.structure(g) == jax.tree.structure(g_ref)
    errs = jax.tree.map(rel_err, g, g_ref)
    assert max(jax.tree.leaves(errs)) < 2 * tol, errs


# -- every layer type, f32 and bf16, output and adapter gradients ------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_factored_matches_merged(name: str, dtype: Any) -> None:
    apply, params, adapters, args = _setup(name, dtype)
    fn = lora.wrap(apply, mode="factored")
    pair = _both(
        lambda ad: fn(params, ad, *args), lambda ad: apply(lora.merge(params, ad), *args), adapters
    )
    _assert_close(pair, F32_TOL if dtype == F32 else BF16_TOL)


def test_factored_gradient_of_base_params_matches_merged() -> None:
    apply, params, adapters, args = _setup("linen_mha", F32)
    fn = lora.wrap(apply, mode="factored")
    loss = lambda p, ad: jnp.sum(jnp.sin(fn(p, ad, *args)))
    ref_loss = lambda p, ad: jnp.sum(jnp.sin(apply(lora.merge(p, ad), *args)))
    grads = lambda p, ad: (jax.grad(loss, (0, 1))(p, ad), jax.grad(ref_loss, (0, 1))(p, ad))
    got, ref = jax.jit(grads)(params, adapters)
    # the key bias has a zero gradient (softmax is shift-invariant): compare on a global scale
    scale = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_bf16_params() -> None:
    model = nn.Dense(5, dtype=BF16, param_dtype=BF16)
    apply, params, args = _linen(model, _x(2, 3, 4))
    adapters = _adapters(params, CONFIG)
    got = lora.wrap(apply, "factored")(params, adapters, *args)
    ref = apply(lora.merge(params, adapters), *args)
    assert got.dtype == BF16 and rel_err(got, ref) < BF16_TOL


# -- transformations ---------------------------------------------------------------------------
def test_vmap_over_inputs_and_over_adapters() -> None:
    apply, params, adapters, (x,) = _setup("linen_mha", F32)
    fn = lora.wrap(apply, mode="factored")
    xs = np.stack([x, 2 * x, -x])
    stacked = jax.tree.map(lambda a: np.stack([a, -a, 0.5 * a]), adapters)

    def run(xs: Any, stacked: Any) -> tuple:
        over_x = jax.vmap(lambda x: fn(params, adapters, x))(xs)
        ref_x = jax.vmap(lambda x: apply(lora.merge(params, adapters), x))(xs)
        over_ad = jax.vmap(lambda ad: fn(params, ad, x))(stacked)
        ref_ad = jax.vmap(lambda ad: apply(lora.merge(params, ad), x))(stacked)
        return over_x, ref_x, over_ad, ref_ad

    over_x, ref_x, over_ad, ref_ad = jax.jit(run)(xs, stacked)
    assert rel_err(over_x, ref_x) < F32_TOL
    assert rel_err(over_ad, ref_ad) < F32_TOL


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + nn.MultiHeadDotProductAttention(2, name="attn")(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(24, name="fc1")(nn.LayerNorm()(x)))
        return x + nn.Dense(x.shape[-1], name="fc2")(h)


class RematDecoder(nn.Module):
    """Embed -> two `nn.remat` blocks (attention + MLP) -> tied logits via ``attend``."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(32, 16)
        x = embed(tokens)
        for i in range(2):
            x = nn.remat(Block)(name=f"h{i}")(x)
        return embed.attend(x)


def _tiny_decoder() -> tuple:
    model = RematDecoder()
    tokens = _tokens(2, 7, vocab=32)
    params = _fill(jax.eval_shape(model.init, jax.random.key(1), tokens), 1, std=0.2)
    adapters = _adapters(
        params, lora.LoraConfig(rank=2, alpha=4.0), lambda p: model.apply(p, tokens)
    )
    assert len(jax.tree.leaves(adapters)) == 2 * 13  # 2 x (q, k, v, out, fc1, fc2) + embedding
    return model.apply, params, adapters, (tokens,)


@pytest.mark.parametrize("mode", ["factored", "auto"])
def test_linen_remat_decoder(mode: str) -> None:
    apply, params, adapters, args = _tiny_decoder()
    fn = lora.wrap(apply, mode=mode)
    pair = _both(
        lambda ad: fn(params, ad, *args), lambda ad: apply(lora.merge(params, ad), *args), adapters
    )
    _assert_close(pair)
    # the remat regions are kept (re-wrapped), not inlined
    eqns = all_eqns(jax.make_jaxpr(fn)(params, adapters, *args).jaxpr)
    assert sum(e.primitive.name in ("remat2", "checkpoint", "remat") for e in eqns) == 2


def test_plain_jax_checkpoint_keeps_policy() -> None:
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

    def mlp(p: dict, x: jax.Array) -> jax.Array:
        layer = jax.checkpoint(lambda h: jnp.tanh(h @ p["w1"]) @ p["w2"], policy=policy)
        return layer(x)

    params = {"w1": _x(6, 9, seed=4), "w2": _x(9, 5, seed=5)}
    adapters = _adapters(params, lora.LoraConfig(rank=3, targets=r"w\d"))
    fn = lora.wrap(mlp, mode="factored")
    x = _x(4, 6)
    _assert_close(
        _both(lambda ad: fn(params, ad, x), lambda ad: mlp(lora.merge(params, ad), x), adapters),
        2e-5,
    )
    eqns = all_eqns(jax.make_jaxpr(fn)(params, adapters, x).jaxpr)
    remats = [e for e in eqns if e.primitive.name in ("remat2", "checkpoint", "remat")]
    assert len(remats) == 1 and remats[0].params["policy"] is policy


def test_eager_call_and_none_adapters() -> None:
    apply, params, adapters, args = _setup("linen_dense", F32)
    fn = lora.wrap(apply)  # auto
    ref = apply(lora.merge(params, adapters), *args)
    assert rel_err(fn(params, adapters, *args), ref) < F32_TOL
    assert rel_err(fn(params, adapters, *args), ref) < F32_TOL  # second call: cached trace
    np.testing.assert_array_equal(fn(params, None, *args), apply(params, *args))


# -- fallback and errors -----------------------------------------------------------------------
def _masked_kernel(p: dict, x: jax.Array) -> jax.Array:
    """The kernel times an array (a scalar is factored: tests/test_scaled_kernel.py)."""
    return jnp.tanh(x @ p["first"]) @ (p["w"] * np.tril(np.ones((6, 6), np.float32)))


def _scanned(p: dict, x: jax.Array) -> jax.Array:
    """A loop closing over the kernel: factored inside the scan (see tests/test_scan.py)."""
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["w"]), None), x @ p["first"], None, length=3)
    return h


def _carried(p: dict, x: jax.Array) -> jax.Array:
    """The kernel as a loop carry, changed by each iteration: no factored rule fits."""
    h = jnp.tanh(x @ p["first"])
    step = lambda c, _: ((jnp.tanh(c[0] @ c[1]), 0.9 * c[1]), None)
    (h, _), _ = jax.lax.scan(step, (h, p["w"]), None, length=3)
    return h


def test_kernel_closed_over_by_a_scan_is_factored() -> None:
    params = {"first": _x(4, 6, seed=1), "w": _x(6, 6, seed=2)}
    adapters = _adapters(params, lora.LoraConfig(rank=2, targets="first|w"))
    x = _x(3, 4)
    _assert_close(
        _both(
            lambda ad: lora.wrap(_scanned, mode="factored")(params, ad, x),
            lambda ad: _scanned(lora.merge(params, ad), x),
            adapters,
        ),
        2e-5,
    )


@pytest.mark.parametrize(("fn", "op"), [(_masked_kernel, "mul"), (_carried, "scan")])
def test_factored_mode_raises_with_path_and_op(fn: Callable, op: str) -> None:
    params = {"first": _x(4, 6, seed=1), "w": _x(6, 6, seed=2)}
    adapters = _adapters(params, lora.LoraConfig(rank=2, targets="first|w"))
    x = _x(3, 4)
    with pytest.raises(ValueError, match=rf"'w'.*`{op}`"):
        lora.wrap(fn, mode="factored")(params, adapters, x)
    # auto merges that kernel (silently) and factors the other one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.wrap(fn)(params, adapters, x)
    # ... but says so when the call asks for LoRA dropout, which the merged kernel cannot have
    dropping = jax.tree.map(
        lambda w: w.replace(dropout=0.1), adapters, is_leaf=lambda w: hasattr(w, "dropout")
    )
    with pytest.warns(UserWarning, match=rf"'w' is merged for `{op}`.*dropout is not applied"):
        lora.wrap(fn)(params, dropping, x, lora_rng=jax.random.key(0))
    _assert_close(
        _both(
            lambda ad: lora.wrap(fn)(params, ad, x),
            lambda ad: fn(lora.merge(params, ad), x),
            adapters,
        ),
        2e-5,
    )


def test_wrong_adapters_raise_with_path() -> None:
    apply, params, adapters, args = _setup("linen_dense", F32)
    other = {"params": {"Dense_9": {"kernel": adapters["params"]["kernel"]}}}
    with pytest.raises(ValueError, match="params/Dense_9/kernel"):
        lora.wrap(apply, "factored")(params, other, *args)


def _reshaped_and_transposed(p: dict, x: jax.Array) -> jax.Array:
    # "w" (4, 6) seen as (2, 2, 6) and contracted on two axes; "v" (5, 6) stored (out, in) and
    # used transposed, i.e. contracted on what its adapter calls the output axis
    h = jnp.einsum("bij,ijk->bk", x.reshape(-1, 2, 2), p["w"].reshape(2, 2, 6))
    return jnp.tanh(h) @ p["v"].T


def test_kernel_reshapes_and_transposes_are_seen_through() -> None:
    params = {"w": _x(4, 6, seed=1), "v": _x(5, 6, seed=2)}
    adapters = _adapters(params, lora.LoraConfig(rank=2, targets="w|v"))
    fn = lora.wrap(_reshaped_and_transposed, mode="factored")
    x = _x(3, 4)
    ref = lambda ad: _reshaped_and_transposed(lora.merge(params, ad), x)
    _assert_close(_both(lambda ad: fn(params, ad, x), ref, adapters))


def _mixed_reshape(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["first"] + p["w"].reshape(-1)[:6]  # merges input and output axes of "w"


def _grouped_conv(p: dict, x: jax.Array) -> jax.Array:
    h = x @ p["first"]
    dn = ("NWC", "WIO", "NWC")
    return jax.lax.conv_general_dilated(
        h[:, :, None].repeat(6, 2),
        p["w"],
        (1,),
        "SAME",
        dimension_numbers=dn,
        feature_group_count=2,
    )


@pytest.mark.parametrize(
    ("fn", "op", "reason", "shape"),
    [(_mixed_reshape, "slice", "reshape", (4, 6)), (_grouped_conv, "conv", "grouped", (3, 3, 6))],
)
def test_unfactorable_uses_name_the_reason(
    fn: Callable, op: str, reason: str, shape: tuple
) -> None:
    params = {"first": _x(4, 6, seed=1), "w": _x(*shape, seed=2)}
    probe = lambda p: fn(p, _x(3, 4))
    adapters = _adapters(params, lora.LoraConfig(rank=2, targets="first|w"), probe)
    x = _x(3, 4)
    with pytest.raises(ValueError, match=rf"'w'.*`{op}.*{reason}"):
        lora.wrap(fn, mode="factored")(params, adapters, x)
    ref = lambda ad: fn(lora.merge(params, ad), x)
    _assert_close(_both(lambda ad: lora.wrap(fn)(params, ad, x), ref, adapters))


# -- dropout on the LoRA branch ------------------------------------------------------------------
def test_dropout_statistics() -> None:
    rate, n, d_in, d_out = 0.3, 20000, 16, 3
    apply, params, _ = _linen(nn.Dense(d_out), _x(1, d_in))
    config = lora.LoraConfig(rank=4, alpha=8.0, init="random", dropout=rate)
    adapters = _adapters(params, config)
    fn = jax.jit(lora.wrap(apply))
    row = _x(1, d_in, seed=7)
    x = jnp.tile(row, (n, 1))  # every row is an independent draw of the dropout mask
    base = apply(params, x)
    branch = np.asarray(fn(params, adapters, x, lora_rng=jax.random.key(5)) - base, np.float64)
    # reference in float64: branch = scale * (drop(x) @ a) @ b, with c = scale * a @ b
    w = adapters["params"]["kernel"]
    c = w.scale * np.asarray(w.a, np.float64) @ np.asarray(w.b, np.float64)
    xr = np.asarray(row[0], np.float64)
    mean = xr @ c
    var = rate / (1.0 - rate) * (xr**2) @ (c**2)
    assert np.all(np.abs(branch.mean(0) - mean) < 5 * np.sqrt(var / n))
    np.testing.assert_allclose(branch.var(0), var, rtol=0.08)
    # another key gives another mask; the same key the same output
    again = fn(params, adapters, x, lora_rng=jax.random.key(5))
    other = fn(params, adapters, x, lora_rng=jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(again - base), branch.astype(np.float32))
    assert not np.allclose(np.asarray(other - base), branch)
    # without a key: no dropout, deterministic, equal to the merged model
    ref = apply(lora.merge(params, adapters), x)
    assert rel_err(fn(params, adapters, x), ref) < F32_TOL


# -- nothing is materialised ---------------------------------------------------------------------
class Structural(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array, image: jax.Array) -> jax.Array:
        embed = nn.Embed(50, 24)
        h = embed(tokens)
        h = h + nn.MultiHeadDotProductAttention(2, qkv_features=16)(h)
        h = nn.Dense(24)(nn.gelu(nn.Dense(40)(h)))
        logits = embed.attend(h)
        img = nn.Conv(6, (3, 3))(image)
        return jnp.sum(logits) + jnp.sum(img)


def _intermediate_shapes(jaxpr: Any) -> set[tuple[int, ...]]:
    return {tuple(v.aval.shape) for e in all_eqns(jaxpr) for v in e.outvars}


def test_gradient_jaxpr_materialises_no_adapted_kernel() -> None:
    model = Structural()
    args = (_tokens(3, 5, vocab=50), _x(2, 7, 7, 4))
    params = _fill(jax.eval_shape(model.init, jax.random.key(1), *args), 1)
    adapters = _adapters(params, CONFIG, lambda p: model.apply(p, *args))
    kernels = {w.kernel_shape for w in jax.tree.leaves(adapters, is_leaf=is_lora)}
    assert len(kernels) == 6  # embedding, q/k/v (one shape), out, two Dense, conv

    def shapes(mode: str) -> set[tuple[int, ...]]:
        fn = lora.wrap(model.apply, mode=mode)
        loss = lambda ad: fn(params, ad, *args)
        return _intermediate_shapes(jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr)

    assert not shapes("factored") & kernels
    assert shapes("merged") & kernels == kernels  # the check does see a materialised kernel
