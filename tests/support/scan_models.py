"""The layered models of tests/test_scan.py (``nn.scan`` / ``nnx.scan`` over ``L`` attention + MLP
blocks, then a head), shared with the capability matrix (support/check_combine.py,
check_routing.py, check_stack.py); each kernel's input axes written by hand."""

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

L, D, H, F = 3, 8, 2, 16  # layers, model width, heads (of size D / H), MLP width
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
        self.layers = nnx_layers(NnxBlock, L, rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx_scan(x, self.layers))


X = np.random.default_rng(0).normal(size=(5, 7, D)).astype(np.float32)

#: the models `scan_model` builds
MODELS = ["linen", "linen_remat", "nnx"]


@functools.cache
def scan_model(name: str) -> tuple[Callable, Any]:
    """``(apply, params)`` of model ``name`` (one of `MODELS`), params N(0, 0.4^2) (cached for
    the session: the tests never mutate them)."""
    if name.startswith("linen"):
        model = LinenStack(remat=name == "linen_remat")
        return model.apply, fill_abstract(jax.eval_shape(model.init, jax.random.key(0), X), 1, 0.4)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxStack(nnx.Rngs(0))))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), fill_abstract(state, 1, 0.4)


def init_adapters(apply: Callable, params: Any, config: lora.LoraConfig = CONFIG) -> Any:
    """`lora.init` on a model of `scan_model`, probed with `X`."""
    return lora.init(jax.random.key(2), params, config, probe=lambda p: apply(p, X))


def is_layered(path: str) -> bool:
    """Whether the kernel at ``path`` has the leading layer axis (it is in the scanned blocks)."""
    return "layers/" in path


def in_axes_of(path: str) -> tuple[int, ...]:
    """The kernel's input axes (a layered kernel's per-layer ones shifted past its layer axis)."""
    if not is_layered(path):
        return (0,)
    return tuple(1 + i for i in IN_AXES[path.split("/")[-2]])
