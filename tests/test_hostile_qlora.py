"""QLoRA at its edges: gradients of a jitted `lora.wrap` on a quantized base, non-finite values in
one example, and non-finite kernels given to `lora.quantize`.

References: the float base model (the un-wrapped model applied to kernels decoded from the codes
in float64 by the tests' own decoder, ``W0 + scale * a @ b`` merged by hand in jnp); for where a
NaN lands, also `lora.wrap` on the dequantized float base (the same factored arithmetic, so the
same entries turn NaN); the float kernel itself and its format's error bound; XLA's compiled
memory against the size of one float kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import scan_models
from support.mlp_stack import Stack
from support.models import build, mlp
from support.refs import ref_decode, ref_delta_jnp
from support.trees import adapter_entries, leaves_by_path, replace_leaves

import flax_lora as lora

QUANT = {"int8": dict(dtype="int8"), "nf4": dict(dtype="nf4", block_size=16)}
RANK, ALPHA = 2, 3.0  # scale 1.5
BATCH = 4


def is_q(x: Any) -> bool:
    return isinstance(x, lora.QuantizedKernel)


# ---------------------------------------------------------------------------------------------
# the models: each with its kernels' input axes (per layer for a layered kernel)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    apply: Callable[[Any, Any], Any]
    params: Any
    x: Any  # a batch of BATCH examples on axis 0
    in_axes: dict[str, tuple[int, ...]]  # path -> input axes (of one layer when layered)
    layered: frozenset[str] = frozenset()

    def probe(self, p: Any) -> Any:
        return self.apply(p, self.x)


def _layer_case(name: str) -> Case:
    m = build(name)
    shape = (BATCH, *np.shape(m.x)[1:])
    if jnp.issubdtype(m.x.dtype, jnp.integer):
        x = jnp.asarray(np.random.default_rng(7).integers(0, 11, shape), m.x.dtype)
    else:
        x = jnp.asarray(np.random.default_rng(7).normal(size=shape), jnp.float32)
    return Case(m.apply, m.params, x, {p: axes for p, (axes, _) in m.kernels.items()})


def _mlp_case() -> Case:
    model, params, _ = mlp()
    x = jnp.asarray(np.random.default_rng(7).normal(size=(BATCH, 4)), jnp.float32)
    in_axes = {f"params/{n}/kernel": (0,) for n in ("fc0", "fc1", "head")}
    return Case(model.apply, params, x, in_axes)


def _scan_case(name: str) -> Case:
    apply, params = scan_models.scan_model(name)
    x = jnp.asarray(scan_models.X[:BATCH])
    paths = [p for p in leaves_by_path(params) if p.endswith("kernel")]
    layered = frozenset(p for p in paths if scan_models.is_layered(p))
    axes = {p: scan_models.IN_AXES[p.split("/")[-2]] if p in layered else (0,) for p in paths}
    return Case(apply, params, x, axes, layered)


#: name -> builder. Dense MLP; attention (DenseGeneral) and Einsum; Embed (lookup and attend);
#: Conv; nn.scan (blocks under nn.remat) / nnx.scan over attention + MLP blocks; NNX models
CASES: dict[str, Callable[[], Case]] = {
    "mlp": _mlp_case,
    "linen_mha": lambda: _layer_case("linen_mha"),
    "nnx_mha": lambda: _layer_case("nnx_mha"),
    "linen_einsum": lambda: _layer_case("linen_einsum"),
    "linen_embed": lambda: _layer_case("linen_embed"),
    "linen_embed_attend": lambda: _layer_case("linen_embed_attend"),
    "linen_conv2d": lambda: _layer_case("linen_conv2d"),
    "scan_linen_remat": lambda: _scan_case("linen_remat"),
    "scan_nnx": lambda: _scan_case("nnx"),
}


@dataclasses.dataclass
class Quantized:
    """A case on its quantized base: the adapters, and the float base model as a function of
    the adapters (the reference)."""

    case: Case
    q: Any
    adapters: Any
    ref_params: Callable[[Any], Any]  # adapters -> float params, W0 + scale * a @ b merged


@functools.cache
def quantized(name: str, fmt: str) -> Quantized:
    c = CASES[name]()
    q = lora.quantize(c.params, probe=c.probe, **QUANT[fmt])
    config = lora.LoraConfig(rank=RANK, alpha=ALPHA, init="random")
    adapters = lora.init(jax.random.key(2), q, config, probe=c.probe)
    decoded = {
        p: jnp.asarray(ref_decode(x), jnp.float32)
        for p, x in leaves_by_path(q, is_q).items()
        if is_q(x)
    }
    assert set(decoded) == set(c.in_axes), (set(decoded), set(c.in_axes))

    def ref_params(ad: Any) -> Any:
        new = dict(decoded)
        for path, w in adapter_entries(ad).items():
            delta = functools.partial(ref_delta_jnp, in_axes=c.in_axes[path], scale=w.scale)
            if path in c.layered:
                delta = jax.vmap(delta)
            new[path] = decoded[path] + delta(w.a, w.b)
        return replace_leaves(c.params, new)

    assert set(adapter_entries(adapters)) == set(c.in_axes)
    return Quantized(c, q, adapters, ref_params)


# ---------------------------------------------------------------------------------------------
# grad(jit(wrap)) on a quantized base
# ---------------------------------------------------------------------------------------------
@functools.cache
def reference(name: str, fmt: str) -> tuple[jax.Array, np.ndarray, dict[str, Any]]:
    """(cotangent, the float base model's output, its gradients by adapter path)."""
    t = quantized(name, fmt)
    x = t.case.x
    y = jax.jit(lambda ad: t.case.apply(t.ref_params(ad), x))(t.adapters)
    c = jnp.asarray(np.random.default_rng(3).normal(size=y.shape), jnp.float32)
    loss = lambda ad: jnp.sum(c * t.case.apply(t.ref_params(ad), x))
    return c, np.asarray(y), adapter_entries(jax.jit(jax.grad(loss))(t.adapters))


@pytest.mark.parametrize("mode", ["auto", "factored"])
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("name", list(CASES))
def test_grad_of_jitted_wrap_equals_the_float_base_model(name: str, fmt: str, mode: str) -> None:
    t = quantized(name, fmt)
    c, y_ref, ref = reference(name, fmt)
    x = t.case.x
    fn = jax.jit(lora.wrap(t.case.apply, mode=mode))  # jit inside, grad outside
    y = fn(t.q, t.adapters, x)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5 * (1 + np.abs(y_ref).max()))
    grads = adapter_entries(jax.grad(lambda ad: jnp.sum(c * fn(t.q, ad, x)))(t.adapters))
    for path, want in ref.items():
        for got, w in ((grads[path].a, want.a), (grads[path].b, want.b)):
            w = np.asarray(w)
            assert np.abs(w).max() > 1e-3, path  # a gradient that can be wrong
            np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


# ---------------------------------------------------------------------------------------------
# a NaN or inf in one example stays in that example's rows
# ---------------------------------------------------------------------------------------------
NAN_CASES = ["mlp", "linen_mha", "linen_embed_attend", "linen_conv2d", "scan_nnx"]
VALUES = [np.nan, np.inf, -np.inf]
ROWS = st.integers(0, BATCH - 1)


@dataclasses.dataclass
class Programs:
    """Jitted functions of an input (and for ``vjp_*`` a cotangent) on three models: the
    quantized base (``q``), the dequantized float base, both through `lora.wrap` (so the same
    arithmetic places the same NaNs), and the float base model with merged kernels (``ref``)."""

    t: Quantized
    fwd: dict[str, Callable[[Any], Any]]
    vjp: dict[str, Callable[[Any, Any], Any]]


@functools.cache
def programs(name: str, fmt: str) -> Programs:
    t = quantized(name, fmt)
    fn = lora.wrap(t.case.apply, mode="auto")
    float_base = lora.dequantize(t.q)
    models = {
        "q": lambda x: fn(t.q, t.adapters, x),
        "float": lambda x: fn(float_base, t.adapters, x),
        "ref": lambda x: t.case.apply(t.ref_params(t.adapters), x),
    }
    vjp = lambda f: jax.jit(lambda x, c: jax.vjp(f, x)[1](c)[0])
    return Programs(
        t, {k: jax.jit(f) for k, f in models.items()}, {k: vjp(f) for k, f in models.items()}
    )


def bad_rows(y: Any) -> set[int]:
    """The examples (axis 0) with a non-finite entry."""
    y = np.asarray(y)
    return set(np.flatnonzero(~np.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)).tolist())


def assert_same_rows(out: dict[str, Any], row: int, exactly: bool = True) -> None:
    """The quantized base's ``out["q"]`` is non-finite exactly where the float base's
    ``out["float"]`` is, which is in example ``row`` only (``exactly``: in that example), and in
    every other example equal to the float base model's ``out["ref"]``."""
    got, want = np.asarray(out["q"]), np.asarray(out["float"])
    rows = bad_rows(want)
    assert rows == {row} if exactly else rows <= {row}, rows
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    keep = [i for i in range(got.shape[0]) if i != row]
    ref = np.asarray(out["ref"])[keep]
    np.testing.assert_allclose(got[keep], ref, rtol=0, atol=1e-4 * (1 + np.abs(ref).max()))


def poke(x: Any, row: int, position: int, value: float) -> np.ndarray:
    """``x`` with entry ``position`` (modulo its size) of example ``row`` set to ``value``."""
    out = np.array(x, np.float32)
    out[row].reshape(-1)[position % out[row].size] = value
    return out


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("name", NAN_CASES)
@settings(max_examples=4, deadline=None)
@given(
    row=st.integers(0, BATCH - 1), position=st.integers(0, 10_000), value=st.sampled_from(VALUES)
)
@example(row=0, position=0, value=np.nan)  # the first element of the whole batch
@example(row=0, position=0, value=np.inf)
@example(row=BATCH - 1, position=3, value=-np.inf)
def test_a_non_finite_input_stays_in_its_example(
    name: str, fmt: str, row: int, position: int, value: float
) -> None:
    p = programs(name, fmt)
    x = poke(p.t.case.x, row, position, value)
    assert_same_rows({k: f(x) for k, f in p.fwd.items()}, row)
    c = np.random.default_rng(4).normal(size=np.shape(p.fwd["ref"](p.t.case.x)))
    c = c.astype(np.float32)
    # the input's gradient: relu's gradient can mask a NaN, so the example may be finite
    assert_same_rows({k: f(x, c) for k, f in p.vjp.items()}, row, exactly=False)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("name", NAN_CASES)
@settings(max_examples=4, deadline=None)
@given(
    row=st.integers(0, BATCH - 1), position=st.integers(0, 10_000), value=st.sampled_from(VALUES)
)
@example(row=0, position=0, value=np.nan)  # the first element of the incoming gradient
@example(row=BATCH - 1, position=0, value=np.inf)
def test_a_non_finite_cotangent_stays_in_its_example(
    name: str, fmt: str, row: int, position: int, value: float
) -> None:
    p = programs(name, fmt)
    x = np.asarray(p.t.case.x, np.float32)
    c = np.random.default_rng(4).normal(size=np.shape(p.fwd["ref"](x))).astype(np.float32)
    c = poke(c, row, position, value)
    assert_same_rows({k: f(x, c) for k, f in p.vjp.items()}, row)


# ---------------------------------------------------------------------------------------------
# the tie keeps each float kernel where it is used
# ---------------------------------------------------------------------------------------------
class Deep(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(6):
            x = jnp.tanh(nn.Dense(512, name=f"fc{i}")(x))
        return x


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_no_float_kernel_is_hoisted_or_kept_for_the_backward_pass(fmt: str) -> None:
    m, x = Deep(), jnp.ones((4, 512), jnp.float32)
    shapes = jax.eval_shape(m.init, jax.random.key(0), x)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    q = lora.quantize(params, **QUANT[fmt])
    adapters = lora.init(jax.random.key(1), q, lora.LoraConfig(rank=4, init="random"))
    fn = lora.wrap(m.apply)
    kernel = 512 * 512 * 4  # bytes of one float32 kernel; six of them in the model
    step = jax.jit(jax.grad(lambda ad, q, x: jnp.sum(fn(q, ad, x) ** 2)))
    forward = jax.jit(lambda q, ad, x: fn(q, ad, x))
    for f, args in ((step, (adapters, q, x)), (forward, (q, adapters, x))):
        temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
        assert temp < 2 * kernel, temp / kernel  # one float kernel at a time


# ---------------------------------------------------------------------------------------------
# lora.quantize of a kernel holding a NaN or an inf
# ---------------------------------------------------------------------------------------------
FORMATS = {**QUANT, "nf4+dq": dict(dtype="nf4", block_size=16, double_quant=True)}
NAMES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def with_value(params: Any, path: str, index: tuple[int, ...], value: float) -> Any:
    w = np.array(leaves_by_path(params)[path])
    w[index] = value
    return replace_leaves(params, {path: jnp.asarray(w)})


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("kind", list(NAMES))
def test_quantize_names_the_kernel_holding_a_non_finite_value(fmt: str, kind: str) -> None:
    _, params, _ = mlp()
    bad = with_value(params, "params/fc1/kernel", (2, 3), NAMES[kind])
    with pytest.raises(ValueError, match=re.escape("kernel 'params/fc1/kernel' holds 1 ")) as e:
        lora.quantize(bad, **FORMATS[fmt])
    assert f"1 {kind}; the first at index (2, 3)" in str(e.value), e.value
    assert "fc0" not in str(e.value) and "head" not in str(e.value)
    spoils = {"int8": "whole channel NaN", "nf4": "whole block NaN.", "nf4+dq": "whole kernel"}
    assert spoils[fmt] in str(e.value), e.value
    # two kernels: both named, with their counts
    worse = with_value(
        with_value(bad, "params/fc1/kernel", (0, 1), np.nan), "params/head/kernel", (5, 2), np.inf
    )
    with pytest.raises(ValueError, match=re.escape("'params/head/kernel' holds 1 ")) as e:
        lora.quantize(worse, **FORMATS[fmt])
    assert "'params/fc1/kernel' holds 2 non-finite values" in str(e.value), e.value
    assert "the first at index (0, 1)" in str(e.value), e.value
    with pytest.raises(ValueError, match=re.escape("w of shape (6, 6) holds 1 ")):
        lora.quantize_kernel(jnp.asarray(leaves_by_path(bad)["params/fc1/kernel"]), **FORMATS[fmt])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantize_names_a_stacked_kernel_and_its_layer(fmt: str) -> None:
    m = Stack(16, 32)
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    params = m.init(jax.random.key(0), x)
    path = "params/layers/fc2/kernel"  # (layers, 32, 16)
    bad = with_value(params, path, (1, 4, 7), -np.inf)
    with pytest.raises(ValueError, match=re.escape(f"kernel {path!r} holds 1 non-finite")) as e:
        lora.quantize(bad, probe=lambda p: m.apply(p, x), **FORMATS[fmt])
    assert "1 -inf; the first at index (1, 4, 7)" in str(e.value), e.value


def test_requantize_names_the_merged_kernel() -> None:
    _, params, _ = mlp()
    q = lora.quantize(params, dtype="int8")
    bad = with_value(lora.dequantize(q), "params/head/kernel", (1, 1), np.nan)
    with pytest.raises(ValueError, match=re.escape("lora.requantize: kernel 'params/head/kernel'")):
        lora.requantize(bad, like=q)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_under_jit_a_non_finite_value_spoils_its_channel_or_block_only(fmt: str) -> None:
    """As documented: the values are not checked under a trace."""
    w = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    w[3, 2] = np.inf
    q = jax.jit(lambda w: lora.quantize({"kernel": w}, **FORMATS[fmt]))(jnp.asarray(w))
    got = np.asarray(lora.dequantize(q)["kernel"])
    spoilt = np.zeros(w.shape, bool)
    if fmt == "int8":
        spoilt[:, 2] = True  # the channel
    elif fmt == "nf4":
        spoilt.reshape(-1)[16:32] = True  # the block of 16 values holding entry 3 * 6 + 2 = 20
    else:
        spoilt[:] = True  # double quantization: the mean of the block absmaxes is inf
    np.testing.assert_array_equal(~np.isfinite(got), spoilt)
    if not spoilt.all():  # elsewhere within the format's error bound of the float kernel
        absmax = np.abs(np.where(spoilt, 0, w)).max()
        np.testing.assert_allclose(got[~spoilt], w[~spoilt], atol=0.16 * absmax)
