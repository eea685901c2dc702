"""QLoRA across the model kinds: kernels stacked by ``nn.scan`` / ``nnx.scan`` (``mlp-*``:
per-layer quantization, the factored `lora.wrap` dequantizing each layer inside the scan body),
tied embeddings (``tied``), an unstacked MLP (``mlp``), expert kernels (``moe-*``).

References: float64 numpy (the formats re-implemented in `support.refs`: ``ref_int8``,
``ref_nf4``, ``ref_double`` applied to each layer alone; the stack re-implemented in numpy on
the dequantized base, LoRA added as ``x @ W0 + s * (x @ a) @ b``:
`support.refs_models.mlp_stack64`; expert kernels merged per carried index in float64:
`support.moe_models.merged64`), and the jaxpr of the step.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_lora as lora

from .cases import check
from .compare import assert_close
from .jaxprs import walk
from .mlp_stack import ALIGNED, STRADDLING, L, NnxStack, Stack
from .moe_adapters import expert_adapters
from .moe_models import build as moe_build
from .moe_models import carried_delta64, merged64, random_factors
from .refs import ref_decode, ref_double, ref_int8, ref_nf4, unpack
from .refs_models import mlp_stack64
from .trees import adapter_entries, leaves_by_path


@functools.cache
def linen(dims: tuple[int, int], remat: bool = False, seed: int = 0) -> tuple[Any, Any, Any]:
    m = Stack(*dims, remat=remat)
    x = np.random.default_rng(seed).normal(size=(6, dims[0])).astype(np.float32)
    params = m.init(jax.random.key(seed), x)
    return m, params, x


def stacked_kernels(tree: Any) -> dict[str, Any]:
    layers = tree["params"]["layers"]
    return {name: layers[name]["kernel"] for name in ("fc1", "fc2")}


# ---------------------------------------------------------------------------------------------
# per-layer quantization
# ---------------------------------------------------------------------------------------------
@check
def int8_scales_per_layer_are_the_unstacked_quantization(dims: tuple[int, int]) -> None:
    m, params, x = linen(dims)
    q = lora.quantize(params, dtype="int8", probe=lambda p: m.apply(p, x))
    for name, w in stacked_kernels(params).items():
        qk = stacked_kernels(q)[name]
        w = np.asarray(w)
        assert qk.layer_axes == 1 and qk.shape == w.shape
        assert qk.absmax.shape == (L, w.shape[-1])  # (L, out): no scale shared across layers
        for i in range(L):
            codes, absmax, deq = ref_int8(w[i])  # the layer alone, float64 numpy
            np.testing.assert_allclose(np.asarray(qk.absmax[i], np.float64), absmax, rtol=1e-7)
            got = np.asarray(qk.codes[i], np.float64)
            assert np.abs(got - codes).max() <= 1  # float32 may round a tie the other way
            assert np.mean(got == codes) > 0.999
            one = lora.quantize_kernel(jnp.asarray(w[i]), "int8")
            np.testing.assert_array_equal(np.asarray(qk.codes[i]), np.asarray(one.codes))
            np.testing.assert_array_equal(np.asarray(qk.absmax[i]), np.asarray(one.absmax))
        deq = np.asarray(lora.dequantize_kernel(qk), np.float64)
        for i in range(L):
            ref = ref_int8(w[i])[2]
            np.testing.assert_allclose(deq[i], ref, rtol=0, atol=1e-6 * np.abs(w[i]).max())
    # the head is not stacked: one quantization as before
    head = q["params"]["head"]["kernel"]
    assert head.layer_axes == 0 and head.absmax.shape == (4,)


@check
def nf4_blocks_never_straddle_layers(dims: tuple[int, int], double_quant: bool) -> None:
    m, params, x = linen(dims)
    q = lora.quantize(
        params, dtype="nf4", block_size=64, double_quant=double_quant, probe=lambda p: m.apply(p, x)
    )
    for name, w in stacked_kernels(params).items():
        qk = stacked_kernels(q)[name]
        w = np.asarray(w)
        per_layer = w[0].size
        blocks = -(-per_layer // 64)
        assert qk.layer_axes == 1 and qk.codes.shape == (L, blocks * 32)
        assert qk.absmax.shape == (L, blocks)
        for i in range(L):
            ref = ref_nf4(w[i], 64)  # the layer alone: its own blocks and padding
            got = unpack(np.asarray(qk.codes[i]))
            assert np.mean(got == ref["codes"]) > 0.999 and np.abs(got - ref["codes"]).max() <= 1
            assert (got[per_layer:] == 7).all()  # each layer's own padding (the code of 0.0)
            if double_quant:
                dq = ref_double(ref["absmax"])
                assert np.asarray(qk.absmax_offset[i]).shape == ()
                np.testing.assert_allclose(float(qk.absmax_offset[i]), dq["deq"].mean(), rtol=0.1)
                gotc = np.asarray(qk.absmax[i], np.int64)
                assert np.abs(gotc - dq["codes"]).max() <= 1
            else:
                np.testing.assert_allclose(np.asarray(qk.absmax[i]), ref["absmax"], rtol=1e-7)
            one = lora.quantize_kernel(
                jnp.asarray(w[i]), "nf4", block_size=64, double_quant=double_quant
            )
            for got_leaf, ref_leaf in zip(
                jax.tree.leaves(jax.tree.map(lambda t, i=i: t[i], qk.layer())),
                jax.tree.leaves(one),
                strict=True,
            ):
                np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(ref_leaf))
        deq = np.asarray(lora.dequantize_kernel(qk))
        for i in range(L):
            one = lora.quantize_kernel(
                jnp.asarray(w[i]), "nf4", block_size=64, double_quant=double_quant
            )
            np.testing.assert_array_equal(deq[i], np.asarray(lora.dequantize_kernel(one)))
            if not double_quant:
                np.testing.assert_allclose(deq[i], ref_nf4(w[i], 64)["deq"], rtol=1e-6, atol=1e-7)


@check
def without_probe_a_stack_is_one_array() -> None:
    _, params, _ = linen(STRADDLING)
    q = lora.quantize(params, dtype="int8")
    qk = stacked_kernels(q)["fc1"]
    assert qk.layer_axes == 0 and qk.absmax.shape == (12,)


@check
def quantize_kernel_layer_axes_and_bad_input() -> None:
    w = np.random.default_rng(1).normal(size=(2, 3, 5, 7)).astype(np.float32)
    q = lora.quantize_kernel(jnp.asarray(w), "nf4", block_size=8, layer_axes=2)
    assert q.codes.shape == (2, 3, 20) and q.absmax.shape == (2, 3, 5)
    deq = np.asarray(lora.dequantize_kernel(q))
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(deq[i, j], ref_nf4(w[i, j], 8)["deq"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="layer_axes"):
        lora.quantize_kernel(jnp.asarray(w), "int8", layer_axes=4)


# ---------------------------------------------------------------------------------------------
# the factored wrap on a quantized stack: against float64 numpy on the dequantized base
# ---------------------------------------------------------------------------------------------
def build(kind: str, dims: tuple[int, int]) -> tuple[Any, Any, np.ndarray, dict[str, str]]:
    """(apply, params, x, {name: path}) of a 3-layer residual tanh MLP stack and a head."""
    x = np.random.default_rng(0).normal(size=(6, dims[0])).astype(np.float32)
    if kind.startswith("linen"):
        m, params, x = linen(dims, remat=kind == "linen_remat")
        paths = {n: f"params/layers/{n}/kernel" for n in ("fc1", "fc2")}
        paths |= {"b1": "params/layers/fc1/bias", "b2": "params/layers/fc2/bias"}
        paths |= {"head": "params/head/kernel", "bh": "params/head/bias"}
        return m.apply, params, x, paths
    model = NnxStack(*dims, remat=kind == "nnx_remat", rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    paths = {n: f"layers/{n}/kernel" for n in ("fc1", "fc2")}
    paths |= {"b1": "layers/fc1/bias", "b2": "layers/fc2/bias"}
    paths |= {"head": "head/kernel", "bh": "head/bias"}
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state, x, paths


SCALE = 2.0
QUANT = {"int8": dict(dtype="int8"), "nf4": dict(dtype="nf4", block_size=16)}


def quantized_case(kind: str, fmt: str) -> tuple[Any, ...]:
    """The model ``kind`` with fc1, fc2 and head quantized per layer in ``fmt`` and random
    adapters on fc1 and fc2; with the float64 references: each kernel decoded from its codes
    (``p64``) and the factors (``ad64``).

    Returns:
      ``(apply, qparams, adapters, x, quantized leaves by path, paths, p64, ad64)``.
    """
    apply, params, x, paths = build(kind, STRADDLING)
    probe = lambda p: apply(p, x)
    q = lora.quantize(params, targets=r".*(fc1|fc2|head)/kernel", probe=probe, **QUANT[fmt])
    config = lora.LoraConfig(rank=2, alpha=2 * SCALE, init="random", targets=r".*(fc1|fc2)/kernel")
    adapters = lora.init(jax.random.key(3), q, config, probe=probe)
    qleaves = leaves_by_path(q, is_leaf=lambda t: isinstance(t, lora.QuantizedKernel))
    p64 = {
        n: ref_decode(qleaves[path]) if n in ("fc1", "fc2", "head") else np.asarray(qleaves[path])
        for n, path in paths.items()
    }
    entries = adapter_entries(adapters)
    ad64 = {
        n: tuple(np.asarray(getattr(entries[paths[n]], f), np.float64) for f in "ab")
        for n in ("fc1", "fc2")
    }
    return apply, q, adapters, x, qleaves, paths, p64, ad64


@check
def outputs_and_gradients_equal_the_dequantized_base_model(model: str, fmt: str) -> None:
    kind = model.split("-", 1)[1]  # mlp-<kind>
    apply, q, adapters, x, qleaves, paths, p64, ad64 = quantized_case(kind, fmt)
    assert qleaves[paths["fc1"]].layer_axes == 1 and qleaves[paths["head"]].layer_axes == 0
    c = np.random.default_rng(5).normal(size=(x.shape[0], 4))
    y_ref, g_ref = mlp_stack64(p64, ad64, x, c, SCALE)

    fn = lora.wrap(apply, mode="factored")
    loss = lambda ad: jnp.sum(jnp.asarray(c, jnp.float32) * fn(q, ad, x))
    y = jax.jit(fn)(q, adapters, x)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=2e-5, atol=2e-5)
    grads = adapter_entries(jax.jit(jax.grad(loss))(adapters))
    for n in ("fc1", "fc2"):
        for got, ref in zip((grads[paths[n]].a, grads[paths[n]].b), g_ref[n], strict=True):
            scale = np.abs(ref).max()
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=3e-5 * scale)


def dequantizations(jaxpr: Any) -> list[tuple[bool, str]]:
    """(inside a scan body?, what) for each dequantization of a stored kernel: a conversion of
    int8 codes to float, or an unpacking of nf4 codes (``shift_right_logical``)."""
    kinds = {
        "convert_element_type": (jnp.int8, "convert"),
        "shift_right_logical": (jnp.uint8, "unpack"),
    }
    found = []
    for eqn, within in walk(jaxpr):
        dtype, what = kinds.get(eqn.primitive.name, (None, ""))
        if dtype is not None and eqn.invars[0].aval.dtype == dtype:
            found.append(("scan" in within, f"{what} {eqn.invars[0].aval.shape}"))
    return found


@check
def the_stacked_step_dequantizes_inside_the_scan_body_only(model: str, fmt: str) -> None:
    kind = model.split("-", 1)[1]  # mlp-<kind>
    apply, params, x, _ = build(kind, ALIGNED)
    probe = lambda p: apply(p, x)
    q = lora.quantize(params, targets=r".*(fc1|fc2)/kernel", probe=probe, **QUANT[fmt])
    config = lora.LoraConfig(rank=2, init="random", targets=r".*fc1/kernel")  # fc2: no adapter
    adapters = lora.init(jax.random.key(3), q, config, probe=probe)
    fn = lora.wrap(apply, mode="auto")
    grad = jax.grad(lambda ad, q: jnp.sum(fn(q, ad, x) ** 2))
    closed = jax.make_jaxpr(grad)(adapters, q)
    found = dequantizations(closed.jaxpr)
    assert found and all(inside for inside, _ in found), found
    # each one layer's codes: (d, f) or (f, d) int8, or one layer's packed nf4 bytes
    per_layer = ALIGNED[0] * ALIGNED[1]
    sizes = {int(np.prod(eval(w.split(" ", 1)[1]))) for _, w in found}
    assert sizes <= {per_layer, per_layer // 2}, found


# ---------------------------------------------------------------------------------------------
# Embed tables: a lookup dequantizes the rows it gathers
# ---------------------------------------------------------------------------------------------
class Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(32, 16, name="embed")
        return embed.attend(jnp.tanh(nn.Dense(16, name="fc")(embed(tokens))))


@check
def embed_lookup_dequantizes_the_gathered_rows(kw: dict, adapted: bool) -> None:
    m = Tied()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (3, 5)))
    params = m.init(jax.random.key(0), tokens)
    q = lora.quantize(params, targets=r".*/(embedding|kernel)", **kw)
    targets = r".*/(embedding|kernel)" if adapted else r".*/kernel"
    cfg = lora.LoraConfig(rank=2, alpha=2.0, init="random", targets=targets)  # scale 1
    adapters = lora.init(jax.random.key(1), q, cfg, probe=lambda p: m.apply(p, tokens))
    entries = adapter_entries(adapters)
    leaves = leaves_by_path(q, is_leaf=lambda t: isinstance(t, lora.QuantizedKernel))
    table = ref_decode(leaves["params/embed/embedding"])
    w = ref_decode(leaves["params/fc/kernel"]) + np.asarray(
        entries["params/fc/kernel"].a, np.float64
    ) @ np.asarray(entries["params/fc/kernel"].b, np.float64)
    if adapted:
        e = entries["params/embed/embedding"]
        table = table + np.asarray(e.a, np.float64) @ np.asarray(e.b, np.float64)
    h = np.tanh(table[np.asarray(tokens)] @ w + np.asarray(params["params"]["fc"]["bias"]))
    ref = h @ table.T
    fn = jax.jit(lora.wrap(m.apply, mode="factored"))
    np.testing.assert_allclose(np.asarray(fn(q, adapters, tokens), np.float64), ref, atol=2e-5)
    # the lookup gathers from the codes: no dequantization of the whole table before it
    closed = jax.make_jaxpr(lambda q: lora.wrap(m.apply)(q, adapters, tokens))(q)
    gathers = [e for e in closed.jaxpr.eqns if e.primitive.name == "gather"]
    assert any(e.invars[0].aval.dtype in (jnp.int8, jnp.uint8) for e in gathers)


@check
def merged_mode_merges_each_layer_inside_the_scan(model: str, fmt: str) -> None:
    kind = model.split("-", 1)[1]  # mlp-<kind>
    apply, q, adapters, x, _, _, p64, ad64 = quantized_case(kind, fmt)
    y_ref, _ = mlp_stack64(p64, ad64, x, np.zeros((x.shape[0], 4)), SCALE)
    fn = lora.wrap(apply, mode="merged")
    y = jax.jit(fn)(q, adapters, x)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=2e-5, atol=2e-5)
    found = dequantizations(jax.make_jaxpr(lambda q: fn(q, adapters, x))(q).jaxpr)
    stacked = [w for inside, w in found if not inside]
    assert all(f"({L}," not in w for w in stacked), found  # only the head's, outside the scan


@check
def merge_requantize_works_layer_by_layer(fmt: str) -> None:
    m, params, x = linen(STRADDLING)
    probe = lambda p: m.apply(p, x)
    q = lora.quantize(params, targets=r".*(fc1|fc2)/kernel", probe=probe, **QUANT[fmt])
    config = lora.LoraConfig(rank=2, init="random", targets=r".*fc1/kernel", layers=(0, 2))
    adapters = lora.init(jax.random.key(3), q, config, probe=probe)
    with pytest.warns(UserWarning, match="relative error"):
        merged = lora.merge(q, adapters, requantize=True)
    got = stacked_kernels(merged)
    assert got["fc2"] is stacked_kernels(q)["fc2"]  # no adapter: untouched
    e = adapter_entries(adapters)["params/layers/fc1/kernel"]
    w0 = ref_decode(stacked_kernels(q)["fc1"])
    a, b = np.asarray(e.a, np.float64), np.asarray(e.b, np.float64)
    assert got["fc1"].layer_axes == 1
    for i in range(L):
        w = w0[i] + (e.scale * a[i] @ b[i] if i in (0, 2) else 0.0)  # layer 1 not picked
        ref = lora.quantize_kernel(jnp.asarray(w, jnp.float32), **QUANT[fmt])
        layer = jax.tree.map(lambda t, i=i: t[i], got["fc1"].layer())
        np.testing.assert_allclose(np.asarray(layer.absmax), np.asarray(ref.absmax), rtol=1e-5)
        g, r = np.asarray(layer.codes, np.int64), np.asarray(ref.codes, np.int64)
        if fmt == "nf4":
            g, r = unpack(g), unpack(r)
        assert np.mean(g == r) > 0.98 and np.abs(g - r).max() <= 1  # float32 rounding ties


# ---------------------------------------------------------------------------------------------
# unstacked kernels: the base product dequantizes at its use and again in its backward pass
# ---------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(nn.Dense(24, name="fc1")(x))
        return nn.Dense(16, name="fc2")(h)


@check
def unstacked_gradients_through_quantized_products(kw: dict) -> None:
    m = Mlp()
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    params = m.init(jax.random.key(0), x)
    q = lora.quantize(params, **kw)
    cfg = lora.LoraConfig(rank=2, alpha=2.0, init="random", targets=r".*fc1/kernel")  # scale 1
    adapters = lora.init(jax.random.key(1), q, cfg)
    e = adapter_entries(adapters)["params/fc1/kernel"]
    a, b = np.asarray(e.a, np.float64), np.asarray(e.b, np.float64)
    leaves = leaves_by_path(q, is_leaf=lambda t: isinstance(t, lora.QuantizedKernel))
    w1, w2 = ref_decode(leaves["params/fc1/kernel"]), ref_decode(leaves["params/fc2/kernel"])
    b1, b2 = (np.asarray(params["params"][n]["bias"], np.float64) for n in ("fc1", "fc2"))
    c = np.random.default_rng(1).normal(size=(5, 16))
    # float64 reference, backpropagated by hand: loss = sum(c * y), also w.r.t. the input
    x64 = x.astype(np.float64)
    h = np.tanh(x64 @ (w1 + a @ b) + b1)
    y = h @ w2 + b2
    gpre = (c @ w2.T) * (1 - h**2)
    ref = dict(a=x64.T @ (gpre @ b.T), b=(x64 @ a).T @ gpre, x=gpre @ (w1 + a @ b).T)
    fn = lora.wrap(m.apply, mode="factored")
    cj = jnp.asarray(c, jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, adapters, x), np.float64), y, atol=2e-5)
    ga, gx = jax.jit(jax.grad(lambda ad, x: jnp.sum(cj * fn(q, ad, x)), argnums=(0, 1)))(
        adapters, x
    )
    ge = adapter_entries(ga)["params/fc1/kernel"]
    for name, got in (("a", ge.a), ("b", ge.b), ("x", gx)):
        tol = 3e-5 * np.abs(ref[name]).max()
        np.testing.assert_allclose(np.asarray(got, np.float64), ref[name], atol=tol)
    # its residuals are codes: no float kernel crosses from the forward to the backward pass
    _, pullback = jax.vjp(lambda x: fn(q, adapters, x), x)
    kept = [t for t in jax.tree.leaves(pullback) if hasattr(t, "dtype")]
    floats = [t.shape for t in kept if jnp.issubdtype(t.dtype, jnp.floating)]
    assert (24, 16) not in floats and (16, 24) not in floats, floats


# ---------------------------------------------------------------------------------------------
# quantized expert bases
# ---------------------------------------------------------------------------------------------
TARGETS = r".*experts/w_(in|out)"
EXPERTS = ("experts/w_in", "experts/w_out")
_merge = jax.jit(lora.merge)


def quantized_kernels(params: Any) -> dict[str, Any]:
    """Path -> each `lora.QuantizedKernel` of ``params``."""
    flat = leaves_by_path(params, is_leaf=lambda x: isinstance(x, lora.QuantizedKernel))
    return {p: x for p, x in flat.items() if isinstance(x, lora.QuantizedKernel)}


@check
def merge_on_a_quantized_expert_base(dtype: str, stacked: bool, transposed: bool) -> None:
    case = moe_build("linen", "einsum", stacked=stacked, transposed_out=transposed)
    f = random_factors(case)
    q = lora.quantize(case.params, TARGETS, dtype=dtype, block_size=32)
    quantized = {p for p, x in quantized_kernels(q).items()}
    assert quantized == {p for p in case.kernels if p.endswith(EXPERTS)}
    base = merged64(case, lora.dequantize(q))
    merged = _merge(q, expert_adapters(case, f))
    for path, kernel in merged64(case, merged).items():
        ax = case.kernels[path]
        assert_close(kernel, base[path] + carried_delta64(*f[path], ax.carried, ax.inputs), 2e-6)


@check
def requantize_expert_kernels(stacked: bool) -> None:
    case = moe_build("linen", "einsum", stacked=stacked, transposed_out=False)
    f = random_factors(case, std=0.1)
    n = int(stacked)  # a stacked kernel is quantized layer by layer (found by the probe)
    q = lora.quantize(case.params, TARGETS, dtype="int8", probe=case.probe)
    assert {x.layer_axes for x in quantized_kernels(q).values()} == {n}
    with pytest.warns(UserWarning):
        merged = lora.merge(q, expert_adapters(case, f), requantize=True)
    qs = quantized_kernels(merged)
    assert set(qs) == set(quantized_kernels(q)) and {x.layer_axes for x in qs.values()} == {n}
    base = merged64(case, lora.dequantize(q))
    got = merged64(case, lora.dequantize(merged))
    for path in qs:
        ax = case.kernels[path]
        ref = base[path] + carried_delta64(*f[path], ax.carried, ax.inputs)
        # int8 per (layer and) channel: at most half a step of the channel's absmax / 127
        step = np.max(np.abs(ref), axis=tuple(range(n, ref.ndim - 1)), keepdims=True) / 127
        assert np.all(np.abs(got[path] - ref) <= 0.5 * step + 1e-6)
