"""The tests' small models: the catalogue of layer cases (one per Flax layer type, Linen and NNX),
the MLP, a scan of scans, tied embeddings, stacked NNX blocks, and numpy-filled parameters.

Every layer case states, by hand, which axes of each kernel Flax contracts with the layer input
(or gathers, for an Embed): that is the ``in_axes`` the tests expect `lora.init` to find, and the
layout in which the tests build their own float64 reference ``W0 + scale * a @ b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# ---------------------------------------------------------------------------------------------
# parameters from numpy (no compile time of many small eager ops)
# ---------------------------------------------------------------------------------------------
def fill(abstract: Any, seed: int = 0) -> Any:
    """Concrete values for a tree of abstract arrays: N(0, 0.5^2) from numpy, in each dtype.

    (Filling with numpy instead of running Flax's initialisers keeps the tests free of the
    compile time of many small eager ops.)
    """
    rng = np.random.default_rng(seed)

    def f(x: Any) -> Any:
        return jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(f, abstract)


def fill_abstract(tree: Any, seed: int, std: float) -> Any:
    """Replaces the floating leaves of an abstract tree by seeded normal values (numpy arrays),
    PRNG keys by a key and the other leaves by zeros."""
    rng = np.random.default_rng(seed)

    def f(s: Any) -> Any:
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if jnp.issubdtype(s.dtype, jnp.floating):
            return (std * rng.normal(size=s.shape)).astype(s.dtype)
        return np.zeros(s.shape, s.dtype)

    return jax.tree.map(f, tree)


def _floats(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _ids(shape: tuple[int, ...], vocab: int, seed: int = 2) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# ---------------------------------------------------------------------------------------------
# models shared by several test modules
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
    return model, fill(jax.eval_shape(lambda: model.init(jax.random.key(seed), x)), seed), x


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
    """Lookup and ``attend`` on the same table (a tied LM head), ``tanh`` between them."""

    vocab: int = 11
    features: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        emb = nn.Embed(self.vocab, self.features, dtype=self.dtype, param_dtype=self.param_dtype)
        return emb.attend(jnp.tanh(emb(ids)))


class NnxTiedEmbed(nnx.Module):
    """`LinenTiedEmbed` in NNX (the table at ``embed/embedding``)."""

    def __init__(
        self,
        rngs: nnx.Rngs,
        vocab: int = 11,
        features: int = 4,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ) -> None:
        self.embed = nnx.Embed(vocab, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.embed.attend(jnp.tanh(self.embed(ids)))


def nnx_layers(make: Callable[[nnx.Rngs], nnx.Module], length: int, rngs: nnx.Rngs) -> Any:
    """``length`` blocks ``make(rngs)``, their parameters stacked on a leading layer axis (the
    NNX way to build the layers an ``nnx.scan`` runs through: see `nnx_scan`)."""

    @nnx.split_rngs(splits=length)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return build(rngs)


def nnx_scan(x: jax.Array, layers: Any, remat: bool = False) -> jax.Array:
    """``x`` through the layers of `nnx_layers`, one after another (``nnx.scan``; each step
    under ``nnx.remat`` with ``remat``)."""

    def body(x: jax.Array, block: Any) -> jax.Array:
        return block(x)

    if remat:
        body = nnx.remat(body)
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, layers)


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


def _linen(module: nn.Module, x: Any, kernels: dict, xs: Any, method: Any = None) -> Built:
    variables = fill(jax.eval_shape(lambda: module.init(jax.random.key(0), x, method=method)))

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


def _x3() -> jax.Array:
    return _floats((2, 3, 4))


def _xs3() -> jax.Array:
    return _floats((3, 2, 3, 4), seed=5)


def _mha_kernels(prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """q/k/v kernels (d, heads, head_dim) contract d; the out kernel (heads, head_dim, d)
    contracts (heads, head_dim)."""
    kernels = {f"{prefix}{n}/kernel": ((0,), "dense") for n in ("query", "key", "value")}
    kernels[f"{prefix}out/kernel"] = ((0, 1), "dense")
    return kernels


def _linen_conv(nd: int, pd: Any) -> Built:
    spatial = {1: (6,), 2: (5, 5), 3: (4, 4, 4)}[nd]
    x = _floats((1, *spatial, 3))
    mod = nn.Conv(4, (2,) * nd, param_dtype=pd)
    # kernel (k..., in, out): every axis but the last is an input axis
    kernels = {"params/kernel": (tuple(range(nd + 1)), "conv")}
    return _linen(mod, x, kernels, _floats((3, 1, *spatial, 3), seed=5))


def _linen_embed_attend(pd: Any) -> Built:
    mod = nn.Embed(11, 4, param_dtype=pd)
    kernels = {"params/embedding": ((0,), "embed")}  # rows stay the input axis
    return _linen(mod, _floats((2, 4)), kernels, _floats((3, 2, 4), seed=5), method=mod.attend)


#: name -> a builder of the case for a parameter dtype
_CASES: dict[str, Callable[[Any], Built]] = {
    "linen_dense": lambda pd: _linen(
        nn.Dense(5, param_dtype=pd), _x3(), {"params/kernel": ((0,), "dense")}, _xs3()
    ),
    # kernel (4, 5, 3, 2): contracts x's last two axes with kernel axes 0, 1
    "linen_dense_general": lambda pd: _linen(
        nn.DenseGeneral((3, 2), axis=(-2, -1), param_dtype=pd),
        _floats((2, 4, 5)),
        {"params/kernel": ((0, 1), "dense")},
        _floats((3, 2, 4, 5), seed=5),
    ),
    "linen_mha": lambda pd: _linen(
        nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, param_dtype=pd),
        _floats((2, 3, 6)),
        _mha_kernels("params/"),
        _floats((3, 2, 3, 6), seed=5),
    ),
    # "bsd,hdk->bshk": kernel (h, d, k) contracts d -> input axes (1,)
    "linen_einsum": lambda pd: _linen(
        nn.Einsum((2, 4, 3), "bsd,hdk->bshk", param_dtype=pd),
        _x3(),
        {"params/kernel": ((1,), "dense")},
        _xs3(),
    ),
    "linen_embed": lambda pd: _linen(
        LinenTiedEmbed(param_dtype=pd),
        _ids((2, 3), 11),
        {"params/Embed_0/embedding": ((0,), "embed")},
        _ids((3, 2, 3), 11, seed=6),
    ),
    "linen_embed_attend": _linen_embed_attend,
    "linen_conv1d": lambda pd: _linen_conv(1, pd),
    "linen_conv2d": lambda pd: _linen_conv(2, pd),
    "linen_conv3d": lambda pd: _linen_conv(3, pd),
    "nnx_linear": lambda pd: _nnx(
        lambda rngs: nnx.Linear(4, 5, param_dtype=pd, rngs=rngs),
        _x3(),
        {"kernel": ((0,), "dense")},
        _xs3(),
    ),
    "nnx_linear_general": lambda pd: _nnx(
        lambda rngs: nnx.LinearGeneral((4, 5), (3, 2), axis=(-2, -1), param_dtype=pd, rngs=rngs),
        _floats((2, 4, 5)),
        {"kernel": ((0, 1), "dense")},
        _floats((3, 2, 4, 5)),
    ),
    "nnx_einsum": lambda pd: _nnx(
        lambda rngs: nnx.Einsum("bsd,hdk->bshk", (2, 4, 3), param_dtype=pd, rngs=rngs),
        _x3(),
        {"kernel": ((1,), "dense")},
        _xs3(),
    ),
    "nnx_embed": lambda pd: _nnx(
        lambda rngs: NnxTiedEmbed(rngs, param_dtype=pd),
        _ids((2, 3), 11),
        {"embed/embedding": ((0,), "embed")},
        _ids((3, 2, 3), 11, seed=6),
    ),
    "nnx_embed_attend": lambda pd: _nnx(
        lambda rngs: nnx.Embed(11, 4, param_dtype=pd, rngs=rngs),
        _floats((2, 4)),
        {"embedding": ((0,), "embed")},
        _floats((3, 2, 4), seed=5),
        method="attend",
    ),
    "nnx_conv": lambda pd: _nnx(
        lambda rngs: nnx.Conv(3, 4, (2, 2), param_dtype=pd, rngs=rngs),
        _floats((1, 5, 5, 3)),
        {"kernel": ((0, 1, 2), "conv")},
        _floats((3, 1, 5, 5, 3), seed=5),
    ),
    "nnx_mha": lambda pd: _nnx(
        lambda rngs: nnx.MultiHeadAttention(
            num_heads=2, in_features=6, qkv_features=4, decode=False, param_dtype=pd, rngs=rngs
        ),
        _floats((2, 3, 6)),
        _mha_kernels(""),
        _floats((3, 2, 3, 6), seed=5),
    ),
}

#: every layer case, by name (the ``layer_name`` fixture runs a test on each)
LAYER_CASES = tuple(_CASES)

_CACHE: dict[tuple[str, str], Built] = {}


def build(name: str, param_dtype: Any = jnp.float32) -> Built:
    """The layer case ``name`` (cached: the params are never mutated by the tests)."""
    key = (name, jnp.dtype(param_dtype).name)
    if key not in _CACHE:
        _CACHE[key] = _CASES[name](param_dtype)
    return _CACHE[key]
