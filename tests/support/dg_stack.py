"""The DoRA scan models: ``L`` residual blocks ``x + tanh(x @ W1 + b1) @ W2 + b2`` under ``nn.scan``
(``w1`` a DenseGeneral with two output axes, kernel ``(D, 2, 4)``; ``w2`` ``(2, 4, D)``) or
``nnx.scan`` (``w1`` ``(D, 8)``), each kernel's per-layer input axes written by hand; and their
DoRA adapters (random ``a``, ``b`` and ``m`` on every layer). The float64 reference of these
models is `support.refs_models.dg_stack64`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flax_lora as lora

from .models import fill_abstract, nnx_layers, nnx_scan
from .trees import is_lora

L, D, B = 3, 6, 5  # layers, model width, batch
HID = (2, 4)  # the Linen block's hidden axes (a DenseGeneral with two output axes)
TOL = 2e-5  # relative, float32 against float64
X = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
C = np.random.default_rng(1).normal(size=(B, D))  # the loss is sum(C * y)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        t = jnp.tanh(nn.DenseGeneral(HID, name="w1")(x))  # kernel (D, 2, 4)
        return x + nn.DenseGeneral(D, axis=(-2, -1), name="w2")(t), None  # kernel (2, 4, D)


class LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return stack(name="layers")(x, None)[0]


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.w1 = nnx.Linear(D, 8, rngs=rngs)
        self.w2 = nnx.Linear(8, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.w2(jnp.tanh(self.w1(x)))


class NnxStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx_layers(NnxBlock, L, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx_scan(x, self.layers)


# per-layer input axes of each kernel, by hand (Flax's layouts)
IN_AXES = {"linen": {"w1": (0,), "w2": (0, 1)}, "nnx": {"w1": (0,), "w2": (0,)}}


@functools.cache
def build(name: str) -> tuple[Callable, Any, dict[str, str]]:
    """``apply``, params and the kernel path of ``w1`` / ``w2`` of model ``name`` (``"linen"`` or
    ``"nnx"``; cached for the session: the tests never mutate them)."""
    if name == "linen":
        model = LinenStack()
        params = fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 3, 0.4)
        return model.apply, params, {k: f"params/layers/{k}/kernel" for k in ("w1", "w2")}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxStack(nnx.Rngs(0))))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    return apply, fill_abstract(state, 3, 0.4), {k: f"layers/{k}/kernel" for k in ("w1", "w2")}


def make_adapters(apply: Callable, params: Any, layers: Any, seed: int) -> Any:
    """DoRA adapters from `lora.init`, then a, b and m replaced by random values on every layer
    (also on the layers not picked: they must still act as the base kernel), m far from the
    column norms."""
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", dora=True, layers=layers)
    adapters = lora.init(jax.random.key(seed), params, config, probe=lambda p: apply(p, X))
    rng = np.random.default_rng(seed)
    rand = lambda x, lo, hi: jnp.asarray(rng.uniform(lo, hi, size=x.shape), x.dtype)
    return jax.tree.map(
        lambda w: w.replace(a=rand(w.a, -0.5, 0.5), b=rand(w.b, -0.5, 0.5), m=rand(w.m, 0.5, 2.0)),
        adapters,
        is_leaf=is_lora,
    )


def loss(fn: Callable, params: Any, adapters: Any) -> jax.Array:
    """``sum(C * fn(params, adapters, X))``."""
    return jnp.sum(jnp.asarray(C, jnp.float32) * fn(params, adapters, X))
