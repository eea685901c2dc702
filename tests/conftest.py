"""Tiny model builders and independent numpy references shared by the core tests.

Every layer case states, by hand, which axes of each kernel Flax contracts with the layer input
(or gathers, for an Embed): that is the ``in_axes`` the tests expect `lora.init` to find, and the
layout in which the tests build their own float64 reference ``W0 + scale * a @ b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------
# paths, written independently of flax_lora._paths
# ---------------------------------------------------------------------------------------------
def keypath_to_str(keypath: tuple[Any, ...]) -> str:
    """ "/"-joined key path, without the trailing ``.value`` of an NNX Variable."""
    parts = []
    for k in keypath:
        if isinstance(k, DictKey):
            parts.append(str(k.key))
        elif isinstance(k, SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    return {keypath_to_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def replace_leaves(tree: Any, new: Mapping[str, Any]) -> Any:
    """``tree`` with the leaves at the given paths replaced (each path must exist)."""
    found = set()

    def f(kp: Any, x: Any) -> Any:
        p = keypath_to_str(kp)
        if p in new:
            found.add(p)
            return new[p]
        return x

    out = jax.tree_util.tree_map_with_path(f, tree)
    assert found == set(new), f"paths not in tree: {set(new) - found}"
    return out


def adapter_entries(adapters: Any) -> dict[str, Any]:
    """Path -> the adapter entry (an object with ``a`` and ``b``) of every adapted kernel."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if hasattr(node, "a") and hasattr(node, "b"):
            out[prefix] = node
            return
        assert isinstance(node, Mapping), f"unexpected node {type(node)} at {prefix!r}"
        for k, v in node.items():
            walk(v, f"{prefix}/{k}" if prefix else str(k))

    walk(adapters, "")
    return out


# ---------------------------------------------------------------------------------------------
# the independent reference: float64, written from the kernel layout we expect
# ---------------------------------------------------------------------------------------------
def ref_delta64(a: Any, b: Any, in_axes: tuple[int, ...], scale: float) -> np.ndarray:
    """``scale * a @ b`` in float64, put back into a kernel layout whose input axes are ``in_axes``.

    ``a`` has shape ``(*I, r)``, ``b`` ``(r, *O)``; the product ``(*I, *O)`` is transposed so
    that axis ``in_axes[k]`` of the kernel is the k-th input axis and the remaining kernel axes,
    in order, are the output axes.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    prod = np.tensordot(a64, b64, axes=([a64.ndim - 1], [0]))  # (*I, *O)
    ndim = prod.ndim
    out_axes = [i for i in range(ndim) if i not in in_axes]
    order = list(in_axes) + out_axes  # prod axis j holds kernel axis order[j]
    return scale * np.transpose(prod, np.argsort(order))


def ref_delta_jnp(a: jax.Array, b: jax.Array, in_axes: tuple[int, ...], scale: float) -> jax.Array:
    """The same reference in jnp (differentiable), float32 at the highest precision."""
    prod = jnp.tensordot(
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        axes=([a.ndim - 1], [0]),
        precision=jax.lax.Precision.HIGHEST,
    )
    out_axes = [i for i in range(prod.ndim) if i not in in_axes]
    order = list(in_axes) + out_axes
    return scale * jnp.transpose(prod, tuple(int(i) for i in np.argsort(order)))


def ref_merged_kernel(w0: Any, a: Any, b: Any, in_axes: tuple[int, ...], scale: float) -> Any:
    """``W0 + scale * a @ b`` in float64, then float32, then cast once to the kernel's dtype."""
    ref64 = np.asarray(w0, dtype=np.float64) + ref_delta64(a, b, in_axes, scale)
    return ref64.astype(np.float32).astype(np.asarray(w0).dtype)


def bf16_ulps(x: Any, y: Any) -> np.ndarray:
    """Distance in bf16 units in the last place between two bf16 arrays (sign-magnitude aware)."""

    def ordered(v: Any) -> np.ndarray:
        bits = np.asarray(v, dtype=BF16).view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.abs(ordered(x) - ordered(y))


# ---------------------------------------------------------------------------------------------
# the layer cases
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    """A model instance: params, ``apply(params, x)``, an input, and the kernels we expect.

    ``kernels`` maps each kernel path to ``(in_axes, kind)`` as read from Flax's kernel layout.
    """

    params: Any
    apply: Callable[[Any, Any], Any]
    x: Any
    kernels: dict[str, tuple[tuple[int, ...], str]]
    xs: Any = None  # a batch of 3 inputs for vmap

    def probe(self, p: Any) -> Any:
        return self.apply(p, self.x)


def jaxpr_shapes(jaxpr: Any, out: list[tuple[int, ...]] | None = None) -> list[tuple[int, ...]]:
    """The shapes of all equation outputs of ``jaxpr``, nested jaxprs included."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    jaxpr_shapes(sub.jaxpr, out)
                elif isinstance(sub, jex_core.Jaxpr):
                    jaxpr_shapes(sub, out)
    return out


def _key(i: int = 0) -> jax.Array:
    return jax.random.key(i)


def _floats(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _ids(shape: tuple[int, ...], vocab: int, seed: int = 2) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def fill(abstract: Any, seed: int = 0) -> Any:
    """Concrete values for a tree of abstract arrays: N(0, 0.5^2) from numpy, in each dtype.

    (Filling with numpy instead of running Flax's initialisers keeps the tests free of the
    compile time of many small eager ops.)
    """
    rng = np.random.default_rng(seed)

    def f(x: Any) -> Any:
        return jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(f, abstract)


def _linen(module: nn.Module, x: Any, kernels: dict, xs: Any, method: Any = None) -> Built:
    variables = fill(jax.eval_shape(lambda: module.init(_key(), x, method=method)))

    def apply(p: Any, inp: Any) -> Any:
        return module.apply(p, inp, method=method)

    return Built(variables, apply, x, kernels, xs)


def _nnx(
    make: Callable[[nnx.Rngs], nnx.Module],
    x: Any,
    kernels: dict,
    xs: Any,
    method: str | None = None,
) -> Built:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = fill(state)

    def apply(s: Any, inp: Any) -> Any:
        m = nnx.merge(graphdef, s)
        return m(inp) if method is None else getattr(m, method)(inp)

    return Built(state, apply, x, kernels, xs)


class _ScanLeaf(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return jnp.tanh(nn.Dense(self.width, name="fc")(x)), None


class _ScanInner(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        scan = nn.scan(
            _ScanLeaf, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        return scan(self.width, name="inner")(x, None)[0], None


class NestedStack(nn.Module):
    """A scan of scans: kernel ``params/outer/inner/fc/kernel`` of shape
    ``(layers, 2, width, width)``."""

    width: int
    layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scan = nn.scan(
            _ScanInner, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        return scan(self.width, name="outer")(x, None)[0]


class LinenTiedEmbed(nn.Module):
    """Lookup and ``attend`` on the same table (a tied LM head)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        emb = nn.Embed(11, 4, param_dtype=self.param_dtype)
        return emb.attend(jnp.tanh(emb(ids)))


class NnxTiedEmbed(nnx.Module):
    def __init__(self, param_dtype: Any, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(11, 4, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.embed.attend(jnp.tanh(self.embed(ids)))


def _build(name: str, pd: Any) -> Built:
    """Builds layer case ``name`` with parameter dtype ``pd``."""
    x3 = _floats((2, 3, 4))
    xs3 = _floats((3, 2, 3, 4), seed=5)
    if name == "linen_dense":
        return _linen(nn.Dense(5, param_dtype=pd), x3, {"params/kernel": ((0,), "dense")}, xs3)
    if name == "linen_dense_general":
        x = _floats((2, 4, 5))
        return _linen(
            nn.DenseGeneral((3, 2), axis=(-2, -1), param_dtype=pd),
            x,  # kernel (4, 5, 3, 2): contracts x's last two axes with kernel axes 0, 1
            {"params/kernel": ((0, 1), "dense")},
            _floats((3, 2, 4, 5), seed=5),
        )
    if name == "linen_mha":
        x = _floats((2, 3, 6))
        # q/k/v kernels (d, heads, head_dim) contract d; out kernel (heads, head_dim, d)
        # contracts (heads, head_dim).
        kernels = {f"params/{n}/kernel": ((0,), "dense") for n in ("query", "key", "value")}
        kernels["params/out/kernel"] = ((0, 1), "dense")
        mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, param_dtype=pd)
        return _linen(mha, x, kernels, _floats((3, 2, 3, 6), seed=5))
    if name == "linen_einsum":
        # "bsd,hdk->bshk": kernel (h, d, k) contracts d -> input axes (1,)
        mod = nn.Einsum((2, 4, 3), "bsd,hdk->bshk", param_dtype=pd)
        return _linen(mod, x3, {"params/kernel": ((1,), "dense")}, xs3)
    if name == "linen_embed":
        ids = _ids((2, 3), 11)
        mod = LinenTiedEmbed(param_dtype=pd)
        kernels = {"params/Embed_0/embedding": ((0,), "embed")}
        return _linen(mod, ids, kernels, _ids((3, 2, 3), 11, seed=6))
    if name == "linen_embed_attend":
        mod = nn.Embed(11, 4, param_dtype=pd)
        x = _floats((2, 4))
        kernels = {"params/embedding": ((0,), "embed")}  # rows stay the input axis
        return _linen(mod, x, kernels, _floats((3, 2, 4), seed=5), method=mod.attend)
    if name.startswith("linen_conv"):
        nd = int(name[-2])
        spatial = {1: (6,), 2: (5, 5), 3: (4, 4, 4)}[nd]
        x = _floats((1, *spatial, 3))
        mod = nn.Conv(4, (2,) * nd, param_dtype=pd)
        # kernel (k..., in, out): every axis but the last is an input axis
        kernels = {"params/kernel": (tuple(range(nd + 1)), "conv")}
        return _linen(mod, x, kernels, _floats((3, 1, *spatial, 3), seed=5))
    if name == "nnx_linear":
        mod = lambda rngs: nnx.Linear(4, 5, param_dtype=pd, rngs=rngs)
        return _nnx(mod, x3, {"kernel": ((0,), "dense")}, xs3)
    if name == "nnx_linear_general":
        mod = lambda rngs: nnx.LinearGeneral(
            (4, 5), (3, 2), axis=(-2, -1), param_dtype=pd, rngs=rngs
        )
        return _nnx(mod, _floats((2, 4, 5)), {"kernel": ((0, 1), "dense")}, _floats((3, 2, 4, 5)))
    if name == "nnx_einsum":
        mod = lambda rngs: nnx.Einsum("bsd,hdk->bshk", (2, 4, 3), param_dtype=pd, rngs=rngs)
        return _nnx(mod, x3, {"kernel": ((1,), "dense")}, xs3)
    if name == "nnx_embed":
        ids = _ids((2, 3), 11)
        kernels = {"embed/embedding": ((0,), "embed")}
        return _nnx(lambda rngs: NnxTiedEmbed(pd, rngs), ids, kernels, _ids((3, 2, 3), 11, seed=6))
    if name == "nnx_embed_attend":
        mod = lambda rngs: nnx.Embed(11, 4, param_dtype=pd, rngs=rngs)
        kernels = {"embedding": ((0,), "embed")}
        return _nnx(mod, _floats((2, 4)), kernels, _floats((3, 2, 4), seed=5), method="attend")
    if name == "nnx_conv":
        mod = lambda rngs: nnx.Conv(3, 4, (2, 2), param_dtype=pd, rngs=rngs)
        x = _floats((1, 5, 5, 3))
        return _nnx(mod, x, {"kernel": ((0, 1, 2), "conv")}, _floats((3, 1, 5, 5, 3), seed=5))
    if name == "nnx_mha":
        mod = lambda rngs: nnx.MultiHeadAttention(
            num_heads=2, in_features=6, qkv_features=4, decode=False, param_dtype=pd, rngs=rngs
        )
        kernels = {f"{n}/kernel": ((0,), "dense") for n in ("query", "key", "value")}
        kernels["out/kernel"] = ((0, 1), "dense")
        return _nnx(mod, _floats((2, 3, 6)), kernels, _floats((3, 2, 3, 6), seed=5))
    raise KeyError(name)


LAYER_CASES = (
    "linen_dense",
    "linen_dense_general",
    "linen_mha",
    "linen_einsum",
    "linen_embed",
    "linen_embed_attend",
    "linen_conv1d",
    "linen_conv2d",
    "linen_conv3d",
    "nnx_linear",
    "nnx_linear_general",
    "nnx_einsum",
    "nnx_embed",
    "nnx_embed_attend",
    "nnx_conv",
    "nnx_mha",
)

_CACHE: dict[tuple[str, str], Built] = {}


def build(name: str, param_dtype: Any = jnp.float32) -> Built:
    """The layer case ``name`` (cached: the params are never mutated by the tests)."""
    key = (name, jnp.dtype(param_dtype).name)
    if key not in _CACHE:
        _CACHE[key] = _build(name, param_dtype)
    return _CACHE[key]


@pytest.fixture(params=LAYER_CASES)
def layer_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["float32", "bfloat16"])
def param_dtype(request: pytest.FixtureRequest) -> Any:
    return jnp.dtype(request.param)


# ---------------------------------------------------------------------------------------------
# small models for the other tests
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Two hidden Dense layers and a ``head``; 2-D kernels only (no probe needed)."""

    hidden: int = 6
    out: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="fc0")(x))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.out, name="head")(x)


def mlp(in_features: int = 4, seed: int = 0) -> tuple[MLP, Any, jax.Array]:
    """An MLP, its variables and an input batch."""
    model = MLP()
    x = _floats((5, in_features), seed=seed + 10)
    return model, fill(jax.eval_shape(lambda: model.init(_key(seed), x)), seed), x


def fill_abstract(tree: Any, seed: int, std: float) -> Any:
    """Replaces the floating leaves of an abstract tree by seeded normal values."""
    rng = np.random.default_rng(seed)

    def fill(s: Any) -> Any:
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if jnp.issubdtype(s.dtype, jnp.floating):
            return (std * rng.normal(size=s.shape)).astype(s.dtype)
        return np.zeros(s.shape, s.dtype)

    return jax.tree.map(fill, tree)
