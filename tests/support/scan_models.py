"""The scan-stacked models of tests/test_scan.py (``nn.scan`` / ``nnx.scan`` over ``L`` blocks),
shared with tests/test_combine_scan.py and tests/test_routing_scan.py; each kernel's input axes
written by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import fill_abstract
from flax import nnx

import flax_lora as lora

L, D, H, HD, F = 3, 8, 2, 4, 16  # layers, model width, heads, head size, MLP width
# input axes of each kernel of one layer (Flax's layouts), by hand
IN_AXES = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1), "fc1": (0,), "fc2": (0,)}
CONFIG = lora.LoraConfig(rank=2, alpha=3.0, init="random")


# -- models ---------------------------------------------------------------------------------
class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        h = nn.LayerNorm(name="ln")(x)
        x = x + nn.MultiHeadDotProductAttention(H, deterministic=True, name="attn")(h, h)
        h = nn.Dense(F, name="fc1")(x)
        return x + nn.Dense(D, name="fc2")(jnp.tanh(h)), None


class LinenStack(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(Block) if self.remat else Block
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(3, name="head")(x)  # an ordinary kernel after the stack


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attn = nnx.MultiHeadAttention(H, D, qkv_features=D, decode=False, rngs=rngs)
        self.fc1 = nnx.Linear(D, F, rngs=rngs)
        self.fc2 = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(x)
        return x + self.fc2(jnp.tanh(self.fc1(x)))


class NnxStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> NnxBlock:
            return NnxBlock(rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x: jax.Array, block: NnxBlock) -> jax.Array:
            return block(x)

        return self.head(step(x, self.layers))


def _fill(tree: Any, seed: int, std: float = 0.4) -> Any:
    return fill_abstract(tree, seed, std)


X = np.random.default_rng(0).normal(size=(5, 7, D)).astype(np.float32)


def build(name: str) -> tuple[Callable, Any]:
    if name.startswith("linen"):
        model = LinenStack(remat=name == "linen_remat")
        return model.apply, _fill(jax.eval_shape(model.init, jax.random.key(0), X), 1)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxStack(nnx.Rngs(0))))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), _fill(state, 1)


MODELS = ["linen", "linen_remat", "nnx"]


def _init(apply: Callable, params: Any, config: lora.LoraConfig = CONFIG) -> Any:
    return lora.init(jax.random.key(2), params, config, probe=lambda p: apply(p, X))


def _stacked(path: str) -> bool:
    return "layers/" in path


def _in_axes(path: str) -> tuple[int, ...]:
    """The stacked kernel's input axes (the per-layer ones shifted past the layer axis)."""
    if not _stacked(path):
        return (0,)
    return tuple(1 + i for i in IN_AXES[path.split("/")[-2]])


def _close(x: Any, y: Any, tol: float = 2e-5) -> None:
    x, y = np.asarray(x), np.asarray(y)
    scale = max(1.0, float(np.max(np.abs(y))))
    assert np.max(np.abs(x - y)) <= tol * scale, np.max(np.abs(x - y))
